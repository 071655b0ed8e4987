// Everything one TCPStoreBarrier holds, shared by the files that implement
// it: construction.cpp (joining the store), tcpstore_barrier.cpp (a round),
// housekeeping.cpp (finished rounds' keys), close.cpp (leaving the store).
//
// Who owns what. The caller thread (the one calling the barrier's methods)
// alone reads and writes `phase`, `sequence`, `round`, `arrival`,
// `slowNoted`, `lost`, the caller's `connection` and the diagnosis
// connection with its rank-key cache. The worker thread alone uses
// `background` (through liveness ticks and delete jobs); `deletes` is
// shared under its mutex, and Liveness guards its own alarm. The protocol
// is a const description of the keys, read by both.
//
// The phases of the caller, and what moves between them:
//
//   kBetweenRounds --arrive()--> kArrivalSent --arrival answered--> kWaiting
//   kWaiting --release seen--> kReleased --wait() completes--> kBetweenRounds
//   (an arrival that releases the round goes straight to kReleased)
//
// A timeout or an interrupt leaves the phase as it is, so the next call
// resumes the same round: in kArrivalSent the arrival's reply, and in
// kWaiting the release, are still due on the caller's connection. A lost
// peer or store moves any phase to kLost (`lost` holds the error, raised by
// every later call); close() or destruction moves any phase to kClosed.
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
#include "tree.h"
#include "worker.h"

namespace tcpstore_barrier::detail {

// How long a timed-out round may spend naming its missing ranks (in a tree,
// across the tree, its own store's attempt included): every call returns
// within its deadline plus a second.
inline constexpr std::chrono::milliseconds kDiagnosisBudget{900};

enum class Phase {
  kBetweenRounds,
  kArrivalSent,
  kWaiting,
  kReleased,
  kLost,
  kClosed,
};

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
  // As given.
  int64_t rank = 0;
  int64_t worldSize = 1;
  std::string prefix;
  std::chrono::milliseconds timeout{0};
  std::chrono::milliseconds initTimeout{0};
  std::optional<std::chrono::milliseconds> peerTimeout;
  Protocol protocolKind = Protocol::kTorch;
  // A store below a tree's root: its rounds are released by its leader's
  // worker (makeRelayProtocol).
  bool relayRounds = false;
  bool usesLibUV = false;
  // Created by this object (not from_store): close() does the handshake.
  bool ownsStore = false;
  bool hostsStore = false;
  // Where the wire connections go; empty for a store that is no TCPStore.
  std::optional<StoreAddress> address;
  // The c10d store: rank 0's server, from_store's, or a client on demand.
  c10::intrusive_ptr<c10d::Store> store;
  // A tree level's share of the server its process runs for the tree's
  // stores (construction.cpp): the server stops when the last share goes.
  std::shared_ptr<const void> treeServer;
  // The store outlives the barrier (from_store, or a tree's root over
  // one): a clean close() leaves nothing of the barrier in it (close.cpp).
  bool storeOutlives = false;
  // The one interrupt point: every blocking wait of the caller thread runs
  // it between slices (through runInterruptCheck()).
  std::function<void()> interruptCheck;

  // Who arrives in this barrier's rounds, and where its store sits in a
  // tree (a level of one), or flat.
  RoundShape shape;
  TreePlace place;
  // Deleting finished rounds goes round the ranks that arrive at this
  // store: this rank's turn among how many (housekeeping.cpp).
  struct {
    int64_t mine = 0;
    int64_t count = 1;
  } turns;
  // A tree's rounds run through the levels it holds; nothing below but the
  // fields above it and `address`/`store` (rank 0's store) is used then.
  std::unique_ptr<BarrierTree> tree;

  std::unique_ptr<const RoundProtocol> protocol;
  // The caller's connection, and the worker's.
  std::unique_ptr<StoreConnection> connection;
  std::unique_ptr<StoreConnection> background;
  // Opened at the first timeout, to name the missing ranks while the
  // caller's connection still awaits the release and the worker may be
  // busy.
  std::unique_ptr<StoreConnection> diagnosis;
  RankKeyCache diagnosisRankKeys;
  // A store of a tree: the worker's wait for a verdict (Liveness).
  std::unique_ptr<StoreConnection> verdictWatch;
  std::unique_ptr<Liveness> liveness;
  DeleteQueue deletes;
  // Last, so that it stops first: its thread uses everything above.
  std::unique_ptr<Worker> worker;

