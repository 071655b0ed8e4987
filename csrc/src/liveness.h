// Peer liveness: every rank of this library shows it is alive through the
// store, and a few ranks of each round watch the others.
//
// Each rank's worker adds 1 to `{prefix}/alive/{r}` every interval(), from
// C++, whatever its Python is doing, between barriers too. The reply is also
// how a rank notices that the store host stopped answering. While a rank
// waits in a round, the round's watchers (see RoundProtocol::watches) read
// the counters of the ranks still missing; one whose counter has not moved
// for silenceLimit() is lost. The first watcher to declare a loss writes it
// to `{prefix}/lost` with compareSet, so that every rank names the same
// ranks, then adds a large offset to every member's counter: each rank
// learns of the loss from its next heartbeat's reply.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "protocols.h"
#include "sockets.h"
#include "store_connection.h"

namespace tcpstore_barrier {

// Where a store sits in a tree of stores, as its verdicts need it
// (tree.cpp); the defaults are a flat barrier's.
struct TreePlace {
  // The global ranks each rank at this store stands for (its subtree); a
  // rank not in it stands for itself.
  std::map<int64_t, std::vector<int64_t>> subtrees;
  // A tree's root: a loss declared on it is the tree's verdict.
  bool decides = false;

  bool inTree() const noexcept {
    return decides || !subtrees.empty();
  }
  // `ranks` (of this store) as the sorted global ranks they stand for.
  std::vector<int64_t> globalRanks(const std::vector<int64_t>& ranks) const;
};

struct Alarm {
  enum class Kind { kPeersLost, kStoreSilent, kStoreGone };
  Kind kind;
  std::vector<int64_t> lostRanks;
  std::vector<int64_t> missingRanks;
  // What the store's failure said.
  std::string detail;
  // Declared at a tree's root, or carried from it: the tree's verdict, not
  // one store's view of it.
  bool decided = false;
};

// Decides silence from a counter's successive readings: a rank is silent
// once its counter has not moved for `limit`, timed by this observer's own
// clock from the reading that first showed the value (clocks of other
// hosts are never compared). The one judge of silence: watchers and rank
// 0's close() both use it.
class SilenceTracker {
 public:
  explicit SilenceTracker(std::chrono::milliseconds limit) : limit_(limit) {}

  // Records `value`, read at `now`, of `rank`'s counter; how long it has
  // stood still (zero for a new value).
  Clock::duration stillFor(
      int64_t rank, const std::string& value, Clock::time_point now);
  // Whether it has stood still for the limit.
  bool silent(int64_t rank, const std::string& value, Clock::time_point now) {
    return stillFor(rank, value, now) >= limit_;
  }
  void clear() {
    seen_.clear();
  }

 private:
  struct Seen {
    std::string value;
    Clock::time_point since;
  };
  std::chrono::milliseconds limit_;
  std::map<int64_t, Seen> seen_;
};

// The heartbeat's period and the silence allowed, for a peer timeout (nullopt:
// liveness off, both zero) and a world size.
struct LivenessTiming {
  LivenessTiming(
      std::optional<std::chrono::milliseconds> peerTimeout, int64_t worldSize);
  std::chrono::milliseconds interval{0};
  std::chrono::milliseconds silenceLimit{0};
};

class Liveness {
 public:
  // `connection` is the worker's, used only from tick(); `peerTimeout`
  // nullopt keeps the counter (it also says who is of this library) but
  // sends no heartbeats and watches no one.
  Liveness(
      int64_t rank,
      int64_t worldSize,
      const std::string& prefix,
      std::optional<std::chrono::milliseconds> peerTimeout,
      const RoundProtocol& protocol,
      TreePlace place,
      StoreConnection& connection);

  // The heartbeat's period: a fifth of the peer timeout, stretched so that
  // all ranks together send at most kHeartbeatsPerSecond.
  std::chrono::milliseconds interval() const noexcept {
    return timing_.interval;
  }
  // How long a rank may stay silent: the peer timeout, or two and a half
  // intervals when the world is so large that the interval had to stretch.
  std::chrono::milliseconds silenceLimit() const noexcept {
    return timing_.silenceLimit;
  }
  bool enabled() const noexcept {
    return enabled_;
  }

