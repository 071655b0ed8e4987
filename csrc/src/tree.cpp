#include "tree.h"

#include <unistd.h>

#include <algorithm>
#include <stdexcept>

#include <c10/util/Logging.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "addresses.h"
#include "arguments.h"
#include "barrier_state.h"
#include "binding_support.h"
#include "liveness.h"
#include "sockets.h"

namespace tcpstore_barrier::detail {
namespace {

constexpr std::string_view kTreeInfix = "/tree/";
constexpr std::chrono::milliseconds kMinDiagnosis{100};
// A verdict's trip to the root, and to each store this rank meets at, is
// bounded by the silence liveness allows a store (BarrierState::
// stallLimit()), never by a constant of ours: a root that stalls for less
// is slow, not lost, and still decides the one verdict.
// How long a member tries to reach its store while joining before the tree
// is given up (auto) or fails (tree): its leader listens before it
// publishes the address, so what is refused or unanswered that long is not
// reachable from here.
constexpr std::chrono::milliseconds kStoreReach{5000};
// How long a rank of "auto" waits for rank 0 to say whether the job builds
// a tree: rank 0 of ours says so as soon as it reaches the store, torch's
// never does. ("tree" waits out its deadline.)
constexpr std::chrono::milliseconds kDecisionWait{5000};
constexpr std::string_view kTreeDecided = "tree";

// Thrown from a level's interrupt check when another level of this rank
// has a verdict: the round waiting at one store must not outlive a loss
// learnt at another. Not a std::exception, so that nothing on the way
// mistakes it for a store's failure.
struct OtherLevelAlarm {
  std::size_t level;
};
// The engine is told to stop (close, destruction): it unwinds through
// whatever it was waiting in.
struct EngineStopping {};
// A request of the engine's failed at a level.
struct EngineAt {
  std::size_t level;
};
// The engine's waits end with the barrier, not with a caller's deadline.
// At a store it leads it sleeps until a stop or a verdict posts
// engineWake_ or a report is due, and never less than a slice.
constexpr std::chrono::hours kEngineHorizon{24 * 365 * 10};
constexpr std::chrono::milliseconds kEngineSlice{50};
constexpr std::string_view kReleased = "1";
// A slow round's diagnosis: the engine says what is missing every
// kMissingRefresh once the round has waited a quarter of the call's
// timeout (kMissingStart at most), and every kIdleRecheck while nobody
// below it has arrived (between checkpoints, say).
// A timed-out caller polls its store for the list every kMissingPoll.
constexpr std::chrono::milliseconds kMissingStart{500};
constexpr std::chrono::milliseconds kMissingRefresh{200};
constexpr std::chrono::milliseconds kIdleRecheck{1000};
constexpr std::chrono::milliseconds kMissingPoll{20};

std::string treeKey(
    const std::string& prefix, std::string_view what, int64_t id) {
  std::string key = prefix;
  key.append(kTreeInfix).append(what).push_back('/');
  appendDecimal(key, id);
  return key;
}

std::string treeKey(const std::string& prefix, std::string_view what) {
  std::string key = prefix;
  key.append(kTreeInfix).append(what);
  return key;
}

// "sequence;ranks": what a slow round is missing, and its parse (nullopt
// unless it is round `sequence`'s).
std::string missingText(int64_t sequence, const std::vector<int64_t>& ranks) {
  std::string text;
  appendDecimal(text, sequence);
  text.push_back(';');
  text.append(encodeRanks(ranks));
  return text;
}

std::optional<std::vector<int64_t>> missingOfRound(
    std::string_view text, int64_t sequence) {
  const auto semicolon = text.find(';');
  if (semicolon == std::string_view::npos ||
      parseDecimal(text.substr(0, semicolon)) != sequence) {
    return std::nullopt;
  }
  return decodeRanks(text.substr(semicolon + 1));
}

std::string defaultHost(const StoreConnection& root) {
  return defaultHostIdentity(root.localAddress());
}

// Waits until `key` is set, then reads it; `why`: what holds it back, if
// it does not come by `deadline`.
std::string awaitValue(
    StoreConnection& connection,
    const std::string& key,
    Clock::time_point deadline,
    const std::function<std::string()>& why) {
  connection.startWait(key, deadline);
  if (!connection.awaitRelease(deadline, -1)) {
    throw c10::DistStoreError(
        {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
        fmt::format("{} (key '{}')", why(), key));
  }
  return connection.multiGet({key}, deadline).front();
}

// "host,host...|port|key prefix", as the store's host published it: the
// addresses to try in order. `rootHost`: how this rank reaches rank 0's
// store, for kRootHostAlias. A loopback address is this rank's own host:
// tried only by a rank that shares rank 0's (and so the leader's).
StoreAddress parseAddress(
    const std::string& text,
    const std::string& rootHost,
    const std::string& localAddress) {
  const auto first = text.find('|');
  const auto second = text.find('|', first + 1);
  const auto port = parseDecimal(
      std::string_view(text).substr(first + 1, second - first - 1));
  if (second == std::string::npos || !port) {
    throw std::runtime_error("malformed store address in a tree: " + text);
  }
  const bool loopbackToo = isLoopbackAddress(localAddress);
  std::vector<std::string> hosts;
  std::string_view list = std::string_view(text).substr(0, first);
  while (!list.empty()) {
    const auto comma = std::min(list.find(','), list.size());
    std::string host(list.substr(0, comma));
    list.remove_prefix(std::min(comma + 1, list.size()));
    if (host == kRootHostAlias) {
      host = rootHost;
    } else if (isLoopbackAddress(host) && !loopbackToo) {
      continue;
    }
    if (std::find(hosts.begin(), hosts.end(), host) == hosts.end()) {
      hosts.push_back(std::move(host));
    }
  }
  if (hosts.empty()) {
    throw std::runtime_error(
        "a tree store published no address other hosts can reach: " + text);
  }
  StoreAddress address{
      hosts.front(), static_cast<uint16_t>(*port), text.substr(second + 1)};
  address.otherHosts.assign(hosts.begin() + 1, hosts.end());
  return address;
}

std::string describeAddresses(const StoreAddress& address) {
  std::vector<std::string> all{address.host};
  all.insert(all.end(), address.otherHosts.begin(), address.otherHosts.end());
  return fmt::format("[{}] port {}", fmt::join(all, ", "), address.port);
}

std::vector<int64_t> allRanks(const TreeStore& store) {
  std::vector<int64_t> ranks;
  for (const auto& subtree : store.subtrees) {
    ranks.insert(ranks.end(), subtree.begin(), subtree.end());
  }
  std::sort(ranks.begin(), ranks.end());
  return ranks;
}

// The ranks that arrive at the root themselves: its members, and torch's
// ranks, which are in no subtree.
std::vector<int64_t> rootArrivers(const TreeStore& root, int64_t worldSize) {
  std::vector<bool> inTree(static_cast<std::size_t>(worldSize), false);
  for (const int64_t rank : allRanks(root)) {
    inTree[static_cast<std::size_t>(rank)] = true;
  }
  std::vector<int64_t> arrivers = root.members;
  for (int64_t rank = 0; rank < worldSize; ++rank) {
    if (!inTree[static_cast<std::size_t>(rank)]) {
      arrivers.push_back(rank);
    }
  }
  return arrivers;
}

// Rank 0 gathers every joiner's host and publishes the plan: each store's
// record, and each rank's list of stores.
void publishPlan(
    StoreConnection& root,
    const BarrierState& outer,
    int64_t fanIn,
    bool countedAsWorkers,
    Clock::time_point deadline) {
  if (countedAsWorkers) {
    // Every rank of ours set its `join` key before counting itself in, in
    // one send: once all are counted, all keys are there.
    awaitWorkers(root, outer.worldSize, deadline);
  } else {
    awaitCount(root, treeJoinedKey(outer.prefix), outer.worldSize, deadline);
  }
  std::vector<std::string> keys;
  for (int64_t rank = 0; rank < outer.worldSize; ++rank) {
    keys.push_back(treeKey(outer.prefix, "join", rank));
  }
  const auto joined = root.checkEach(keys, deadline);
  std::vector<std::string> present;
  std::vector<int64_t> presentRanks;
  for (std::size_t rank = 0; rank < joined.size(); ++rank) {
    if (joined[rank]) {
      present.push_back(keys[rank]);
      presentRanks.push_back(static_cast<int64_t>(rank));
    }
  }
  const auto hosts = root.multiGet(present, deadline);
  std::vector<std::pair<int64_t, std::string>> rankHosts;
  for (std::size_t i = 0; i < hosts.size(); ++i) {
    rankHosts.emplace_back(presentRanks[i], hosts[i]);
  }
  const TreePlan plan = planTree(rankHosts, fanIn);
  root.deleteEach(keys, deadline);
  // The plan's keys go once read (BarrierTree's constructor); the root's
  // record stays, for timeouts and verdicts.
  root.set(treeRecordKey(outer.prefix), encodeStore(plan.stores.front()));
  for (const auto& store : plan.stores) {
    root.set(treeKey(outer.prefix, "store", store.id), encodeStore(store));
  }
  const auto ours = std::to_string(presentRanks.size());
  for (const auto& [rank, stores] : plan.storesOf) {
    root.set(
        treeKey(outer.prefix, "rank", rank), joinRanks(stores) + ";" + ours);
  }
  root.flush(deadline);
}

// A tree over a store that outlives it (from_store) counts its joiners;
// more than the world size means that a barrier with this prefix is still
// open there, or ended without closing, and its plan would be read as this
// one's (a clean close deletes the count: close.cpp).
void refuseReusedTree(
    const BarrierState& outer, int64_t joined, const std::string& key) {
  if (joined > outer.worldSize) {
    throwPrefixInUse(
        outer,
        fmt::format(
            "'{}' counts {} joiners for a world of {}",
            key,
            joined,
            outer.worldSize));
  }
}

// Every rank of the tree says whether it reached its stores; the first
// that could not decides against the tree, else the last to report decides
// for it. Every rank reads the one outcome.
void settle(
    StoreConnection& root,
    const BarrierState& outer,
    int64_t members,
    const std::optional<std::string>& unreachable,
    Clock::time_point deadline) {
  const std::string outcomeKey = treeKey(outer.prefix, "outcome");
  // Set (a plain SET, which every server backend answers waiters for) once
  // the outcome is.
  const std::string said = outcomeKey + "_said";
  std::string outcome;
  if (unreachable) {
    outcome = root.compareSet(outcomeKey, "", *unreachable, deadline);
    root.set(said, "1");
    root.flush(deadline);
  } else {
    const auto ready = root.add(treeKey(outer.prefix, "ready"), 1, deadline);
    if (ready == members) {
      outcome = root.compareSet(outcomeKey, "", kTreeDecided, deadline);
      root.set(said, "1");
      root.flush(deadline);
    }
  }
  if (outcome.empty()) {
    root.startWait(said, deadline);
    if (!root.awaitRelease(deadline, -1)) {
      throw c10::DistStoreError(
          {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
          fmt::format(
              "not every one of the tree's {} ranks had opened its stores in "
              "time",
              members));
    }
    outcome = root.multiGet({outcomeKey}, deadline).front();
  }
  if (outcome != kTreeDecided) {
    // Rank 0's store, which "tree" takes down with rank 0's error, stays up
    // until every rank has the outcome (or a while, for one that died).
    const auto gaveUp = treeKey(outer.prefix, "gave_up");
    root.add(gaveUp, 1, deadline);
    if (outer.hostsStore) {
      try {
        awaitCount(
            root,
            gaveUp,
            members,
            std::min(deadline, Clock::now() + kStoreReach));
      } catch (const c10::DistStoreError&) {
      }
    }
    throw TreeUnbuildable(
        outcome, /*decidedHere=*/unreachable && outcome == *unreachable);
  }
  // Every rank has read both decisions once all have settled: the last
  // deletes them.
  const auto settled = treeKey(outer.prefix, "settled");
  if (root.add(settled, 1, deadline) == members) {
    auto keys = treeDecisionKeys(outer.prefix);
    keys.push_back(settled);
    root.deleteEach(keys, deadline);
  }
}

} // namespace

std::string treeRecordKey(const std::string& prefix) {
  return treeKey(prefix, "record");
}

std::string treeBelowKey(const std::string& prefix, int64_t member) {
  return treeKey(prefix, "below", member);
}

std::string treeMissingBelowKey(const std::string& prefix, int64_t member) {
  return treeKey(prefix, "missing_below", member);
}

std::string treeMissingKey(const std::string& prefix) {
  return treeKey(prefix, "missing");
}

std::string treeJoinedKey(const std::string& prefix) {
  return treeKey(prefix, "joined");
}

std::vector<std::string> treeDecisionKeys(const std::string& prefix) {
  std::vector<std::string> keys;
  for (const char* what :
       {"topology",
        "topology_said",
        "outcome",
        "outcome_said",
        "ready",
        "gave_up"}) {
    keys.push_back(treeKey(prefix, what));
  }
  return keys;
}

BarrierTree::BarrierTree(
    BarrierState& outer,
    const TreeOptions& options,
    bool registerAsWorker,
    Clock::time_point deadline)
    : outer_(outer), engineWake_(makeEventFd()) {
  const std::string& prefix = outer.prefix;
  auto root = openWireConnection(*outer.address, deadline, outer.stallLimit());
  // Every store this rank hosts listens on the address it reaches the root
  // from, and on no other; if that is loopback, on every address
  // (addresses.h).
  localAddress_ = root->localAddress();
  const LeaderAddresses leader = leaderAddresses(localAddress_);
  root->set(
      treeKey(prefix, "join", outer.rank),
      options.host.value_or(defaultHost(*root)));
  if (registerAsWorker) {
    registerWorker(*root, deadline);
  } else {
    const auto joinedKey = treeJoinedKey(prefix);
    refuseReusedTree(outer, root->add(joinedKey, 1, deadline), joinedKey);
  }
  if (outer.rank == 0) {
    try {
      publishPlan(*root, outer, options.fanIn, registerAsWorker, deadline);
    } catch (const c10::DistStoreError& e) {
      throw c10::DistStoreError(
          {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
          fmt::format(
              "TCPStoreBarrier rank 0 of {}: cannot plan the tree of stores, "
              "which waits for every rank to join it, within {}: {}",
              outer.worldSize,
              describeSeconds(outer.initTimeout),
              withoutBacktrace(e)));
    }
  }
  // This rank's place ("stores;ranks of ours"): its stores' records, and
  // where each listens. Each plan key is deleted by its last reader, so
  // that rank 0's store keeps only the root's record.
  const auto placeKey = treeKey(prefix, "rank", outer.rank);
  const auto place = awaitValue(*root, placeKey, deadline, [&outer] {
    // Rank 0 said it builds the tree (joinTree): it is ours.
    return fmt::format(
        "TCPStoreBarrier rank {} of {}: rank 0 did not publish the tree's "
        "plan within {}; it plans once all {} ranks have joined, so a rank "
        "that never joined, or rank 0 gone, holds it back",
        outer.rank,
        outer.worldSize,
        describeSeconds(outer.initTimeout),
        outer.worldSize);
  });
  const auto semicolon = place.find(';');
  const auto ids = splitRanks(std::string_view(place).substr(0, semicolon));
  const auto ours =
      parseDecimal(std::string_view(place).substr(semicolon + 1)).value_or(0);
  std::vector<std::string> recordKeys;
  for (const int64_t id : ids) {
    recordKeys.push_back(treeKey(prefix, "store", id));
  }
  const auto records = root->multiGet(recordKeys, deadline);
  root->deleteEach({placeKey}, deadline);
  std::vector<LevelSpec> specs;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    Level level;
    level.store = decodeStore(ids[i], records[i]);
    level.root = ids[i] == 0;
    const auto& members = level.store.members;
    level.localRank =
        std::find(members.begin(), members.end(), outer.rank) - members.begin();
    LevelSpec spec;
    spec.prefix = prefix;
    spec.timeout = outer.timeout;
    spec.peerTimeout = outer.peerTimeout;
    spec.usesLibUV = outer.usesLibUV;
    for (std::size_t m = 0; m < members.size(); ++m) {
      const int64_t name = level.root && outer.protocolKind == Protocol::kTorch
                               ? members[m]
                               : static_cast<int64_t>(m);
      spec.place.subtrees[name] = level.store.subtrees[m];
    }
    if (level.root) {
      spec.place.decides = true;
      spec.address = *outer.address;
      spec.server = outer.hostsStore ? outer.store : nullptr;
      spec.storeOutlives = !outer.ownsStore;
      spec.awaitMembers = false;
      spec.protocol = outer.protocolKind;
      if (outer.protocolKind == Protocol::kTorch) {
        // torch's keys at the root: global ranks, and the count reaches the
        // world size with each top leader adding its subtree.
        spec.rank = outer.rank;
        spec.worldSize = outer.worldSize;
        spec.shape.weight = static_cast<int64_t>(
            level.store.subtrees[static_cast<std::size_t>(level.localRank)]
                .size());
        spec.shape.members = rootArrivers(level.store, outer.worldSize);
      } else {
        spec.rank = level.localRank;
        spec.worldSize = static_cast<int64_t>(members.size());
      }
    } else {
      spec.rank = level.localRank;
      spec.worldSize = static_cast<int64_t>(members.size());
      spec.relayRounds = true;
      // Whether every member reached its stores is settled at the root,
      // below, before any level counts its members.
      spec.awaitMembers = false;
      if (level.localRank == 0) {
        auto hosted = hostTreeStore(
            fmt::format(
                "{}:{}{}{}",
                outer.address->host,
                outer.address->port,
                outer.address->keyPrefix,
                prefix),
            leader.bind,
            outer.usesLibUV,
            outer.initTimeout);
        spec.server = std::move(hosted.server);
        spec.serverShare = std::move(hosted.share);
        spec.address = std::move(hosted.address);
        // This rank's own connections: the address it listens on.
        spec.address.host = localAddress_;
        level.published = fmt::format(
            "{}|{}|{}",
            fmt::join(leader.published, ","),
            spec.address.port,
            spec.address.keyPrefix);
        root->set(treeKey(prefix, "addr", level.store.id), level.published);
      }
    }
    levels_.push_back(std::move(level));
    specs.push_back(std::move(spec));
  }
  root->flush(deadline);
  // Open the stores below the root: a member that cannot reach its store
  // says so at the root (settle), where the tree is given up as one.
  std::optional<std::string> unreachable;
  for (std::size_t i = 0; i < levels_.size() && !unreachable; ++i) {
    Level& level = levels_[i];
    if (level.root) {
      continue;
    }
    if (level.localRank == 0) {
      level.address = specs[i].address;
      level.barrier = openLevel(std::move(specs[i]), deadline);
      continue;
    }
    specs[i].address = parseAddress(
        awaitValue(
            *root,
            treeKey(prefix, "addr", level.store.id),
            deadline,
            [&] {
              return fmt::format(
                  "TCPStoreBarrier rank {} of {}: rank {} did not publish "
                  "where its tree store {} listens within {}",
                  outer.rank,
                  outer.worldSize,
                  level.store.members.front(),
                  level.store.id,
                  describeSeconds(outer.initTimeout));
            }),
        outer.address->host,
        localAddress_);
    level.address = specs[i].address;
    const auto reach = std::min(deadline, Clock::now() + kStoreReach);
    try {
      level.barrier = openLevel(std::move(specs[i]), reach);
    } catch (const std::exception& e) {
      unreachable = fmt::format(
          "rank {} cannot reach the store of rank {} (tree store {}) at {}: "
          "{}",
          outer.rank,
          level.store.members.front(),
          level.store.id,
          describeAddresses(*level.address),
          withoutBacktrace(e));
      break;
    }
    // Later connections go where this one went.
    auto& state = BarrierAccess::state(*level.barrier);
    if (const auto peer = state.connection->peerAddress(); !peer.empty()) {
      level.address->host = peer;
      level.address->otherHosts.clear();
      state.address = level.address;
    }
  }
  for (const Level& level : levels_) {
    // Once all members have read a store's record (and its address, which
    // its host published before reading), the last one deletes them.
    const auto readers = treeKey(prefix, "read", level.store.id);
    if (root->add(readers, 1, deadline) ==
        static_cast<int64_t>(level.store.members.size())) {
      root->deleteEach(
          {treeKey(prefix, "store", level.store.id),
           treeKey(prefix, "addr", level.store.id),
           readers},
          deadline);
    }
  }
  settle(*root, outer, ours, unreachable, deadline);
  // Joining needs rank 0's store no longer: a top leader meets there
  // through its root level's own connections.
  root.reset();
  for (std::size_t i = 0; i < levels_.size(); ++i) {
    Level& level = levels_[i];
    if (level.root) {
      // Opened once the tree is settled: the root's keys are the flat
      // barrier's, should the tree not be built.
      level.address = specs[i].address;
      level.barrier = openLevel(std::move(specs[i]), deadline);
    }
    auto& connection = *BarrierAccess::state(*level.barrier).connection;
    if (!level.root && level.localRank == 0) {
      connection.set(treeRecordKey(prefix), encodeStore(level.store));
    }
    if (i > 0) {
      // This rank hosts the store one level down.
      connection.set(
          treeBelowKey(prefix, level.localRank), levels_[i - 1].published);
    }
    connection.flush(deadline);
  }
  // The worker's own connections to the stores this rank leads, opened
  // while joining's deadline holds.
  for (std::size_t i = 0; i + 1 < levels_.size(); ++i) {
    Level& level = levels_[i];
    if (level.localRank != 0 || level.root) {
      throw std::logic_error(
          fmt::format(
              "tree plan: rank {} meets at tree store {} above store {}, "
              "which it does not lead",
              outer.rank,
              levels_[i + 1].store.id,
              level.store.id));
    }
    level.relay =
        openWireConnection(*level.address, deadline, outer.stallLimit());
    level.arrivalKeys.resize(level.store.members.size());
  }
  installChecks();
  if (levels_.size() > 1) {
    engine_ = std::thread(&BarrierTree::runEngine, this);
  }
}

BarrierTree::~BarrierTree() {
  destroy();
}

void BarrierTree::destroy() noexcept {
  stopEngine();
  markLevels();
  // Bottom up, as close() does: a store this rank hosts goes last, each
  // lingering (after a verdict or a timeout) within one limit for all.
  std::chrono::milliseconds linger{0};
  for (auto& level : levels_) {
    if (level.barrier) {
      linger =
          std::max(linger, lingerLimit(BarrierAccess::state(*level.barrier)));
    }
  }
  const auto lingerUntil = Clock::now() + linger;
  for (auto& level : levels_) {
    level.relay.reset();
    if (level.barrier) {
      destroyBarrier(BarrierAccess::state(*level.barrier), lingerUntil);
      level.barrier.reset();
    }
  }
}

void BarrierTree::stopEngine() noexcept {
  if (engine_.joinable()) {
    engineStopping_ = true;
    postEvent(engineWake_.get());
    engine_.join();
  }
}

void BarrierTree::markLevels() {
  for (auto& level : levels_) {
    if (!level.barrier) {
      continue;
    }
    BarrierState& state = BarrierAccess::state(*level.barrier);
    // Every store this rank hosts stays up, if it is destroyed now, until
    // its members have the verdict too, or have named the missing ranks
    // (close.cpp).
    if (lost_ && !state.lost) {
      state.lost = lost_;
      state.phase = Phase::kLost;
    }
    state.timedOut = state.timedOut || timedOut_;
  }
}

void BarrierTree::checkUsable() const {
  if (lost_) {
    std::rethrow_exception(lost_);
  }
}

void BarrierTree::installChecks() {
  // The host store's rounds are the caller's, and run its interrupt check;
  // the rest are the engine's, which stops when told to.
  for (std::size_t i = 0; i < levels_.size(); ++i) {
    BarrierState& state = BarrierAccess::state(*levels_[i].barrier);
    if (state.liveness) {
      state.liveness->alsoPost(engineWake_.get());
    }
    state.interruptCheck = [this, i] {
      if (i > 0) {
        checkEngine(i);
      } else {
        if (userCheck_) {
          userCheck_();
        }
        checkOtherLevels(i);
      }
      if (i + 1 == levels_.size() && i > 0) {
        // The engine's own round at its topmost store.
        reportMissing(i, BarrierAccess::state(*levels_[i].barrier).sequence);
      }
    };
  }
}

void BarrierTree::setInterruptCheck(std::function<void()> check) {
  userCheck_ = std::move(check);
}

void BarrierTree::checkOtherLevels(std::size_t waiting) const {
  for (std::size_t i = 0; i < levels_.size(); ++i) {
    if (i != waiting && BarrierAccess::alarm(*levels_[i].barrier)) {
      throw OtherLevelAlarm{i};
    }
  }
}

void BarrierTree::checkEngine(std::size_t waiting) const {
  if (engineStopping_) {
    throw EngineStopping{};
  }
  checkOtherLevels(waiting);
}

bool BarrierTree::anyAlarm() const {
  for (const auto& level : levels_) {
    if (BarrierAccess::alarm(*level.barrier)) {
      return true;
    }
  }
  return false;
}

int64_t BarrierTree::sequence() const noexcept {
  return BarrierAccess::state(*levels_.front().barrier).sequence;
}

template <typename Call>
void BarrierTree::callHost(Call&& call, Clock::time_point deadline) {
  checkUsable();
  try {
    call(host());
  } catch (const OtherLevelAlarm& alarm) {
    lose(alarm.level);
  } catch (const PeerLostError&) {
    lose(0);
  } catch (const StoreUnreachableError& e) {
    lose(0, e.what_without_backtrace());
  } catch (const BarrierTimeoutError& e) {
    throwTimeout(e, deadline);
  }
}

void BarrierTree::execute(Clock::time_point deadline) {
  callHost(
      [deadline](TCPStoreBarrier& barrier) {
        BarrierAccess::executeUntil(barrier, deadline);
      },
      deadline);
}

void BarrierTree::arrive(Clock::time_point deadline) {
  callHost(
      [deadline](TCPStoreBarrier& barrier) {
        BarrierAccess::arriveUntil(barrier, deadline);
      },
      deadline);
}

void BarrierTree::wait(Clock::time_point deadline) {
  callHost(
      [deadline](TCPStoreBarrier& barrier) {
        BarrierAccess::waitUntil(barrier, deadline);
      },
      deadline);
}

bool BarrierTree::released() {
  return !lost_ && host().released();
}

void BarrierTree::sendArrival() {
  if (lost_ || anyAlarm()) {
    return;
  }
  callHost(
      [](TCPStoreBarrier& barrier) {
        BarrierAccess::sendArrival(barrier);
      },
      Clock::now() + outer_.timeout);
}

bool BarrierTree::arrivalAnswered(std::chrono::milliseconds patience) {
  if (lost_ || anyAlarm()) {
    return false;
  }
  bool answered = true;
  callHost(
      [&answered, patience](TCPStoreBarrier& barrier) {
        answered = BarrierAccess::arrivalAnswered(barrier, patience);
      },
      Clock::now() + outer_.timeout);
  return answered;
}

void BarrierTree::runEngine() noexcept {
  // Which level the engine was at when a store or a peer failed.
  std::size_t at = 0;
  try {
    for (int64_t sequence = 0;; ++sequence) {
      relayRound(sequence);
    }
  } catch (const EngineStopping&) {
    return;
  } catch (const OtherLevelAlarm& alarm) {
    at = alarm.level;
  } catch (const EngineAt& failed) {
    at = failed.level;
  } catch (...) {
    return;
  }
  // The barrier is over for everyone below: tell them now, whatever this
  // rank's caller is doing.
  try {
    decideLoss(at, {});
  } catch (...) {
  }
}

void BarrierTree::relayRound(int64_t sequence) {
  const std::size_t top = levels_.size() - 1;
  nextReport_ = Clock::now() + std::min(kMissingStart, outer_.timeout / 4);
  const auto at = [](std::size_t level, auto&& step) {
    try {
      step();
    } catch (const EngineStopping&) {
      throw;
    } catch (const OtherLevelAlarm&) {
      throw;
    } catch (...) {
      throw EngineAt{level};
    }
  };
  // Up: at each store this rank leads, all its members' `in` keys say that
  // everything below it has arrived; setting its own `in` at the store
  // above is this rank's arrival there.
  for (std::size_t i = 0; i < top; ++i) {
    at(i, [&] {
      Level& level = levels_[i];
      BarrierState& state = BarrierAccess::state(*level.barrier);
      assignRelayArrivalKeys(level.arrivalKeys, outer_.prefix, sequence);
      if (i > 0) {
        state.liveness->enterRound(state.sequence, /*watcher=*/true);
        level.relay->set(
            level.arrivalKeys[static_cast<std::size_t>(level.localRank)],
            kReleased);
      }
      level.relay->startWaitAll(level.arrivalKeys, deadlineFromNow());
      awaitRelay(i, sequence);
    });
  }
  at(top, [&] {
    BarrierAccess::executeUntil(
        *levels_[top].barrier, Clock::now() + kEngineHorizon);
  });
  // Down: the release at every store this rank leads, top down; then the
  // rounds of the stores it led above its host store are over.
  const auto outKey = BarrierAccess::state(*levels_.front().barrier)
                          .protocol->releaseKey(sequence);
  for (std::size_t i = top; i-- > 0;) {
    at(i, [&] {
      auto& relay = *levels_[i].relay;
      relay.set(outKey, kReleased);
      relay.flush(deadlineFromNow());
    });
  }
  for (std::size_t i = 1; i < top; ++i) {
    BarrierState& state = BarrierAccess::state(*levels_[i].barrier);
    state.liveness->leaveRound();
    deleteFinishedRounds(state);
    ++state.sequence;
  }
}

Clock::time_point BarrierTree::deadlineFromNow() const {
  return Clock::now() + silenceLimit();
}

void BarrierTree::awaitRelay(std::size_t level, int64_t sequence) {
  auto& relay = *levels_[level].relay;
  // A stop or a verdict posts engineWake_; otherwise the engine wakes only
  // to report.
  auto wakeAt = std::max(nextReport_, Clock::now() + kEngineSlice);
  while (!relay.awaitRelease(wakeAt, engineWake_.get())) {
    checkEngine(levels_.size());
    reportMissing(level, sequence);
    wakeAt = std::max(nextReport_, Clock::now() + kEngineSlice);
  }
}

std::chrono::milliseconds BarrierTree::silenceLimit() const {
  // Every store of a tree has at most a fan-in (or 64) of members, so
  // liveness allows each the peer timeout itself.
  return outer_.peerTimeout.value_or(
      std::max(outer_.timeout, std::chrono::milliseconds(1000)));
}

std::string BarrierTree::releaseKey() const {
  std::string key = outer_.prefix;
  appendDecimal(key, sequence());
  key.append(
      outer_.protocolKind == Protocol::kTorch ? "/last_member" : "/barrier");
  return key;
}

std::vector<int64_t> BarrierTree::levelMembers(const Level& level) const {
  if (level.root && outer_.protocolKind == Protocol::kTorch) {
    return level.store.members;
  }
  std::vector<int64_t> local;
  for (std::size_t m = 0; m < level.store.members.size(); ++m) {
    local.push_back(static_cast<int64_t>(m));
  }
  return local;
}

std::optional<Alarm> BarrierTree::decideAtRoot(const Alarm& proposal) {
  // The root's `lost` is the tree's verdict: the first proposal there
  // stands, and every rank raises what the root holds. Its members are
  // told at once, so that the verdict starts down every branch.
  try {
    const auto deadline = deadlineFromNow();
    auto root = openWireConnection(
        *outer_.address, deadline, silenceLimit(), nullptr, Refused::kFinal);
    std::vector<int64_t> rootMembers =
        levels_.back().root
            ? levels_.back().store.members
            : decodeStore(
                  0,
                  root->multiGet({treeRecordKey(outer_.prefix)}, deadline)
                      .front())
                  .members;
    if (outer_.protocolKind != Protocol::kTorch) {
      for (std::size_t m = 0; m < rootMembers.size(); ++m) {
        rootMembers[m] = static_cast<int64_t>(m);
      }
    }
    return declareVerdict(
        *root, outer_.prefix, rootMembers, proposal, deadline);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

void BarrierTree::carryVerdict(
    const Alarm& verdict, std::optional<std::size_t> skip) {
  for (std::size_t i = 0; i < levels_.size(); ++i) {
    if (skip && *skip == i) {
      continue;
    }
    try {
      // A store that refuses is gone: its host has stopped it, or died.
      auto store = openWireConnection(
          *levels_[i].address,
          deadlineFromNow(),
          silenceLimit(),
          nullptr,
          Refused::kFinal);
      declareVerdict(
          *store,
          outer_.prefix,
          levelMembers(levels_[i]),
          verdict,
          deadlineFromNow());
    } catch (const std::exception&) {
      // That store is gone too; its members learn from it being gone.
    }
  }
}

Alarm BarrierTree::decideLoss(std::size_t index, const std::string& detail) {
  const Level& level = levels_[index];
  const auto alarm = BarrierAccess::alarm(*level.barrier);
  Alarm verdict = rootLostVerdict();
  std::optional<std::size_t> gone;
  if (alarm && alarm->decided) {
    // Decided at the root (or carried from it): pass it on as it is.
    if (alarm->kind == Alarm::Kind::kPeersLost) {
      verdict = peersLostVerdict(alarm->lostRanks, alarm->missingRanks, true);
    }
  } else if (alarm && alarm->kind == Alarm::Kind::kPeersLost) {
    verdict = decideAtRoot(
                  peersLostVerdict(alarm->lostRanks, alarm->missingRanks, true))
                  .value_or(verdict);
  } else if (level.root) {
    gone = index;
  } else if (!outer_.peerTimeout) {
    // Without liveness nobody declares ranks lost (as flat, where only the
    // store's own host can be): this store's host is gone for this rank,
    // and for this rank only.
    return Alarm{Alarm::Kind::kStoreGone, {}, {}, detail};
  } else {
    // The rank hosting this store is gone or frozen, and with it the way
    // to the root of everything below it: its whole subtree is lost to the
    // barrier, and it may lead more than this store.
    verdict = decideAtRoot(
                  peersLostVerdict(
                      level.store.hostSubtree, level.store.hostSubtree, true))
                  .value_or(verdict);
    gone = index;
  }
  if (verdict.kind != Alarm::Kind::kPeersLost) {
    // Nobody can reach the root's store any more: the ranks below learn
    // that from this rank.
    gone = levels_.back().root ? std::optional(levels_.size() - 1) : gone;
  }
  carryVerdict(verdict, gone);
  return verdict;
}

void BarrierTree::lose(std::size_t index, const std::string& detail) {
  const Alarm verdict = decideLoss(index, detail);
  if (!verdict.decided) {
    endWith(treeError(verdict, {levels_[index].store.members.front()}));
  }
  endWith(treeError(
      verdict,
      outer_.ownsStore ? std::vector<int64_t>{0} : std::vector<int64_t>{}));
}

void BarrierTree::endWith(std::exception_ptr error) {
  lost_ = std::move(error);
  std::rethrow_exception(lost_);
}

std::exception_ptr BarrierTree::treeError(
    const Alarm& verdict, std::vector<int64_t> storeHost) const {
  const auto key = releaseKey();
  if (verdict.kind != Alarm::Kind::kPeersLost) {
    return std::make_exception_ptr(StoreUnreachableError(
        fmt::format(
            "TCPStoreBarrier rank {} of {} (tree of stores, barrier prefix "
            "'{}', sequence {}): {}",
            outer_.rank,
            outer_.worldSize,
            outer_.prefix,
            sequence(),
            verdict.detail),
        sequence(),
        std::move(storeHost)));
  }
  const auto limit = outer_.peerTimeout.value_or(std::chrono::milliseconds(0));
  return std::make_exception_ptr(PeerLostError(
      fmt::format(
          "TCPStoreBarrier rank {} (world size {}, tree of stores) at barrier "
          "key '{}' (sequence {}): ranks [{}] stopped showing that they are "
          "alive for {} (peer_timeout_secs), or lost their way to the root "
          "through such a rank; missing ranks: [{}]",
          outer_.rank,
          outer_.worldSize,
          key,
          sequence(),
          encodeRanks(verdict.lostRanks),
          describeSeconds(limit),
          encodeRanks(verdict.missingRanks)),
      key,
      sequence(),
      limit,
      verdict.missingRanks,
      verdict.lostRanks));
}

std::vector<int64_t> BarrierTree::missingAt(
    const Level& level,
    StoreConnection& connection,
    RankKeyCache& cache,
    int64_t sequence,
    Clock::time_point deadline) const {
  const TreeStore& store = level.store;
  // torch's keys at the root name global ranks; every other round names
  // its members by local rank.
  const bool torchKeys = level.root && outer_.protocolKind == Protocol::kTorch;
  const auto behind =
      BarrierAccess::state(*level.barrier)
          .protocol->missingRanks(connection, cache, sequence, deadline);
  std::vector<int64_t> ranks;
  std::vector<int64_t> leaders;
  for (const int64_t entry : behind) {
    const auto m =
        torchKeys
            ? std::find(store.members.begin(), store.members.end(), entry) -
                  store.members.begin()
            : entry;
    if (m >= static_cast<int64_t>(store.members.size())) {
      ranks.push_back(entry);
    } else if (store.children[static_cast<std::size_t>(m)] < 0) {
      ranks.push_back(store.members[static_cast<std::size_t>(m)]);
    } else {
      leaders.push_back(m);
    }
  }
  std::vector<std::string> keys;
  for (const int64_t m : leaders) {
    keys.push_back(treeMissingBelowKey(outer_.prefix, m));
  }
  const auto said = connection.checkEach(keys, deadline);
  std::vector<std::string> present;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (said[i]) {
      present.push_back(keys[i]);
    }
  }
  const auto values = connection.multiGet(present, deadline);
  auto value = values.begin();
  for (std::size_t i = 0; i < leaders.size(); ++i) {
    const auto below =
        said[i] ? missingOfRound(*value++, sequence) : std::nullopt;
    // A leader that said nothing of this round has not seen it slow yet,
    // or never will: everything below it is missing as far as anyone can
    // tell.
    const auto& subtree = store.subtrees[static_cast<std::size_t>(leaders[i])];
    const auto& named = below ? *below : subtree;
    ranks.insert(ranks.end(), named.begin(), named.end());
  }
  std::sort(ranks.begin(), ranks.end());
  return ranks;
}

StoreConnection& BarrierTree::probe(Level& level, Clock::time_point deadline) {
  if (!level.probe) {
    // A stop or a verdict interrupts it, as it does the engine's waits.
    level.probe = openWireConnection(
        *level.address,
        deadline,
        outer_.stallLimit(),
        [this] {
          checkEngine(levels_.size());
        },
        Refused::kFinal);
  }
  return *level.probe;
}

void BarrierTree::reportMissing(std::size_t waiting, int64_t sequence) {
  const auto now = Clock::now();
  if (now < nextReport_) {
    return;
  }
  nextReport_ = now + kMissingRefresh;
  // As long as a store would be given before liveness takes it for lost: a
  // probe given up leaves a reply due, which the server, writing it to a
  // closed connection, would log.
  const auto deadline = now + silenceLimit();
  const std::size_t top = levels_.size() - 1;
  // Nobody below any store the engine has yet to leave has arrived, so
  // nobody there waits (between checkpoints, say). The stores it has left
  // are below the one it waits at, so there are none.
  bool idle = waiting < top;
  try {
    // Up: each store this rank leads and has not yet left, said at the
    // store above, where that store's leader reads it. A store below which
    // nobody has arrived needs no word: the store above takes a leader
    // that said nothing for its whole subtree.
    for (std::size_t i = waiting; i < top; ++i) {
      const auto below = missingAt(
          levels_[i],
          probe(levels_[i], deadline),
          levels_[i].probeKeys,
          sequence,
          deadline);
      if (static_cast<int64_t>(below.size()) == levels_[i].store.size()) {
        continue;
      }
      idle = false;
      auto& above = probe(levels_[i + 1], deadline);
      above.set(
          treeMissingBelowKey(outer_.prefix, levels_[i + 1].localRank),
          missingText(sequence, below));
      above.flush(deadline);
    }
    if (idle) {
      nextReport_ = now + kIdleRecheck;
      return;
    }
    // Down: the tree's whole list, as the root's members see it, to every
    // store this rank leads where someone waits.
    Level& upper = levels_[top];
    auto& atTop = probe(upper, deadline);
    std::string text;
    if (upper.root) {
      text = missingText(
          sequence,
          missingAt(upper, atTop, upper.probeKeys, sequence, deadline));
    } else {
      const std::vector<std::string> key{treeMissingKey(outer_.prefix)};
      if (!atTop.check(key, deadline)) {
        return;
      }
      text = atTop.multiGet(key, deadline).front();
      if (!missingOfRound(text, sequence)) {
        return;
      }
    }
    for (std::size_t i = 0; i < top; ++i) {
      auto& led = probe(levels_[i], deadline);
      led.set(treeMissingKey(outer_.prefix), text);
      led.flush(deadline);
    }
  } catch (const std::exception&) {
    // The diagnosis only names ranks: a store that does not answer it is
    // liveness's to judge. The next report opens its connections anew.
    for (auto& level : levels_) {
      level.probe.reset();
    }
    nextReport_ = Clock::now() + kIdleRecheck;
  }
}

std::optional<std::vector<int64_t>> BarrierTree::treeMissing(
    Clock::time_point deadline) {
  Level& host = levels_.front();
  BarrierState& state = BarrierAccess::state(*host.barrier);
  if (!state.diagnosis) {
    state.diagnosis =
        openWireConnection(*host.address, deadline, outer_.stallLimit());
  }
  auto& connection = *state.diagnosis;
  if (host.root) {
    return missingAt(
        host, connection, state.diagnosisRankKeys, sequence(), deadline);
  }
  // The engines refresh it every kMissingRefresh once the round is slow; a
  // timeout shorter than that may come before the first.
  const std::vector<std::string> key{treeMissingKey(outer_.prefix)};
  for (;;) {
    if (connection.check(key, deadline)) {
      if (auto missing = missingOfRound(
              connection.multiGet(key, deadline).front(), sequence())) {
        return missing;
      }
    }
    if (Clock::now() + kMissingPoll >= deadline) {
      return std::nullopt;
    }
    std::this_thread::sleep_for(kMissingPoll);
  }
}

void BarrierTree::throwTimeout(
    const BarrierTimeoutError& e, Clock::time_point callDeadline) {
  // The tree's list as the leaders' engines carried it to this rank's
  // store: the same on every rank, with no request above its own store.
  // If it does not come in time, name what this rank's own store knew, or
  // say that nobody could tell.
  const auto deadline =
      std::max(Clock::now() + kMinDiagnosis, callDeadline + kDiagnosisBudget);
  std::optional<std::vector<int64_t>> missing;
  try {
    missing = treeMissing(deadline);
  } catch (const std::exception&) {
    BarrierAccess::state(host()).diagnosis.reset();
  }
  if (!missing) {
    if (!e.missingRanks().empty()) {
      missing =
          BarrierAccess::state(host()).place.globalRanks(e.missingRanks());
    }
  }
  // Every store this rank hosts stays up a little if it is destroyed now:
  // the others are timing out too, and read there what is missing.
  timedOut_ = true;
  const auto key = releaseKey();
  throw BarrierTimeoutError(
      fmt::format(
          "TCPStoreBarrier timed out after {} on rank {} (world size {}, "
          "tree of stores) at barrier key '{}' (sequence {}); {}",
          describeSeconds(outer_.timeout),
          outer_.rank,
          outer_.worldSize,
          key,
          sequence(),
          missing ? fmt::format("missing ranks: [{}]", encodeRanks(*missing))
                  : fmt::format(
                        "missing ranks unknown: the tree's stores did not "
                        "say within {}",
                        describeSeconds(kDiagnosisBudget))),
      key,
      sequence(),
      outer_.timeout,
      missing.value_or(std::vector<int64_t>{}));
}

namespace {

// Rank 0 decides, once, whether the job builds a tree, before any rank
// joins it; a rank that hears nothing from rank 0 within kDecisionWait
// decides against it, and the first decision stands. nullopt: a tree;
// else why not, and whether this rank decided it.
std::optional<std::pair<std::string, bool>> decideTopology(
    const BarrierState& outer,
    const TreeOptions& options,
    Clock::time_point deadline) {
  // `key` holds the decision; `said` is set only by rank 0 once it decided
  // for a tree, so that a rank that stopped waiting for it leaves no wait
  // the server would answer on a closed connection.
  const std::string key = treeKey(outer.prefix, "topology");
  const std::string said = key + "_said";
  auto root = openWireConnection(*outer.address, deadline, outer.stallLimit());
  std::string decided;
  std::string proposal;
  if (outer.rank == 0) {
    proposal = std::string(kTreeDecided);
    decided = root->compareSet(key, "", proposal, deadline);
    if (decided == kTreeDecided) {
      root->set(said, "1");
      root->flush(deadline);
    }
  } else {
    const auto start = Clock::now();
    const auto until = options.topology == Topology::kTree
                           ? deadline
                           : std::min(deadline, start + kDecisionWait);
    root->startWait(said, until);
    if (root->awaitRelease(until, -1)) {
      decided = root->multiGet({key}, deadline).front();
    } else {
      proposal = fmt::format(
          "rank {} heard nothing from rank 0 within {} about building a "
          "tree: rank 0 is not a rank of this library (torch's "
          "TCPStoreBarrier cannot host a tree), or started late",
          outer.rank,
          describeSeconds(
              std::chrono::ceil<std::chrono::milliseconds>(until - start)));
      if (options.topology == Topology::kTree) {
        throw TreeError(
            {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
            fmt::format(
                "TCPStoreBarrier rank {} of {}: topology='tree' cannot be "
                "built: {}; use topology='flat' (or 'auto')",
                outer.rank,
                outer.worldSize,
                proposal));
      }
      // The wait cut short leaves a reply due on this connection.
      root = openWireConnection(*outer.address, deadline, outer.stallLimit());
      decided = root->compareSet(key, "", proposal, deadline);
    }
  }
  if (decided == kTreeDecided) {
    return std::nullopt;
  }
  return std::make_pair(decided, decided == proposal);
}

} // namespace

bool joinTree(
    BarrierState& outer,
    const TreeOptions& options,
    bool registerAsWorker,
    Clock::time_point deadline) {
  auto why = decideTopology(outer, options, deadline);
  if (!why) {
    try {
      outer.tree = std::make_unique<BarrierTree>(
          outer, options, registerAsWorker, deadline);
      return true;
    } catch (const TreeUnbuildable& e) {
      why = std::make_pair(std::string(e.what()), e.decidedHere());
    }
  }
  if (options.topology == Topology::kTree) {
    throw TreeError(
        {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
        fmt::format(
            "TCPStoreBarrier rank {} of {}: topology='tree' cannot be built: "
            "{}",
            outer.rank,
            outer.worldSize,
            why->first));
  }
  const auto line = fmt::format(
      "TCPStoreBarrier rank {} of {}: topology='auto' uses one flat store "
      "instead of a tree: {}",
      outer.rank,
      outer.worldSize,
      why->first);
  // One line for the job: from the rank that decided.
  if (why->second) {
    LOG(WARNING) << line;
  } else {
    LOG(INFO) << line;
  }
  return false;
}

void BarrierTree::close(Clock::time_point deadline) {
  // Every round this rank's caller took part in is released once its
  // close() runs, and so was every store this rank leads: the engine has
  // nothing left to relay.
  stopEngine();
  markLevels();
  for (auto& level : levels_) {
    level.relay.reset();
    level.probe.reset();
    BarrierAccess::state(*level.barrier).interruptCheck = userCheck_;
  }
  for (auto& level : levels_) {
    closeBarrier(BarrierAccess::state(*level.barrier), deadline);
  }
}

} // namespace tcpstore_barrier::detail
