#include "release_watcher.h"

#include <utility>

#include <c10/util/Exception.h>
#include <c10/util/Logging.h>

namespace tcpstore_barrier {

struct ReleaseWatcher::State {
  explicit State(c10::intrusive_ptr<c10d::Store> s) : store(std::move(s)) {
    key.resize(1);
  }

  c10::intrusive_ptr<c10d::Store> store;
  mutable std::mutex mutex;
  std::condition_variable changed;
  bool stopping = false;

  // The watch: written by the caller, served by the thread.
  std::vector<std::string> key;
  Clock::time_point deadline;
  Kind kind = Kind::kKey;
  int64_t worldSize = 0;
  // The key whose server-side barrier this rank has already joined: the
  // server keeps counting a cancelled BARRIER request, so a retry must not
  // send another one.
  std::string joinedBarrier;
  std::function<bool(c10d::Store&)> arrival;
  // Whether the last arrival handed over has reached the store.
  bool arrivalDone = true;
  bool requested = false;
  Status status = Status::kIdle;
  std::exception_ptr error;

  std::vector<std::function<void(c10d::Store&)>> jobs;
  std::size_t runningJobs = 0;
};

ReleaseWatcher::ReleaseWatcher(c10::intrusive_ptr<c10d::Store> store)
    : state_(std::make_shared<State>(std::move(store))),
      thread_(&ReleaseWatcher::run, state_) {}

ReleaseWatcher::~ReleaseWatcher() {
  bool busy = false;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->stopping = true;
    busy = state_->status == Status::kWatching;
  }
  state_->changed.notify_all();
  // A store wait cannot be cut short; rather than block the owner until
  // its deadline, let the thread finish it alone (it owns what it uses).
  if (busy) {
    thread_.detach();
  } else {
    thread_.join();
  }
}

void ReleaseWatcher::watch(
    const std::string& key,
    Clock::time_point deadline,
    Kind kind,
    int64_t worldSize,
    std::function<bool(c10d::Store&)> arrival) {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    const bool sameKey = state_->key.front() == key;
    if (sameKey && state_->status == Status::kReleased) {
      return;
    }
    if (sameKey && state_->status == Status::kWatching &&
        deadline <= state_->deadline) {
      return;
    }
    state_->key.front().assign(key);
    state_->deadline = deadline;
    state_->kind = kind;
    state_->worldSize = worldSize;
    // A later request for the same round only extends the deadline; it
    // must not drop an arrival the thread has not run yet.
    if (arrival) {
      state_->arrival = std::move(arrival);
      state_->arrivalDone = false;
    }
    state_->requested = true;
    state_->status = Status::kWatching;
    state_->error = nullptr;
  }
  state_->changed.notify_all();
}

ReleaseWatcher::Status ReleaseWatcher::waitUntil(Clock::time_point until) {
  std::unique_lock<std::mutex> lock(state_->mutex);
  state_->changed.wait_until(
      lock, until, [&] { return state_->status != Status::kWatching; });
  return state_->status;
}

ReleaseWatcher::Status ReleaseWatcher::status() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->status;
}

void ReleaseWatcher::markJoined(const std::string& key) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->joinedBarrier = key;
}

void ReleaseWatcher::reset() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->status = Status::kIdle;
  state_->error = nullptr;
}

void ReleaseWatcher::runInBackground(std::function<void(c10d::Store&)> job) {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->jobs.push_back(std::move(job));
  }
  state_->changed.notify_all();
}

bool ReleaseWatcher::awaitArrival(Clock::time_point until) {
  std::unique_lock<std::mutex> lock(state_->mutex);
  state_->changed.wait_until(lock, until, [&] {
    return state_->arrivalDone || state_->status == Status::kFailed;
  });
  if (state_->status == Status::kFailed && state_->error) {
    std::rethrow_exception(state_->error);
  }
  return state_->arrivalDone;
}

std::size_t ReleaseWatcher::backgroundJobs() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->runningJobs + state_->jobs.size();
}

std::exception_ptr ReleaseWatcher::failure() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->error;
}

