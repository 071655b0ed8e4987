// Housekeeping: deleting finished rounds' keys so that the store stays
// bounded.
#include <algorithm>

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

bool tooManyWaiting(const DeleteQueue& queue) {
  return !queue.batches.empty() &&
         queue.completed - queue.batches.front() >= kMaxPendingRounds;
}

// On the worker: deletes the queued batches once the barrier is quiet, or
// at once when too many rounds wait. A job may use `state` (the worker's
// own pointer included): close.cpp stops the worker before it releases
// anything of it.
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
  const bool myTurn =
      sequence > 0 && sequence % kBatch == 0 &&
      (sequence / kBatch) % state.turns.count == state.turns.mine;
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

} // namespace tcpstore_barrier::detail