  // The first heartbeat, on the caller's connection during construction:
  // it registers this rank as one of this library's.
  void announce(StoreConnection& connection, Clock::time_point deadline);

  // One heartbeat, and the round's watch; on the worker thread.
  void tick();

  // In a tree: waits on `watch` (a connection of its own) for the store's
  // `{prefix}/lost`, so that a verdict carried to the store raises the
  // alarm at once, not at the next heartbeat. verdictSet() runs on the
  // worker thread once `watch` has a reply; false once nothing more is
  // awaited.
  void watchVerdicts(StoreConnection& watch, Clock::time_point deadline);
  bool verdictSet();

  void enterRound(int64_t sequence, bool watcher);
  void leaveRound();

  // Readable once an alarm is raised; it stays so.
  int alarmFd() const noexcept {
    return alarmFd_.get();
  }
  // An eventfd posted too when an alarm is raised (at once if one was): a
  // tree's engine sleeps on one for all its levels. It must outlive this.
  void alsoPost(int fd);
  std::optional<Alarm> alarm() const;

  std::string aliveKey(int64_t rank) const;

 private:
  struct Round {
    bool waiting = false;
    bool watcher = false;
    int64_t sequence = 0;
    Clock::time_point since;
  };
  void watch(const Round& round, Clock::time_point deadline);
  void learnMembers(
      const std::vector<int64_t>& ranks, Clock::time_point deadline);
  void declareLoss(
      const std::vector<int64_t>& lost,
      const std::vector<int64_t>& missing,
      Clock::time_point deadline);
  void readDeclaredLoss(Clock::time_point deadline);
  void raise(Alarm alarm);

  int64_t rank_;
  int64_t worldSize_;
  std::string prefix_;
  bool enabled_;
  const LivenessTiming timing_;
  const RoundProtocol& protocol_;
  const TreePlace place_;
  StoreConnection& connection_;
  StoreConnection* verdictWatch_ = nullptr;
  std::string ownAliveKey_;
  UniqueFd alarmFd_;
  std::atomic<int> alsoPostFd_{-1};

  mutable std::mutex mutex_;
  Round round_;
  std::optional<Alarm> alarm_;

  // Worker thread only.
  std::set<int64_t> members_;
  RankKeyCache rankKeys_;
  SilenceTracker silence_;
  int64_t seenSequence_ = -1;
};

// A verdict, in global ranks: ranks lost (Kind::kPeersLost), or a tree's
// root store lost (Kind::kStoreGone: whoever learns it raises
// StoreUnreachableError). `decided`: the tree's, declared at its root.
Alarm peersLostVerdict(
    std::vector<int64_t> lost, std::vector<int64_t> missing, bool decided);
Alarm rootLostVerdict();
// A verdict as a store keeps it under `{prefix}/lost`, and back: the one
// place it is text.
std::string encodeVerdict(const Alarm& verdict);
Alarm decodeVerdict(std::string_view text);
// Writes `verdict` as the store's `{prefix}/lost` unless one is already
// there, and tells `members` (their next heartbeat's reply will carry it);
// returns the verdict the store then holds.
Alarm declareVerdict(
    StoreConnection& connection,
    const std::string& prefix,
    const std::vector<int64_t>& members,
    const Alarm& verdict,
    Clock::time_point deadline);

// `{prefix}/lost`: the verdict a store holds.
std::string lostKeyOf(const std::string& prefix);

// `{prefix}/closed/{r}`: rank r needs nothing more of the store. It says
// so when it closes, when its barrier is destroyed, and when it has learnt
// a verdict of lost peers (after which it never asks the store again).
std::string closedKey(const std::string& prefix, int64_t rank);

// "2,5" and back.
std::string joinRanks(const std::vector<int64_t>& ranks);
std::vector<int64_t> splitRanks(std::string_view text);

} // namespace tcpstore_barrier
