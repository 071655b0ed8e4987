// A barrier over a tree of stores, as MPICH's node-aware barrier
// (barrier_intra_smp.c) composes its own, with each rank's worker as its
// progress engine (as NCCL's proxy thread advances communication while the
// application computes):
//
//   every rank's caller   sets its `in` at its host store and waits for its
//                         `out`, in one send
//   a leader's worker     waits for all its members' `in`, sets its own at
//                         the store above, and so on to the root
//   the root              releases as a flat round does (torch's keys)
//   the leader's worker   sets `out` at each store it leads, top down
//   on a verdict          it decides it at the root and carries it to them
//
// A caller arrives at its host store as a flat rank does at rank 0's:
// arrive(), wait() and `released` mean what they mean flat, whatever any
// leader's caller does meanwhile. Each store is a TCPStoreBarrier of its own
// with its own liveness, so no store serves more than its members.
#pragma once

#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <tcpstore_barrier/tcpstore_barrier.h>

#include "protocols.h"
#include "sockets.h"
#include "store_connection.h"
#include "tree_plan.h"

namespace tcpstore_barrier {
struct Alarm;
}

namespace tcpstore_barrier::detail {

struct BarrierState;

// Keys each store of a tree keeps about itself, under the barrier's
// prefix: its record (as tree_plan.h encodes it), and where the store led
// by its member `m` listens.
std::string treeRecordKey(const std::string& prefix);
std::string treeBelowKey(const std::string& prefix, int64_t member);
// A slow round's diagnosis ("sequence;ranks"), kept up by the leaders'
// engines: the ranks missing below member `m`'s store, said by its leader,
// and the tree's whole list, carried down from the root by each store's.
std::string treeMissingBelowKey(const std::string& prefix, int64_t member);
std::string treeMissingKey(const std::string& prefix);
// The count of ranks that joined a tree over a store given to from_store.
std::string treeJoinedKey(const std::string& prefix);
// Whether the job builds a tree, and whether every rank reached its stores:
// read by every rank while joining, deleted by the last.
std::vector<std::string> treeDecisionKeys(const std::string& prefix);

// Why a tree cannot be built, as every rank of it learnt it.
class TreeUnbuildable : public std::runtime_error {
 public:
  TreeUnbuildable(const std::string& reason, bool decidedHere)
      : std::runtime_error(reason), decidedHere_(decidedHere) {}
  // Whether this rank decided it (the one that says so in the log).
  bool decidedHere() const noexcept {
    return decidedHere_;
  }

 private:
  bool decidedHere_;
};

// A tree that topology="tree" cannot build: names the rank and store that
// cannot be reached, or rank 0 that is not ours.
class TreeError : public c10::DistNetworkError {
 public:
  using c10::DistNetworkError::DistNetworkError;
};

// Builds `outer`'s tree (outer.address: rank 0's store) unless, with
// Topology::kAuto, it cannot be built: rank 0 is not a rank of this library
// (it never says whether to build one), or a member cannot reach its store.
// Then every rank learns the same reason, one of them logs it, and the
// caller goes flat: returns false. With Topology::kTree, throws TreeError.
bool joinTree(
    BarrierState& outer,
    const TreeOptions& options,
    bool registerAsWorker,
    Clock::time_point deadline);

class BarrierTree {
 public:
  // Joins the tree over the store `outer` describes (rank 0's, reachable at
  // `outer.address`): registers this rank's host, reads its place and opens
  // the stores it meets at. `registerAsWorker`: count this rank in c10d's
  // `init/` (a store this library created); otherwise rank 0 counts joiners
  // itself (a store given to from_store).
  BarrierTree(
      BarrierState& outer,
      const TreeOptions& options,
      bool registerAsWorker,
      Clock::time_point deadline);
  ~BarrierTree();

  BarrierTree(const BarrierTree&) = delete;
  BarrierTree& operator=(const BarrierTree&) = delete;

  void execute(Clock::time_point deadline);
  void arrive(Clock::time_point deadline);
  void wait(Clock::time_point deadline);
  bool released();
  // arrive()'s halves, for Python's arrive(): neither runs the loss path
  // (it asks the root), which waits for arrive() without the GIL.
  void sendArrival();
  bool arrivalAnswered(std::chrono::milliseconds patience);

  int64_t sequence() const noexcept;
  int64_t levels() const noexcept {
    return static_cast<int64_t>(levels_.size());
  }
  void setInterruptCheck(std::function<void()> check);
  // Bottom up: a leader's store closes once its members have left it, all
  // levels within one deadline.
  void close(Clock::time_point deadline);
  // The destructor's part, every level's linger within one limit.
  void destroy() noexcept;

