#include "worker.h"

#include <memory>
#include <utility>

namespace tcpstore_barrier {
namespace {

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
    : interval_(interval),
      tick_(std::move(tick)),
      interrupt_(std::move(interrupt)),
      thread_(&Worker::run, this) {}

Worker::~Worker() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  if (interrupt_) {
    interrupt_();
  }
  thread_.join();
}

void Worker::post(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_.push_back(std::move(job));
  }
  changed_.notify_all();
}

std::size_t Worker::backlog() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return jobs_.size() + running_;
}

bool Worker::runBefore(std::function<void()> job, Clock::time_point deadline) {
  struct Done {
    std::mutex mutex;
    std::condition_variable changed;
    bool done = false;
  };
  auto done = std::make_shared<Done>();
  post([job = std::move(job), done] {
    job();
    std::lock_guard<std::mutex> lock(done->mutex);
    done->done = true;
    done->changed.notify_all();
  });
  std::unique_lock<std::mutex> lock(done->mutex);
  return done->changed.wait_until(lock, deadline, [&] { return done->done; });
}

void Worker::run() {
  auto nextTick = Clock::now();
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    if (tick_ && Clock::now() >= nextTick) {
      lock.unlock();
      runQuietly(tick_);
      lock.lock();
      nextTick = Clock::now() + interval_;
      continue;
    }
    if (jobs_.empty()) {
      const auto wake = [&] { return stopping_ || !jobs_.empty(); };
      if (tick_) {
        changed_.wait_until(lock, nextTick, wake);
      } else {
        changed_.wait(lock, wake);
      }
      continue;
    }
    auto job = std::move(jobs_.front());
    jobs_.pop_front();
    running_ = 1;
    lock.unlock();
    runQuietly(job);
    lock.lock();
    running_ = 0;
  }
}

} // namespace tcpstore_barrier
