// A background thread that runs posted jobs in order, and a periodic tick
// between them. It knows nothing of barriers: liveness gives it the tick,
// housekeeping gives it jobs.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

namespace tcpstore_barrier {

class Worker {
 public:
  using Clock = std::chrono::steady_clock;

  // `tick` (if set) runs every `interval`; `interrupt` is called from the
  // destructor to cut short whatever the thread is blocked in.
  Worker(
      std::chrono::milliseconds interval,
      std::function<void()> tick,
      std::function<void()> interrupt);
  // Stops and joins the thread; idempotent. Owners stop it before they
  // release what its jobs use: a job may still read its owner's members
  // (the worker's own pointer among them) until the thread has joined.
  void stop();
  ~Worker();

  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  void post(std::function<void()> job);
  // Runs `job` no earlier than `notBefore`; jobs due run in posting order.
  void postAt(std::function<void()> job, Clock::time_point notBefore);

 private:
  void run();

  std::chrono::milliseconds interval_;
  std::function<void()> tick_;
  std::function<void()> interrupt_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  struct Job {
    std::function<void()> run;
    Clock::time_point notBefore;
  };
  std::deque<Job> jobs_;
  bool stopping_ = false;
  bool stopped_ = false;
  std::thread thread_;
};

} // namespace tcpstore_barrier
