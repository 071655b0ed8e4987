// What the Python bindings need of the core beyond its public header (the
// GIL policy's split arrival, the shared argument checks), and what a tree
// needs of the barriers it composes (a deadline shared by all its steps,
// a level's alarm).
#pragma once

#include <chrono>
#include <memory>
#include <optional>

#include <tcpstore_barrier/tcpstore_barrier.h>

#include "arguments.h"

namespace tcpstore_barrier {
struct Alarm;
}

namespace tcpstore_barrier::detail {

// arrive() in two halves, so that a Python caller can wait for the store's
// answer to its arrival without giving up the GIL, then finish it with
// arrive().
struct BarrierAccess {
  static void sendArrival(TCPStoreBarrier& barrier);
  static bool arrivalAnswered(
      TCPStoreBarrier& barrier, std::chrono::milliseconds patience);

  static std::unique_ptr<TCPStoreBarrier> make(
      std::unique_ptr<BarrierState> state);
  static void executeUntil(
      TCPStoreBarrier& barrier, std::chrono::steady_clock::time_point deadline);
  static void arriveUntil(
      TCPStoreBarrier& barrier, std::chrono::steady_clock::time_point deadline);
  static void waitUntil(
      TCPStoreBarrier& barrier, std::chrono::steady_clock::time_point deadline);
  static std::optional<Alarm> alarm(const TCPStoreBarrier& barrier);
  static BarrierState& state(TCPStoreBarrier& barrier) {
    return *barrier.state_;
  }
};

} // namespace tcpstore_barrier::detail
