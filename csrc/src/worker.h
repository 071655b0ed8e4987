// A background thread that runs posted jobs in order, a periodic tick
// between them, and a callback whenever a watched descriptor is readable.
// It knows nothing of barriers: liveness gives it the tick and the watch,
// housekeeping gives it jobs.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include "sockets.h"

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
  // Also runs `onReadable` whenever `fd` is readable, until it returns
  // false (it must read what made `fd` readable).
  Worker(
      std::chrono::milliseconds interval,
      std::function<void()> tick,
      std::function<void()> interrupt,
      int fd,
      std::function<bool()> onReadable);
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
  // Sleeps until `wake`, a post, a stop, or the watched descriptor.
  void sleepUntil(Clock::time_point wake);
  // Wakes the thread wherever it sleeps.
  void wake() noexcept;

  std::chrono::milliseconds interval_;
  std::function<void()> tick_;
  std::function<void()> interrupt_;
  int watchedFd_ = -1;
  std::function<bool()> onReadable_;
  // With a watched descriptor the thread sleeps in poll(): this is written
  // on every post and on stop to wake it. Without one it sleeps on changed_.
  UniqueFd wakeFd_;
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
