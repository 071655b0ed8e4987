// Housekeeping: deleting finished rounds' keys so that the store stays
// bounded, and the shutdown handshake of close().
#include <algorithm>
#include <map>
#include <thread>

#include <c10/util/Logging.h>
#include <fmt/format.h>

#include "barrier_state.h"

namespace tcpstore_barrier::detail {
namespace {

// Finished rounds' keys are deleted in batches of kBatch rounds, the ranks
// taking turns, by the worker once its barrier has been quiet for kQuiet:
// between checkpoints the store is idle, while in a tight loop the deletes
// would double its server's work per round. Keys of at most
// kMaxPendingRounds rounds wait so; past that they go at once.
constexpr int64_t kBatch = 32;
constexpr std::chrono::milliseconds kQuiet{50};
constexpr int64_t kMaxPendingRounds = 1024;
constexpr std::chrono::milliseconds kDeleteDeadline{5000};
// How often rank 0's close() looks for ranks that have closed.
constexpr std::chrono::milliseconds kClosePoll{10};

constexpr std::string_view kClosedInfix = "/closed/";

std::string closedKey(const BarrierState& state, int64_t rank) {
  std::string key = state.prefix;
  key.append(kClosedInfix);
  appendDecimal(key, rank);
  return key;
}

// Rank 0 waits until every other rank of this library has said it closed,
// or has been silent for the liveness limit (it will never say so), or the
// barrier's timeout runs out.
void awaitClosers(
    BarrierState& state, StoreConnection& store, Clock::time_point deadline) {
  std::vector<int64_t> pending;
  {
    std::vector<std::string> aliveKeys;
    for (int64_t r = 1; r < state.worldSize; ++r) {
      aliveKeys.push_back(state.liveness->aliveKey(r));
    }
    // torch's ranks have no counter: they never close, and are not awaited.
    const auto members = store.checkEach(aliveKeys, deadline);
    for (std::size_t i = 0; i < members.size(); ++i) {
      if (members[i]) {
        pending.push_back(static_cast<int64_t>(i) + 1);
      }
    }
  }
  if (auto alarm = state.liveness->alarm()) {
    for (const int64_t lost : alarm->lostRanks) {
      pending.erase(
          std::remove(pending.begin(), pending.end(), lost), pending.end());
    }
  }
  std::map<int64_t, std::pair<std::string, Clock::time_point>> seen;
  auto nextLook = Clock::now();
  while (!pending.empty()) {
    std::vector<std::string> keys;
    for (const int64_t rank : pending) {
      keys.push_back(closedKey(state, rank));
    }
    if (store.check(keys, deadline)) {
      return;
    }
    const auto now = Clock::now();
    if (now >= deadline) {
      LOG(INFO) << "TCPStoreBarrier rank 0: closing " << store.describe()
                << " although " << pending.size()
                << " ranks had not closed within the timeout";
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
          auto [entry, first] = seen.try_emplace(pending[i], values[i], now);
          if (first || entry->second.first != values[i]) {
            entry->second = {values[i], now};
            alive.push_back(pending[i]);
          } else if (
              now - entry->second.second < state.liveness->silenceLimit()) {
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

bool tooManyWaiting(const DeleteQueue& queue) {
  return !queue.batches.empty() &&
         queue.completed - queue.batches.front() >= kMaxPendingRounds;
}

// On the worker: deletes the queued batches once the barrier is quiet, or
// at once when too many rounds wait.
void deleteWhenQuiet(BarrierState& state) {
  std::deque<int64_t> batches;
  {
    std::lock_guard<std::mutex> lock(state.deletes.mutex);
    DeleteQueue& queue = state.deletes;
    if (queue.batches.empty()) {
      return; // an urgent run took them
    }
    const auto quietFrom = queue.lastRound + kQuiet;
    if (Clock::now() < quietFrom && !tooManyWaiting(queue)) {
      state.worker->postAt(
          [&state] {
            deleteWhenQuiet(state);
          },
          quietFrom);
      return;
    }
    batches.swap(queue.batches);
    queue.scheduled = false;
    queue.urgent = false;
  }
  for (const int64_t newest : batches) {
    state.protocol->deleteRounds(
        *state.background, newest, kBatch, Clock::now() + kDeleteDeadline);
  }
}

} // namespace

void deleteFinishedRounds(BarrierState& state) {
  // Round s has released, so every rank has returned from round s-1 and the
  // keys of rounds up to s-1 are no longer read.
  const int64_t sequence = state.sequence;
  const bool myTurn = sequence > 0 && sequence % kBatch == 0 &&
                      (sequence / kBatch) % state.worldSize == state.rank;
  std::lock_guard<std::mutex> lock(state.deletes.mutex);
  DeleteQueue& queue = state.deletes;
  queue.lastRound = Clock::now();
  queue.completed = sequence;
  if (myTurn) {
    queue.batches.push_back(sequence - 1);
  }
  if (tooManyWaiting(queue) && !queue.urgent) {
    queue.urgent = true;
    queue.scheduled = true;
    state.worker->post([&state] {
      deleteWhenQuiet(state);
    });
  } else if (!queue.batches.empty() && !queue.scheduled) {
    queue.scheduled = true;
    state.worker->postAt(
        [&state] {
          deleteWhenQuiet(state);
        },
        queue.lastRound + kQuiet);
  }
}

void closeBarrier(BarrierState& state) {
  if (state.closed) {
    return;
  }
  state.closed = true;
  // stop() before reset(): reset() clears the pointer that a job in flight
  // (deleteWhenQuiet re-posting itself) still reads.
  state.worker->stop();
  state.worker.reset();
  // The handshake only among ranks of a store this library created, and
  // only while that store still answers.
  if (state.ownsStore && !state.storeUnreachable) {
    const auto deadline = Clock::now() + state.timeout;
    try {
      if (state.hostsStore) {
        // A round left entered still awaits its release on the caller's
        // connection: replies to anything else would cross it.
        std::unique_ptr<StoreConnection> fresh;
        if (state.arrived && !state.released) {
          fresh = openWireConnection(*state.address, deadline);
        }
        awaitClosers(state, fresh ? *fresh : *state.connection, deadline);
      } else {
        // The last request of this rank, and one without a reply: once the
        // host has seen it, nothing of ours is left in flight.
        state.connection->set(closedKey(state, state.rank), "1");
        state.connection->flush(deadline);
      }
    } catch (const StoreUnavailable&) {
      // The store went first; there is nobody left to tell.
    } catch (const c10::DistNetworkError&) {
    }
  }
  state.background.reset();
  state.connection.reset();
  state.store.reset();
}

} // namespace tcpstore_barrier::detail
