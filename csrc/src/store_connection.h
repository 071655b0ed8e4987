// One connection to the store, with a deadline on every call.
//
// The barrier talks to the store through this interface only. Its main
// implementation speaks TCPStore's wire protocol on a socket of our own
// (wire_connection.cpp): c10d's client has no receive deadline, cannot be
// interrupted, and logs a warning each time a wait times out. Stores that
// are not TCPStores go through c10d's Store API (c10d_connection.cpp), with
// only the guarantees that store gives.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "sockets.h"

namespace tcpstore_barrier {

using Clock = std::chrono::steady_clock;

// How often a blocked call stops to run its interrupt check (the caller's:
// Python's signal handlers): well under the half second in which a Ctrl-C
// must be acted on. The check is local.
inline constexpr std::chrono::milliseconds kInterruptSlice{100};

// The store did not serve a request: `silent` when no reply came by the
// deadline (a frozen host, a partition), else the connection failed (the
// host is gone). The stream is then out of step and the connection unusable.
class StoreUnavailable : public std::runtime_error {
 public:
  StoreUnavailable(const std::string& what, bool silent)
      : std::runtime_error(what), silent_(silent) {}
  bool silent() const noexcept {
    return silent_;
  }

 private:
  bool silent_;
};

class StoreConnection {
 public:
  virtual ~StoreConnection() = default;

  // Requests without a reply wait in a buffer and leave with the next
  // request that has one (or flush()): one send, served in order.
  virtual void set(std::string_view key, std::string_view value) = 0;
  virtual void flush(Clock::time_point deadline) = 0;

  int64_t add(std::string_view key, int64_t delta, Clock::time_point deadline) {
    sendAdd(key, delta, deadline);
    return readAdd(deadline);
  }

  // add() in two halves, so that a caller can do something else while the
  // reply travels: sendAdd(), then replyReady() until true, then readAdd().
  virtual void sendAdd(
      std::string_view key, int64_t delta, Clock::time_point deadline) = 0;
  virtual bool replyReady(Clock::time_point until) = 0;
  virtual int64_t readAdd(Clock::time_point deadline) = 0;

  // Adds `delta` to each of `keys` in one round trip.
  virtual void addEach(
      const std::vector<std::string>& keys,
      int64_t delta,
      Clock::time_point deadline) = 0;

  // Whether every one of `keys` exists.
  virtual bool check(
      const std::vector<std::string>& keys, Clock::time_point deadline) = 0;
  // Whether each of `keys` exists, in one round trip.
  virtual std::vector<bool> checkEach(
      const std::vector<std::string>& keys, Clock::time_point deadline) = 0;
  // The values of `keys`, which must all exist.
  virtual std::vector<std::string> multiGet(
      const std::vector<std::string>& keys, Clock::time_point deadline) = 0;
  // Deletes each of `keys` in one round trip; whether each existed.
  virtual std::vector<bool> deleteEach(
      const std::vector<std::string>& keys, Clock::time_point deadline) = 0;
  // Sets `key` to `desired` if its value is `expected` (empty: missing);
  // returns the value it then has.
  virtual std::string compareSet(
      std::string_view key,
      std::string_view expected,
      std::string_view desired,
      Clock::time_point deadline) = 0;

  // Starts waiting for `key` to be set, or joins the server-side barrier on
  // `key`; awaitRelease() then reports the release. Until it has, only
  // set() may be used on this connection.
  virtual void startWait(std::string_view key, Clock::time_point deadline) = 0;
  virtual void startServerBarrier(
      std::string_view key, int64_t worldSize, Clock::time_point deadline) = 0;
  // Starts waiting until every one of `keys` is set, in one request (a
  // relay store's leader waiting for its members' arrivals).
  virtual void startWaitAll(
      const std::vector<std::string>& keys, Clock::time_point deadline) = 0;
  // True once released; false at `until`, or as soon as `alarmFd` (if not
  // -1) becomes readable.
  virtual bool awaitRelease(Clock::time_point until, int alarmFd) = 0;

  // Whether no reply is due on this connection: nothing sent is still
  // unanswered (an arrival or a wait cut short leaves one due), so that a
  // new request's reply cannot be mistaken for an older one's.
  virtual bool idle() const noexcept = 0;

  // Makes a call blocked in another thread fail at once (for shutdown).
  virtual void abort() noexcept = 0;

  // "the store at host:port", for messages.
  virtual const std::string& describe() const = 0;

  // The address this host uses to reach the store; empty if unknown.
  // A descriptor that becomes readable when a reply arrives; -1 if none.
  virtual int pollFd() const noexcept {
    return -1;
  }
  virtual std::string localAddress() const {
    return {};
  }
  // The store's address this connection reached; empty if unknown.
  virtual std::string peerAddress() const {
    return {};
  }
};

// What `e` says, without the C++ backtrace a c10 error appends to what().
const char* withoutBacktrace(const std::exception& e);

// Where a wire connection goes.
struct StoreAddress {
  std::string host;
  uint16_t port = 0;
  // Put before every key: c10d's own "/" and those of PrefixStores.
  std::string keyPrefix = "/";
  // More addresses of the same server, tried in order after `host`.
  std::vector<std::string> otherHosts = {};
};

// Connects, retrying a refused connection until `deadline`, and checks that
// the server answers. The kernel gives up on the connection once data sent
// has gone unacknowledged for `stallLimit` (TCP_USER_TIMEOUT): the silence
// the barrier allows, so a stall it would wait out never kills the socket.
// `interruptCheck`, if set, runs between slices of every blocking call.
std::unique_ptr<StoreConnection> openWireConnection(
    const StoreAddress& address,
    Clock::time_point deadline,
    std::chrono::milliseconds stallLimit,
    std::function<void()> interruptCheck = nullptr,
    Refused refused = Refused::kRetry);

// Counts this client in TCPStore's `init/` key, as every c10d client that
// knows the world size does, so that a host waiting for its workers (ours
// or torch's) sees it.
void registerWorker(StoreConnection& connection, Clock::time_point deadline);

// Waits, as c10d's host does, until `worldSize` clients (itself included)
// have registered; throws c10::DistStoreError at `deadline`. c10d's own
// wait counts whole seconds, and so overran a deadline by up to one.
void awaitWorkers(
    StoreConnection& connection, int64_t worldSize, Clock::time_point deadline);

// Waits until the counter `key` (added to by each joiner) reaches `count`;
// throws c10::DistStoreError at `deadline`.
void awaitCount(
    StoreConnection& connection,
    const std::string& key,
    int64_t count,
    Clock::time_point deadline);

// The TCPStore (host, port and key prefix) under `store` and its
// PrefixStores, if that is what it is.
std::optional<StoreAddress> wireAddressOf(const c10d::Store& store);

// A connection through c10d's Store API, for any other store.
std::unique_ptr<StoreConnection> openC10dConnection(
    c10::intrusive_ptr<c10d::Store> store);

} // namespace tcpstore_barrier
