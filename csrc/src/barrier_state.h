// Everything one TCPStoreBarrier holds, shared by the files that implement
// it: construction.cpp (joining the store), tcpstore_barrier.cpp (a round),
// housekeeping.cpp (finished rounds' keys, close()).
#pragma once

#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include <tcpstore_barrier/tcpstore_barrier.h>

#include "binding_support.h"
#include "liveness.h"
#include "protocols.h"
#include "store_connection.h"
#include "worker.h"

namespace tcpstore_barrier::detail {

// Finished rounds waiting for their keys to be deleted (housekeeping.cpp):
// written by the caller as rounds complete, read by the worker.
struct DeleteQueue {
  std::mutex mutex;
  // The newest round of each batch this rank is to delete.
  std::deque<int64_t> batches;
  bool scheduled = false;
  bool urgent = false;
  Clock::time_point lastRound;
  int64_t completed = 0;
};

struct BarrierState {
  int64_t rank = 0;
  int64_t worldSize = 1;
  std::string prefix;
  std::chrono::milliseconds timeout{0};
  std::chrono::milliseconds initTimeout{0};
  std::optional<std::chrono::milliseconds> peerTimeout;
  Protocol protocolKind = Protocol::kTorch;
  bool usesLibUV = false;
  // Created by this object (not from_store): close() does the handshake.
  bool ownsStore = false;
  bool hostsStore = false;
  // Where the wire connections go; empty for a store that is no TCPStore.
  std::optional<StoreAddress> address;
  // The c10d store: rank 0's server, from_store's, or a client on demand.
  c10::intrusive_ptr<c10d::Store> store;
  std::function<void()> interruptCheck;

  std::unique_ptr<RoundProtocol> protocol;
  // The caller's connection, and the worker's.
  std::unique_ptr<StoreConnection> connection;
  std::unique_ptr<StoreConnection> background;
  std::unique_ptr<Liveness> liveness;
  DeleteQueue deletes;
  // Last, so that it stops first: its thread uses everything above.
  std::unique_ptr<Worker> worker;

  int64_t sequence = 0;
  bool arrivalSent = false;
  bool arrived = false;
  bool released = false;
  bool slowNoted = false;
  Arrival arrival;
  // Set once a peer or the store is lost: every later call raises it.
  std::exception_ptr lost;
  bool storeUnreachable = false;
  bool closed = false;

  void runInterruptCheck() const {
    if (interruptCheck) {
      interruptCheck();
    }
  }
  std::string describeStore() const {
    return connection ? connection->describe() : std::string("the store");
  }
};

// housekeeping.cpp
void deleteFinishedRounds(BarrierState& state);
void closeBarrier(BarrierState& state);

// tcpstore_barrier.cpp: the error for a store that failed mid-call.
[[noreturn]] void throwStoreUnreachable(
    BarrierState& state, const std::string& what);

} // namespace tcpstore_barrier::detail
