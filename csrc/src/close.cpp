// Leaving the store: close()'s handshake, and what a barrier destroyed
// without close() does instead.
//
// The shutdown rule: the rank that hosts the store waits, up to the
// timeout, until every other rank of this library has closed (or been
// lost), so that no peer loses the store while still finishing its last
// round; the others say that they have closed in their last request, which
// has no reply. A destroyed barrier does the same, except that the host
// waits only when its last call ended in a verdict (a timeout, a lost
// peer), and then only briefly: long enough for the survivors to
// reach the same verdict, which needs the store.
#include <algorithm>
#include <optional>
#include <thread>

#include <c10/util/Logging.h>

#include "barrier_state.h"

namespace tcpstore_barrier::detail {
namespace {

// How often the host looks for ranks that have closed.
constexpr std::chrono::milliseconds kClosePoll{10};
// How long a destroyed host keeps the store up after an error: survivors
// learn a verdict from their next heartbeat, and those that timed out with
// the host need the store a moment longer to name the missing ranks.
constexpr int kLingerIntervals = 3;
constexpr std::chrono::milliseconds kMinLinger{2000};
constexpr std::chrono::milliseconds kMaxLinger{10000};
// A rank's goodbye is one send into its socket's buffer.
constexpr std::chrono::milliseconds kGoodbyeDeadline{1000};

// The ranks a verdict declared lost: this store's own alarm, or the error
// this barrier ended with (a tree learns verdicts at any of its levels).
std::vector<int64_t> lostRanksOf(const BarrierState& state) {
  if (auto alarm = state.liveness->alarm()) {
    return alarm->lostRanks;
  }
  if (state.lost) {
    try {
      std::rethrow_exception(state.lost);
    } catch (const PeerLostError& e) {
      return e.lostRanks();
    } catch (...) {
    }
  }
  return {};
}

// The host waits until every other rank of this library has said it
// closed, or saw a verdict, or has been silent for the liveness limit (it
// will never say so), or `deadline` passes.
void awaitClosers(
    BarrierState& state, StoreConnection& store, Clock::time_point deadline) {
  std::vector<int64_t> pending;
  {
    std::vector<std::string> aliveKeys;
    std::vector<int64_t> others;
    for (const int64_t r : state.shape.memberRanks(state.worldSize)) {
      if (r != state.rank) {
        aliveKeys.push_back(state.liveness->aliveKey(r));
        others.push_back(r);
      }
    }
    // torch's ranks have no counter: they never close, and are not awaited.
    const auto members = store.checkEach(aliveKeys, deadline);
    for (std::size_t i = 0; i < members.size(); ++i) {
      if (members[i]) {
        pending.push_back(others[i]);
      }
    }
  }
  // A verdict names global ranks; a member of a tree's store stands for
  // its whole subtree, and is lost when all of it is (itself included).
  const auto lost = lostRanksOf(state);
  pending.erase(
      std::remove_if(
          pending.begin(),
          pending.end(),
          [&](int64_t member) {
            const auto ranks = state.place.globalRanks({member});
            return std::all_of(ranks.begin(), ranks.end(), [&](int64_t r) {
              return std::find(lost.begin(), lost.end(), r) != lost.end();
            });
          }),
      pending.end());
  SilenceTracker silence(state.liveness->silenceLimit());
  auto nextLook = Clock::now();
  while (!pending.empty()) {
    std::vector<std::string> keys;
    for (const int64_t rank : pending) {
      keys.push_back(closedKey(state.prefix, rank));
    }
    if (store.check(keys, deadline)) {
      return;
    }
    const auto now = Clock::now();
    if (now >= deadline) {
      LOG(INFO) << "TCPStoreBarrier rank 0: closing " << store.describe()
                << " although " << pending.size()
                << " ranks had not closed in time";
      return;
    }
    if (now >= nextLook) {
      // Drop the ranks that closed, and those that stopped heartbeating.
      const auto closed = store.checkEach(keys, deadline);
      std::vector<int64_t> still;
      for (std::size_t i = 0; i < pending.size(); ++i) {
        if (!closed[i]) {
          still.push_back(pending[i]);
        }
      }
      pending = std::move(still);
      if (state.liveness->enabled() && !pending.empty()) {
        std::vector<std::string> aliveKeys;
        for (const int64_t rank : pending) {
          aliveKeys.push_back(state.liveness->aliveKey(rank));
        }
        const auto values = store.multiGet(aliveKeys, deadline);
        std::vector<int64_t> alive;
        for (std::size_t i = 0; i < pending.size(); ++i) {
          if (!silence.silent(pending[i], values[i], now)) {
            alive.push_back(pending[i]);
          }
        }
        pending = std::move(alive);
      }
      nextLook =
          now +
          std::max(state.liveness->interval(), std::chrono::milliseconds(200));
      continue;
    }
    std::this_thread::sleep_for(kClosePoll);
    state.runInterruptCheck();
  }
}

// The host's handshake needs a connection whose replies cannot cross an
// earlier request's: the caller's, unless one is still due on it (a round
// left entered, an arrival cut short by an interrupt).
void hostAwaitsClosers(BarrierState& state, Clock::time_point deadline) {
  if (state.connection->idle()) {
    awaitClosers(state, *state.connection, deadline);
    return;
  }
  auto fresh = openWireConnection(*state.address, deadline, state.stallLimit());
  awaitClosers(state, *fresh, deadline);
}

// A peer's last request, and one without a reply: once the host has seen
// it, nothing of this rank is left in flight.
void sayClosed(BarrierState& state) {
  state.connection->set(closedKey(state.prefix, state.rank), "1");
  state.connection->flush(Clock::now() + kGoodbyeDeadline);
}

// stop() before reset(): reset() clears the pointer that a job in flight
// (deleteWhenQuiet re-posting itself) still reads.
void stopWorker(BarrierState& state) {
  if (state.worker) {
    state.worker->stop();
    state.worker.reset();
  }
}

void releaseStore(BarrierState& state) {
  state.diagnosis.reset();
  state.verdictWatch.reset();
  state.background.reset();
  state.connection.reset();
  state.store.reset();
  state.treeServer.reset();
}

// A store that outlives the barrier keeps nothing of it after a clean
// close, so that a later barrier with the same prefix cannot take an old
// round's release for its own: the last of the arriving ranks to close
// deletes the rounds' keys, then the liveness keys by which a later
// barrier would see the prefix still in use (construction.cpp). Ranks that
// never close (torch's, lost ones) leave everything, and so those marks.
// `rank{r}` keys are torch's, shared by every prefix: they stay.
void clearIfLast(BarrierState& state, Clock::time_point deadline) {
  const auto arrivers = state.shape.memberRanks(state.worldSize);
  const std::string closing = state.prefix + "/closing";
  if (state.connection->add(closing, 1, deadline) !=
      static_cast<int64_t>(arrivers.size())) {
    return;
  }
  state.protocol->deleteAllRounds(*state.connection, state.sequence, deadline);
  std::vector<std::string> keys{
      lostKeyOf(state.prefix),
      treeRecordKey(state.prefix),
      treeJoinedKey(state.prefix)};
  for (std::size_t m = 0; m < arrivers.size(); ++m) {
    keys.push_back(treeBelowKey(state.prefix, static_cast<int64_t>(m)));
    keys.push_back(treeMissingBelowKey(state.prefix, static_cast<int64_t>(m)));
  }
  for (auto& key : treeDecisionKeys(state.prefix)) {
    keys.push_back(std::move(key));
  }
  for (const int64_t r : arrivers) {
    keys.push_back(closedKey(state.prefix, r));
    keys.push_back(state.liveness->aliveKey(r));
  }
  keys.push_back(closing);
  state.connection->deleteEach(keys, deadline);
}

// What close() and destruction share: stop the worker, say goodbye as this
// rank's role asks (the host waiting for the others until `hostWaitsUntil`,
// if set), let go of the store. The handshake only among ranks of a store
// this library created, and only while that store still answers; a store
// that outlives the barrier is left clean by the last rank of a clean close.
void leaveStore(
    BarrierState& state,
    std::optional<Clock::time_point> hostWaitsUntil,
    bool clean) {
  const bool storeLost = state.storeLost();
  const bool idle = state.connection && state.connection->idle();
  state.phase = Phase::kClosed;
  stopWorker(state);
  if (!storeLost) {
    try {
      if (state.ownsStore && !state.hostsStore) {
        sayClosed(state);
      } else if (state.ownsStore && hostWaitsUntil) {
        hostAwaitsClosers(state, *hostWaitsUntil);
      }
      if (state.storeOutlives && clean && idle) {
        clearIfLast(
            state,
            std::max(
                hostWaitsUntil.value_or(Clock::now()),
                Clock::now() + kGoodbyeDeadline));
      }
    } catch (const StoreUnavailable&) {
      // The store went first; there is nobody left to tell.
    } catch (const c10::DistNetworkError&) {
    } catch (const c10::DistStoreError&) {
    }
  }
  releaseStore(state);
}

} // namespace

std::chrono::milliseconds lingerLimit(const BarrierState& state) {
  if (!state.liveness) {
    return kMinLinger;
  }
  return std::clamp(
      state.liveness->interval() * kLingerIntervals, kMinLinger, kMaxLinger);
}

void closeBarrier(BarrierState& state, Clock::time_point deadline) {
  if (state.tree && state.phase != Phase::kClosed) {
    // The tree stays, closed, to say what it was (sequence, levels).
    state.phase = Phase::kClosed;
    state.tree->close(deadline);
    state.store.reset();
    return;
  }
  if (state.phase != Phase::kClosed) {
    // Clean: between rounds, with no verdict.
    leaveStore(state, deadline, state.phase == Phase::kBetweenRounds);
  }
}

void destroyBarrier(
    BarrierState& state,
    std::optional<Clock::time_point> lingerUntil) noexcept {
  if (state.tree) {
    state.tree->destroy();
    state.tree.reset();
    state.store.reset();
    return;
  }
  if (state.phase == Phase::kClosed) {
    releaseStore(state);
    return;
  }
  // No interrupt checks from a destructor: one that threw would end the
  // process, and Python may be finalizing.
  state.interruptCheck = nullptr;
  // Not after an interrupt: nobody else needs the store for a verdict
  // then, and Ctrl-C must end the process promptly.
  const bool endedInVerdict =
      state.timedOut || (state.phase == Phase::kLost && !state.storeLost());
  try {
    leaveStore(
        state,
        endedInVerdict ? std::optional(lingerUntil.value_or(
                             Clock::now() + lingerLimit(state)))
                       : std::nullopt,
        /*clean=*/state.phase == Phase::kBetweenRounds);
  } catch (...) {
    // Whatever the store did, the barrier is gone.
    releaseStore(state);
  }
}

} // namespace tcpstore_barrier::detail