 private:
  struct Level {
    TreeStore store;
    int64_t localRank = 0;
    bool root = false;
    std::optional<StoreAddress> address;
    // Where its members reach it, as published (this rank hosting it).
    std::string published;
    std::unique_ptr<TCPStoreBarrier> barrier;
    // A store this rank leads: the worker's connection that waits for its
    // members' `in` and sets `out`.
    std::unique_ptr<StoreConnection> relay;
    // Its members' `in` keys of the round the worker waits for there,
    // rewritten in place each round.
    std::vector<std::string> arrivalKeys;
    // The engine's connection for a slow round's diagnosis (opened by the
    // first), and the `rank{m}` keys it has seen there.
    std::unique_ptr<StoreConnection> probe;
    RankKeyCache probeKeys;
  };

  // Runs `call` on the host store's barrier, turning what it raises into
  // the tree's error.
  template <typename Call>
  void callHost(Call&& call, Clock::time_point deadline);
  TCPStoreBarrier& host() {
    return *levels_.front().barrier;
  }
  void installChecks();
  // Throws OtherLevelAlarm for the first level other than `waiting` that
  // has a verdict.
  void checkOtherLevels(std::size_t waiting) const;
  // The engine's interrupt point: throws EngineStopping once told to stop,
  // else as checkOtherLevels(waiting).
  void checkEngine(std::size_t waiting) const;
  bool anyAlarm() const;

  // The progress engine: the worker's loop, one round of it, and the wait
  // for the barrier it joined at a store this rank leads.
  void runEngine() noexcept;
  void relayRound(int64_t sequence);
  void awaitRelay(std::size_t level, int64_t sequence);
  // Once a round is slow, every kMissingRefresh: says at the store above
  // each store this rank leads (from `waiting`, the one its engine waits
  // at, up) what is missing below it, and carries the tree's whole list
  // down to every store it leads.
  void reportMissing(std::size_t waiting, int64_t sequence);
  StoreConnection& probe(Level& level, Clock::time_point deadline);
  Clock::time_point deadlineFromNow() const;
  void stopEngine() noexcept;
  // Runs after the engine has stopped: what the caller learnt (a verdict,
  // a timeout) marks every level, for close() and the linger.
  void markLevels();

  // A loss learnt at `level`: decided at the root and carried to every
  // store of this rank; returns the verdict as the root holds it.
  // `detail`: what the level's store failure said, if it failed.
  Alarm decideLoss(std::size_t level, const std::string& detail);
  // The caller's end of a loss: decided, carried, raised.
  [[noreturn]] void lose(std::size_t level, const std::string& detail = {});
  // The host store's round timed out (`e`): the tree's error, naming
  // what the tree is missing.
  [[noreturn]] void throwTimeout(
      const BarrierTimeoutError& e, Clock::time_point deadline);
  std::optional<Alarm> decideAtRoot(const Alarm& proposal);
  void carryVerdict(const Alarm& verdict, std::optional<std::size_t> skip);
  // The ranks below `level`'s store that have not entered round
  // `sequence`, read on `connection`: its members that have not arrived,
  // each standing for what its leader said is missing below it (its whole
  // subtree if it said nothing).
  std::vector<int64_t> missingAt(
      const Level& level,
      StoreConnection& connection,
      RankKeyCache& cache,
      int64_t sequence,
      Clock::time_point deadline) const;
  // What a timed-out caller names: the tree's list as its host store holds
  // it (computed, if that store is the root); nullopt if it did not come
  // within `deadline`.
  std::optional<std::vector<int64_t>> treeMissing(Clock::time_point deadline);
  // The alive counters at a level's store (the root's: its members').
  std::vector<int64_t> levelMembers(const Level& level) const;
  std::string releaseKey() const;
  // How long a store of the tree may leave a request unanswered before it
  // is taken for lost.
  std::chrono::milliseconds silenceLimit() const;
  // The error a verdict raises from this tree; a store's failure names
  // `storeHost` lost (rank 0 for the root of a store this library made).
  std::exception_ptr treeError(
      const Alarm& verdict, std::vector<int64_t> storeHost) const;
  // Remembers `error` for every later call, and raises it.
  [[noreturn]] void endWith(std::exception_ptr error);
  void checkUsable() const;

  BarrierState& outer_;
  // The address this rank reaches rank 0's store from.
  std::string localAddress_;
  // Posted by stopEngine() and by every level's alarm: the engine sleeps on
  // it between its reports instead of waking to look. Declared before
  // levels_, whose liveness posts it, so that it outlives them.
  UniqueFd engineWake_;
  // Bottom up: the host store first, the root (if this rank meets there)
  // last. A rank leads every level but its last.
  std::vector<Level> levels_;
  // The caller thread's: set by close() or an error, read by every call.
  std::function<void()> userCheck_;
  std::exception_ptr lost_;
  bool timedOut_ = false;
  // The engine's thread, on a rank that leads a store; it owns the
  // barriers of levels_[1...] and every level's `relay`.
  std::atomic<bool> engineStopping_{false};
  std::thread engine_;
  // The engine's: when it next says what a slow round is missing.
  Clock::time_point nextReport_;
};

} // namespace tcpstore_barrier::detail