  Phase phase = Phase::kBetweenRounds;
  int64_t sequence = 0;
  RoundKeys round;
  Arrival arrival;
  // The round has waited kSlowRound and said so (noteSlowRound).
  bool slowNoted = false;
  // The last call ended in a BarrierTimeoutError (not an interrupt): the
  // other ranks are likely timing out too, and need the store to say who
  // is missing (close.cpp).
  bool timedOut = false;
  // The error of kLost.
  std::exception_ptr lost;

  void runInterruptCheck() const {
    if (interruptCheck) {
      interruptCheck();
    }
  }
  // This rank has counted itself into the current round.
  bool arrived() const noexcept {
    return phase == Phase::kWaiting || phase == Phase::kReleased;
  }
  // The store host is gone: nothing more is asked of the store.
  bool storeLost() const;
  // How long a store connection may go unanswered: the silence liveness
  // allows, or with liveness off the round's own time limit.
  std::chrono::milliseconds stallLimit() const;
  std::string describeStore() const {
    return connection ? connection->describe() : std::string("the store");
  }
};

// housekeeping.cpp
void deleteFinishedRounds(BarrierState& state);

// construction.cpp: the error for a barrier_prefix another barrier still
// holds on a store that outlives its barriers (`evidence`: what shows it).
[[noreturn]] void throwPrefixInUse(
    const BarrierState& state, const std::string& evidence);

// construction.cpp: a store of a tree, and a level's barrier on it.
// Hosts a c10d::TCPStore listening on `address` only (port 0: any free).
c10::intrusive_ptr<c10d::Store> hostStore(
    const std::string& address,
    uint16_t port,
    int64_t workers,
    std::chrono::milliseconds timeout,
    bool useLibUV);
// A store for one level of a tree: a key prefix of its own on the one
// server this process runs for the stores of `tree` (its root's address
// and prefix) on `address`.
struct TreeStoreHost {
  c10::intrusive_ptr<c10d::Store> server;
  // Keeps the server running; the process's registry of servers holds
  // none, so the server stops with its tree.
  std::shared_ptr<const void> share;
  StoreAddress address;
};
TreeStoreHost hostTreeStore(
    const std::string& tree,
    const std::string& address,
    bool useLibUV,
    std::chrono::milliseconds timeout);
struct LevelSpec {
  int64_t rank = 0;
  int64_t worldSize = 1;
  std::string prefix;
  std::chrono::milliseconds timeout{0};
  std::optional<std::chrono::milliseconds> peerTimeout;
  Protocol protocol = Protocol::kNative;
  bool relayRounds = false;
  RoundShape shape;
  TreePlace place;
  StoreAddress address;
  // Set on the rank that hosts the level's store.
  c10::intrusive_ptr<c10d::Store> server;
  std::shared_ptr<const void> serverShare;
  // The store is not the tree's own (a tree's root given to from_store).
  bool storeOutlives = false;
  bool usesLibUV = true;
  // The host waits until every member has joined (not at the root, whose
  // joiners were counted already). Counted under the level's key prefix:
  // c10d's `init/` count is the whole server's.
  bool awaitMembers = true;
};
std::unique_ptr<TCPStoreBarrier> openLevel(
    LevelSpec spec, Clock::time_point deadline);

// close.cpp
// A host waits for its peers to close until `deadline` (a tree's levels
// share one).
void closeBarrier(BarrierState& state, Clock::time_point deadline);
// The destructor's part: close() without waiting for peers, except that a
// host whose round ended in an error keeps the store up a little while for
// the survivors (see close.cpp), until `lingerUntil` if given (a tree's
// levels share one limit).
void destroyBarrier(
    BarrierState& state,
    std::optional<Clock::time_point> lingerUntil = std::nullopt) noexcept;
// How long a destroyed host lingers after an error.
std::chrono::milliseconds lingerLimit(const BarrierState& state);

// tcpstore_barrier.cpp: the error for a store that failed mid-call.
[[noreturn]] void throwStoreUnreachable(
    BarrierState& state, const std::string& what);

} // namespace tcpstore_barrier::detail