void ReleaseWatcher::waitForRelease(
    State& state,
    const std::vector<std::string>& key,
    Clock::time_point deadline) {
  // Throws DistStoreError once the deadline has passed, like a store wait.
  const auto remaining = [&] {
    auto left =
        std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      C10_THROW_ERROR(DistStoreError, "deadline passed");
    }
    return left;
  };
  std::unique_lock<std::mutex> lock(state.mutex);
  const Kind kind = state.kind;
  const int64_t worldSize = state.worldSize;
  const bool joined = state.joinedBarrier == key.front();
  if (kind == Kind::kServerBarrier && !joined) {
    state.joinedBarrier = key.front();
  }
  lock.unlock();

  if (kind == Kind::kKey) {
    state.store->wait(key, remaining());
  } else if (!joined) {
    state.store->barrier(key.front(), worldSize, remaining());
  } else {
    // Resuming a round whose BARRIER request was cancelled: the server
    // still counts it but will not answer it, so watch the count. With get,
    // not add(key, 0): any add on that key releases the server's waiters
    // early (torch 2.13, both backends).
    constexpr std::chrono::milliseconds kPoll{10};
    const auto count = [&] {
      const auto bytes = state.store->get(key.front());
      return std::stoll(std::string(bytes.begin(), bytes.end()));
    };
    while (count() < worldSize) {
      const auto left = remaining();
      lock.lock();
      if (state.changed.wait_for(
              lock, std::min(left, kPoll), [&] { return state.stopping; })) {
        C10_THROW_ERROR(DistStoreError, "watcher stopped");
      }
      lock.unlock();
    }
  }
}

void ReleaseWatcher::run(std::shared_ptr<State> state) {
  std::unique_lock<std::mutex> lock(state->mutex);
  std::vector<std::string> key(1);
  for (;;) {
    state->changed.wait(lock, [&] {
      return state->stopping || state->requested || !state->jobs.empty();
    });
    if (state->stopping) {
      return;
    }
    if (state->requested) {
      state->requested = false;
      key.front().assign(state->key.front());
      const auto deadline = state->deadline;
      auto arrival = std::move(state->arrival);
      state->arrival = nullptr;
      lock.unlock();

      Status result = Status::kReleased;
      std::exception_ptr error;
      try {
        bool releasedByArrival = false;
        if (arrival) {
          releasedByArrival = arrival(*state->store);
          lock.lock();
          state->arrivalDone = true;
          if (releasedByArrival) {
            state->status = Status::kReleased;
          }
          lock.unlock();
          state->changed.notify_all();
        }
        if (!releasedByArrival) {
          waitForRelease(*state, key, deadline);
        }
      } catch (const c10::DistStoreError&) {
        // TCPStore reports an elapsed wait as DistStoreError; one that
        // comes early means the store itself failed.
        if (Clock::now() + std::chrono::milliseconds(5) >= deadline) {
          result = Status::kExpired;
        } else {
          result = Status::kFailed;
          error = std::current_exception();
        }
      } catch (...) {
        result = Status::kFailed;
        error = std::current_exception();
      }

      lock.lock();
      state->arrivalDone = true;
      // A newer request for the same round (a later deadline) supersedes an
      // expiry; a release stands whatever was asked meanwhile.
      if ((!state->requested || result == Status::kReleased) &&
          state->key.front() == key.front()) {
        state->requested = state->requested && result != Status::kReleased;
        state->status = result;
        state->error = error;
      }
      state->changed.notify_all();
      continue;
    }
    // One job at a time, so that a watch requested meanwhile goes first.
    auto job = std::move(state->jobs.front());
    state->jobs.erase(state->jobs.begin());
    state->runningJobs = 1;
    lock.unlock();
    {
      try {
        job(*state->store);
      } catch (const c10::Error& e) {
        LOG(WARNING) << "tcpstore_barrier: deleting finished rounds' keys "
                     << "failed: " << e.what_without_backtrace();
      } catch (const std::exception& e) {
        LOG(WARNING) << "tcpstore_barrier: deleting finished rounds' keys "
                     << "failed: " << e.what();
      }
    }
    lock.lock();
    state->runningJobs = 0;
  }
}

} // namespace tcpstore_barrier
