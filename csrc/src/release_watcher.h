#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace tcpstore_barrier {

// Waits for a round's release on a thread and store connection of its own.
//
// c10d's blocking wait cannot be interrupted (it retries poll() on EINTR)
// and logs a warning each time a wait times out, so waiting in short slices
// to let a caller act on Ctrl-C would flood the log. Instead the calling
// thread blocks on a condition variable, which it can leave at any moment,
// while this thread holds the one long store wait. Its own connection also
// lets the caller use the store (e.g. to name missing ranks) meanwhile.
class ReleaseWatcher {
 public:
  using Clock = std::chrono::steady_clock;
  enum class Status { kIdle, kWatching, kReleased, kExpired, kFailed };
  enum class Kind {
    // Wait for a key to be set (torch's protocol: `last_member`).
    kKey,
    // Arrive with TCPStore's server-side BARRIER request on `key`, once.
    kServerBarrier,
  };

  explicit ReleaseWatcher(c10::intrusive_ptr<c10d::Store> store);
  ~ReleaseWatcher();

  ReleaseWatcher(const ReleaseWatcher&) = delete;
  ReleaseWatcher& operator=(const ReleaseWatcher&) = delete;

  // Starts watching `key` until `deadline`, unless that key is already
  // being watched until at least then. Returns at once. For kServerBarrier
  // the first watch of a key is this rank's arrival at it.
  // `arrival`, if given, runs first on the watcher's connection: this
  // rank's arrival, returning whether it released the round.
  void watch(
      const std::string& key,
      Clock::time_point deadline,
      Kind kind = Kind::kKey,
      int64_t worldSize = 0,
      std::function<bool(c10d::Store&)> arrival = nullptr);

  // Blocks until the arrival handed over with watch() has reached the
  // store, or `until`; true if it has. Rethrows the arrival's failure.
  bool awaitArrival(Clock::time_point until);

  // Blocks until the watched key is released, the watch ends, or `until`.
  Status waitUntil(Clock::time_point until);

  Status status() const;

  // Records that this rank's BARRIER request for `key` was already sent
  // (and cancelled), so that watching it must not send another.
  void markJoined(const std::string& key);

  // Forgets a finished watch so that the next round can start one.
  void reset();

  // Runs `job` on the watcher's thread and connection, after any watch
  // that is already pending: store housekeeping kept off the caller's path.
  void runInBackground(std::function<void(c10d::Store&)> job);

  // How many background jobs are queued or running.
  std::size_t backgroundJobs() const;

  std::exception_ptr failure() const;

 private:
  struct State;
  static void run(std::shared_ptr<State> state);
  static void waitForRelease(
      State& state,
      const std::vector<std::string>& key,
      Clock::time_point deadline);

  std::shared_ptr<State> state_;
  std::thread thread_;
};

} // namespace tcpstore_barrier
