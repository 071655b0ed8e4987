#include "worker.h"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace tcpstore_barrier {
namespace {

constexpr std::chrono::milliseconds kGracefulStop{200};

// Jobs report their outcome through their own state; a job that throws
// (housekeeping on a store that is gone) has nothing left to tell.
void runQuietly(const std::function<void()>& job) noexcept {
  try {
    job();
  } catch (...) {
  }
}

} // namespace

Worker::Worker(
    std::chrono::milliseconds interval,
    std::function<void()> tick,
    std::function<void()> interrupt)
    : Worker(interval, std::move(tick), std::move(interrupt), -1, nullptr) {}

Worker::Worker(
    std::chrono::milliseconds interval,
    std::function<void()> tick,
    std::function<void()> interrupt,
    int fd,
    std::function<bool()> onReadable)
    : interval_(interval),
      tick_(std::move(tick)),
      interrupt_(std::move(interrupt)),
      watchedFd_(fd),
      onReadable_(std::move(onReadable)),
      wakeFd_(fd >= 0 ? makeEventFd() : UniqueFd()),
      thread_(&Worker::run, this) {}

Worker::~Worker() {
  stop();
}

void Worker::stop() {
  if (!thread_.joinable()) {
    return;
  }
  std::unique_lock<std::mutex> lock(mutex_);
  stopping_ = true;
  wake();
  // A job or tick in flight normally ends within microseconds: let it, so
  // that no request is cut off with its reply on the way (the store's
  // server would log a failed write). One stuck on a silent store is
  // interrupted.
  if (!changed_.wait_for(
          lock,
          kGracefulStop,
          [this] {
            return stopped_;
          }) &&
      interrupt_) {
    interrupt_();
  }
  lock.unlock();
  thread_.join();
}

void Worker::post(std::function<void()> job) {
  postAt(std::move(job), Clock::time_point::min());
}

void Worker::postAt(std::function<void()> job, Clock::time_point notBefore) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_.push_back(Job{std::move(job), notBefore});
  }
  wake();
}

void Worker::wake() noexcept {
  changed_.notify_all();
  if (wakeFd_.get() >= 0) {
    postEvent(wakeFd_.get());
  }
}

void Worker::run() {
  auto nextTick = Clock::now();
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    const auto now = Clock::now();
    if (tick_ && now >= nextTick) {
      lock.unlock();
      runQuietly(tick_);
      lock.lock();
      nextTick = Clock::now() + interval_;
      continue;
    }
    auto wake = tick_ ? nextTick : Clock::time_point::max();
    auto due = jobs_.end();
    for (auto job = jobs_.begin(); job != jobs_.end(); ++job) {
      if (job->notBefore <= now) {
        due = job;
        break;
      }
      wake = std::min(wake, job->notBefore);
    }
    if (due == jobs_.end()) {
      if (wakeFd_.get() < 0) {
        const std::size_t waiting = jobs_.size();
        const auto changed = [&] {
          return stopping_ || jobs_.size() != waiting;
        };
        if (wake == Clock::time_point::max()) {
          changed_.wait(lock, changed);
        } else {
          changed_.wait_until(lock, wake, changed);
        }
      } else {
        lock.unlock();
        sleepUntil(wake);
        lock.lock();
      }
      continue;
    }
    auto job = std::move(due->run);
    jobs_.erase(due);
    lock.unlock();
    runQuietly(job);
    lock.lock();
  }
  stopped_ = true;
  changed_.notify_all();
}

void Worker::sleepUntil(Clock::time_point wake) {
  pollfd fds[2] = {{wakeFd_.get(), POLLIN, 0}, {watchedFd_, POLLIN, 0}};
  const int count = watchedFd_ >= 0 ? 2 : 1;
  int timeout = -1;
  if (wake != Clock::time_point::max()) {
    const auto left =
        std::chrono::ceil<std::chrono::milliseconds>(wake - Clock::now());
    timeout = static_cast<int>(std::clamp<int64_t>(left.count(), 0, 1 << 30));
  }
  if (::poll(fds, count, timeout) <= 0) {
    return;
  }
  if ((fds[0].revents & POLLIN) != 0) {
    uint64_t posts = 0;
    [[maybe_unused]] const auto read =
        ::read(wakeFd_.get(), &posts, sizeof(posts));
  }
  if (count == 2 && fds[1].revents != 0) {
    bool watching = false;
    try {
      watching = onReadable_();
    } catch (...) {
    }
    if (!watching) {
      watchedFd_ = -1;
    }
  }
}

} // namespace tcpstore_barrier
