// What the Python bindings need of the core beyond its public header: the
// GIL policy's split arrival, and the shared argument checks.
#pragma once

#include <chrono>

#include <tcpstore_barrier/tcpstore_barrier.h>

#include "arguments.h"

namespace tcpstore_barrier::detail {

// arrive() in two halves, so that a Python caller can wait for the store's
// answer to its arrival without giving up the GIL, then finish it with
// arrive().
struct BarrierAccess {
  static void sendArrival(TCPStoreBarrier& barrier);
  static bool arrivalAnswered(
      TCPStoreBarrier& barrier, std::chrono::milliseconds patience);
};

} // namespace tcpstore_barrier::detail
