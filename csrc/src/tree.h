// A barrier over a tree of stores, composed of the flat round as MPICH's
// node-aware barrier composes its own (barrier_intra_smp.c): each rank takes
// part in the rounds of the stores it meets at, bottom up, and the release
// comes back down through the same stores:
//
//   host store:   everyone on the host arrives      (round 2s)
//   group stores: the leaders arrive, level by level (round 2s)
//   root:         the top leaders count their subtrees in (round s)
//   group stores: the release, level by level down   (round 2s+1)
//   host store:   the release to the host's ranks    (round 2s+1)
//
// Each step is a TCPStoreBarrier of its own on its store, with its own
// liveness, so no store serves more than its members. What the tree adds:
// the plan (tree_plan.h), one deadline for all the steps, and verdicts that
// cross stores: a loss seen at any store is decided once at the root and
// carried to every store.
#pragma once

#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <tcpstore_barrier/tcpstore_barrier.h>

#include "store_connection.h"
#include "tree_plan.h"

namespace tcpstore_barrier {
struct Alarm;
}

namespace tcpstore_barrier::detail {

struct BarrierState;

// Keys each store of a tree keeps about itself, under the barrier's
// prefix: its record (as tree_plan.h encodes it), and where the store led
// by its member `m` listens. Timeouts walk down the tree through them.
std::string treeRecordKey(const std::string& prefix);
std::string treeBelowKey(const std::string& prefix, int64_t member);
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
  // The first step's halves, for Python's arrive().
  void sendArrival();
  bool arrivalAnswered(std::chrono::milliseconds patience);

  int64_t sequence() const noexcept {
    return sequence_;
  }
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
  };

  // Runs `step` on the current step's barrier, turning what a level
  // raises into the tree's error.
  template <typename Step>
  void runStep(Step&& step, Clock::time_point deadline);
  void runSteps(Clock::time_point deadline);
  Level& currentLevel() {
    return levels_[steps_[step_]];
  }
  void installChecks();
  // Throws for the first level other than `waiting` that has a verdict.
  void checkOtherLevels(std::size_t waiting) const;
  // A loss learnt at `level`: decided at the root, carried to every store
  // of this rank, raised.
  // `detail`: what the level's store failure said, if it failed.
  [[noreturn]] void lose(std::size_t level, const std::string& detail = {});
  [[noreturn]] void throwTimeout(
      std::size_t level,
      const BarrierTimeoutError& e,
      Clock::time_point deadline);
  std::optional<std::string> decideAtRoot(const std::string& proposal);
  void carryVerdict(
      const std::string& verdict, std::optional<std::size_t> skip);
  // The ranks below the store at `address` (and its members) that have not
  // entered this round, walking down through the stores where some are
  // missing.
  std::vector<int64_t> missingBelow(
      const StoreAddress& address, bool root, Clock::time_point deadline);
  // The alive counters at a level's store (the root's: its members').
  std::vector<int64_t> levelMembers(const Level& level) const;
  std::string releaseKey() const;
  // The error a verdict raises from this tree; a store's failure names
  // `storeHost` lost (rank 0 for the root of a store this library made).
  std::exception_ptr treeError(
      const Alarm& verdict, std::vector<int64_t> storeHost) const;
  // Marks every level lost with `error` and raises it.
  [[noreturn]] void endWith(std::exception_ptr error);
  void checkUsable() const;

  BarrierState& outer_;
  // The address this rank reaches rank 0's store from.
  std::string localAddress_;
  std::vector<Level> levels_;
  // Indices into levels_, in the order of a round's steps.
  std::vector<std::size_t> steps_;
  std::size_t step_ = 0;
  int64_t sequence_ = 0;
  std::function<void()> userCheck_;
  std::exception_ptr lost_;
};

} // namespace tcpstore_barrier::detail
