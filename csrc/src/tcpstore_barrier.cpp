// One round of the barrier, top to bottom: enter, wait for the release,
// complete; and the errors a round ends with when it cannot complete.
//
// A rank enters round `s` with its protocol's arrival (RoundProtocol) on its
// own connection to the store, then waits on that connection for the
// release, watching at the same time the liveness alarm (a lost peer, a
// store that stopped answering) and, every 100 ms, the caller's interrupts.
// A round that times out or is interrupted stays entered: the release is
// still awaited on the connection, and the next call resumes from there.
// A lost peer or store ends the barrier: every later call raises that error.
#include <tcpstore_barrier/tcpstore_barrier.h>

#include <algorithm>
#include <memory>
#include <stdexcept>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "arguments.h"
#include "barrier_state.h"

namespace tcpstore_barrier {

using detail::BarrierState;
using detail::kDiagnosisBudget;
using detail::Phase;

namespace {

// After this long without a release a round is slow: a native rank then
// writes its `rank{r}` key, so that a timeout can name the missing ranks.
constexpr std::chrono::milliseconds kSlowRound{100};

// Where every call starts.
void checkUsable(BarrierState& state) {
  state.timedOut = false;
  if (state.phase == Phase::kClosed) {
    throw std::logic_error(
        fmt::format(
            "TCPStoreBarrier rank {} (prefix '{}') is closed",
            state.rank,
            state.prefix));
  }
  if (state.lost) {
    std::rethrow_exception(state.lost);
  }
}

// A store that does not answer for the peer timeout is taken for lost; with
// liveness off, only the call's own deadline bounds the wait for a reply.
Clock::time_point replyDeadline(
    const BarrierState& state, Clock::time_point deadline) {
  if (!state.liveness->enabled()) {
    return deadline;
  }
  return std::min(deadline, Clock::now() + state.liveness->silenceLimit());
}

std::string whatThisRankKnew(const BarrierState& state) {
  if (!state.arrived()) {
    return "this rank had not arrived in the round";
  }
  if (state.arrival.order > 0) {
    return fmt::format(
        "{} of {} ranks had arrived when this rank did",
        state.arrival.order,
        state.worldSize);
  }
  return "this rank had arrived in the round";
}

[[noreturn]] void throwAlarm(BarrierState& state, const Alarm& alarm) {
  if (alarm.kind != Alarm::Kind::kPeersLost) {
    detail::throwStoreUnreachable(state, alarm.detail);
  }
  const auto key = state.protocol->releaseKey(state.sequence);
  PeerLostError error(
      fmt::format(
          "TCPStoreBarrier rank {} (world size {}) at barrier key '{}' "
          "(sequence {}): ranks [{}] stopped showing that they are alive "
          "for {} (peer_timeout_secs); missing ranks: [{}]",
          state.rank,
          state.worldSize,
          key,
          state.sequence,
          fmt::join(alarm.lostRanks, ", "),
          describeSeconds(state.liveness->silenceLimit()),
          fmt::join(alarm.missingRanks, ", ")),
      key,
      state.sequence,
      state.liveness->silenceLimit(),
      alarm.missingRanks,
      alarm.lostRanks);
  state.lost = std::make_exception_ptr(error);
  state.phase = Phase::kLost;
  throw error;
}

// A loss noticed between rounds, or while an arrival was cut short, ends
// the barrier before this rank counts itself into a round that cannot
// complete.
void checkNoAlarm(BarrierState& state) {
  if (auto alarm = state.liveness->alarm()) {
    throwAlarm(state, *alarm);
  }
}

// Names the ranks missing at a timeout, on a connection of its own: the
// caller's still awaits the release, and the worker may be busy for longer
// than a timed-out caller may wait (a heartbeat to a slow store, a batch of
// deletes). nullopt when the store did not answer within the budget: a slow
// store is not a lost one (liveness decides that), and the round has merely
// timed out.
std::optional<std::vector<int64_t>> diagnoseTimeout(BarrierState& state) {
  const auto budget = Clock::now() + kDiagnosisBudget;
  try {
    if (!state.diagnosis) {
      state.diagnosis = state.address ? openWireConnection(
                                            *state.address,
                                            budget,
                                            state.stallLimit(),
                                            [&state] {
                                              state.runInterruptCheck();
                                            })
                                      : openC10dConnection(state.store);
    }
    return state.protocol->missingRanks(
        *state.diagnosis, state.diagnosisRankKeys, state.sequence, budget);
  } catch (const StoreUnavailable& e) {
    state.diagnosis.reset();
    // Without liveness, nothing else will ever tell a frozen store from a
    // slow one: one that cannot even say who is missing is taken for lost.
    if (!e.silent() || !state.liveness->enabled()) {
      detail::throwStoreUnreachable(state, e.what());
    }
  } catch (const c10::DistNetworkError& e) {
    // Refused until the budget ran out: nobody listens any more.
    state.diagnosis.reset();
    detail::throwStoreUnreachable(state, e.what_without_backtrace());
  } catch (...) {
    // Interrupted: a reply may be due on it.
    state.diagnosis.reset();
    throw;
  }
  return std::nullopt;
}

[[noreturn]] void throwTimeout(BarrierState& state) {
  const auto missing = diagnoseTimeout(state);
  state.timedOut = true;
  const auto key = state.protocol->releaseKey(state.sequence);
  throw BarrierTimeoutError(
      fmt::format(
          "TCPStoreBarrier timed out after {} on rank {} (world size {}) "
          "at barrier key '{}' (sequence {}); {}",
          describeSeconds(state.timeout),
          state.rank,
          state.worldSize,
          key,
          state.sequence,
          missing
              ? fmt::format("missing ranks: [{}]", fmt::join(*missing, ", "))
              : fmt::format(
                    "missing ranks unknown: {} did not say within {}",
                    state.describeStore(),
                    describeSeconds(kDiagnosisBudget))),
      key,
      state.sequence,
      state.timeout,
      missing.value_or(std::vector<int64_t>{}));
}

void startArrival(BarrierState& state, Clock::time_point deadline) {
  checkNoAlarm(state);
  try {
    state.protocol->sendArrival(
        *state.connection,
        state.round,
        state.sequence,
        replyDeadline(state, deadline));
  } catch (const StoreUnavailable& e) {
    detail::throwStoreUnreachable(state, e.what());
  }
  state.phase = Phase::kArrivalSent;
}

// Waits for the store's answer to this rank's arrival as for a release: a
// store slow to answer makes the round time out (the answer stays due, and
// the next call resumes here); only liveness, or with liveness off a store
// that does not even say who is missing, ends the barrier.
void awaitArrivalAnswer(BarrierState& state, Clock::time_point deadline) {
  for (;;) {
    const auto until = std::min(deadline, Clock::now() + kInterruptSlice);
    try {
      if (state.protocol->arrivalAnswered(*state.connection, until)) {
        return;
      }
    } catch (const StoreUnavailable& e) {
      detail::throwStoreUnreachable(state, e.what());
    }
    checkNoAlarm(state);
    if (Clock::now() >= deadline) {
      throwTimeout(state);
    }
    state.runInterruptCheck();
  }
}

void enterRound(BarrierState& state, Clock::time_point deadline) {
  if (state.phase == Phase::kBetweenRounds) {
    startArrival(state, deadline);
  } else {
    checkNoAlarm(state);
  }
  awaitArrivalAnswer(state, deadline);
  try {
    state.arrival = state.protocol->finishArrival(
        *state.connection, state.round, replyDeadline(state, deadline));
  } catch (const StoreUnavailable& e) {
    detail::throwStoreUnreachable(state, e.what());
  }
  state.phase = state.arrival.released ? Phase::kReleased : Phase::kWaiting;
  state.slowNoted = false;
  state.liveness->enterRound(
      state.sequence, state.protocol->watches(state.arrival));
}

void awaitRelease(BarrierState& state, Clock::time_point deadline) {
  const auto start = Clock::now();
  for (;;) {
    auto until = deadline;
    if (!state.slowNoted) {
      until = std::min(until, start + kSlowRound);
    } else if (state.interruptCheck) {
      until = std::min(until, Clock::now() + kInterruptSlice);
    }
    try {
      if (state.connection->awaitRelease(until, state.liveness->alarmFd())) {
        state.phase = Phase::kReleased;
        return;
      }
      checkNoAlarm(state);
      if (Clock::now() >= deadline) {
        throwTimeout(state);
      }
      if (!state.slowNoted) {
        state.protocol->noteSlowRound(*state.connection, state.round);
        state.connection->flush(replyDeadline(state, deadline));
        state.slowNoted = true;
      }
    } catch (const StoreUnavailable& e) {
      detail::throwStoreUnreachable(state, e.what());
    }
    state.runInterruptCheck();
  }
}

void completeRound(BarrierState& state, Clock::time_point deadline) {
  if (state.phase != Phase::kReleased) {
    awaitRelease(state, deadline);
  }
  state.liveness->leaveRound();
  deleteFinishedRounds(state);
  ++state.sequence;
  state.phase = Phase::kBetweenRounds;
}

} // namespace

namespace detail {

bool BarrierState::storeLost() const {
  if (!lost) {
    return false;
  }
  try {
    std::rethrow_exception(lost);
  } catch (const StoreUnreachableError&) {
    return true;
  } catch (...) {
    return false;
  }
}

std::chrono::milliseconds BarrierState::stallLimit() const {
  if (peerTimeout) {
    return LivenessTiming(
               peerTimeout,
               static_cast<int64_t>(shape.memberRanks(worldSize).size()))
        .silenceLimit;
  }
  return std::max(timeout, std::chrono::milliseconds(1000));
}

void throwStoreUnreachable(BarrierState& state, const std::string& what) {
  // A verdict on lost peers, once this rank has it, outlives the store: a
  // host that exits right after its own PeerLostError takes the store with
  // it, and must not change what the survivors name.
  if (state.liveness) {
    if (auto alarm = state.liveness->alarm();
        alarm && alarm->kind == Alarm::Kind::kPeersLost) {
      throwAlarm(state, *alarm);
    }
  }
  std::vector<int64_t> lostRanks;
  if (state.ownsStore) {
    lostRanks.push_back(0);
  }
  StoreUnreachableError error(
      fmt::format(
          "TCPStoreBarrier rank {} of {} (barrier prefix '{}', sequence {}): "
          "{}; {}",
          state.rank,
          state.worldSize,
          state.prefix,
          state.sequence,
          what,
          whatThisRankKnew(state)),
      state.sequence,
      lostRanks);
  state.lost = std::make_exception_ptr(error);
  state.phase = Phase::kLost;
  throw error;
}

void BarrierAccess::sendArrival(TCPStoreBarrier& barrier) {
  BarrierState& state = *barrier.state_;
  checkUsable(state);
  if (state.tree) {
    state.tree->sendArrival();
    return;
  }
  if (state.phase == Phase::kBetweenRounds) {
    startArrival(state, Clock::now() + state.timeout);
  }
}

bool BarrierAccess::arrivalAnswered(
    TCPStoreBarrier& barrier, std::chrono::milliseconds patience) {
  BarrierState& state = *barrier.state_;
  if (state.tree) {
    return state.tree->arrivalAnswered(patience);
  }
  if (state.phase != Phase::kArrivalSent) {
    return true;
  }
  try {
    return state.protocol->arrivalAnswered(
        *state.connection, Clock::now() + patience);
  } catch (const StoreUnavailable& e) {
    throwStoreUnreachable(state, e.what());
  }
}

void BarrierAccess::executeUntil(
    TCPStoreBarrier& barrier, Clock::time_point deadline) {
  BarrierState& state = *barrier.state_;
  checkUsable(state);
  if (!state.arrived()) {
    enterRound(state, deadline);
  }
  completeRound(state, deadline);
}

void BarrierAccess::arriveUntil(
    TCPStoreBarrier& barrier, Clock::time_point deadline) {
  BarrierState& state = *barrier.state_;
  checkUsable(state);
  if (!state.arrived()) {
    enterRound(state, deadline);
  }
}

void BarrierAccess::waitUntil(
    TCPStoreBarrier& barrier, Clock::time_point deadline) {
  BarrierState& state = *barrier.state_;
  checkUsable(state);
  if (state.phase == Phase::kBetweenRounds) {
    throw std::logic_error(
        fmt::format(
            "TCPStoreBarrier rank {}: wait() called before arrive() for "
            "sequence {}",
            state.rank,
            state.sequence));
  }
  if (!state.arrived()) {
    // arrive() was cut short before the store's answer: finish it.
    enterRound(state, deadline);
  }
  completeRound(state, deadline);
}

std::optional<Alarm> BarrierAccess::alarm(const TCPStoreBarrier& barrier) {
  const BarrierState& state = *barrier.state_;
  return state.liveness ? state.liveness->alarm() : std::nullopt;
}

} // namespace detail

void TCPStoreBarrier::executeBarrier() {
  const auto deadline = Clock::now() + state_->timeout;
  if (state_->tree) {
    checkUsable(*state_);
    state_->tree->execute(deadline);
    return;
  }
  detail::BarrierAccess::executeUntil(*this, deadline);
}

void TCPStoreBarrier::arrive() {
  const auto deadline = Clock::now() + state_->timeout;
  if (state_->tree) {
    checkUsable(*state_);
    state_->tree->arrive(deadline);
    return;
  }
  detail::BarrierAccess::arriveUntil(*this, deadline);
}

void TCPStoreBarrier::wait() {
  const auto deadline = Clock::now() + state_->timeout;
  if (state_->tree) {
    checkUsable(*state_);
    state_->tree->wait(deadline);
    return;
  }
  detail::BarrierAccess::waitUntil(*this, deadline);
}

bool TCPStoreBarrier::released() {
  BarrierState& state = *state_;
  if (state.tree) {
    return state.phase != Phase::kClosed && state.tree->released();
  }
  if (state.phase != Phase::kWaiting) {
    return state.phase == Phase::kReleased;
  }
  try {
    if (state.connection->awaitRelease(Clock::now(), -1)) {
      state.phase = Phase::kReleased;
    }
  } catch (const StoreUnavailable&) {
    // The next wait() reports it, with the round's context.
  }
  return state.phase == Phase::kReleased;
}

} // namespace tcpstore_barrier
