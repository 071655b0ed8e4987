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

namespace {

// After this long without a release a round is slow: a native rank then
// writes its `rank{r}` key, so that a timeout can name the missing ranks.
constexpr std::chrono::milliseconds kSlowRound{100};
// How often a blocked caller runs the interrupt check: well under the half
// second in which a Ctrl-C must be acted on. The check is local.
constexpr std::chrono::milliseconds kInterruptSlice{100};
// How long a timed-out round may spend naming its missing ranks: every call
// returns within its deadline plus a second.
constexpr std::chrono::milliseconds kDiagnosisBudget{900};

void checkUsable(const BarrierState& state) {
  if (state.closed) {
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
  if (!state.arrived) {
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

[[noreturn]] void throwTimeout(BarrierState& state) {
  struct Diagnosis {
    std::vector<int64_t> missing;
    std::string failure;
  };
  auto diagnosis = std::make_shared<Diagnosis>();
  const auto budget = Clock::now() + kDiagnosisBudget;
  // On the worker's connection: the caller's still awaits the release.
  const bool answered = state.worker->runBefore(
      [diagnosis,
       protocol = state.protocol.get(),
       connection = state.background.get(),
       sequence = state.sequence,
       budget] {
        try {
          diagnosis->missing =
              protocol->missingRanks(*connection, sequence, budget);
        } catch (const std::exception& e) {
          diagnosis->failure = e.what();
        }
      },
      budget);
  if (!answered) {
    detail::throwStoreUnreachable(
        state,
        fmt::format(
            "{} did not answer within {} when asked which ranks were "
            "missing at the timeout",
            state.describeStore(),
            describeSeconds(kDiagnosisBudget)));
  }
  if (!diagnosis->failure.empty()) {
    detail::throwStoreUnreachable(state, diagnosis->failure);
  }
  const auto key = state.protocol->releaseKey(state.sequence);
  throw BarrierTimeoutError(
      fmt::format(
          "TCPStoreBarrier timed out after {} on rank {} (world size {}) "
          "at barrier key '{}' (sequence {}); missing ranks: [{}]",
          describeSeconds(state.timeout),
          state.rank,
          state.worldSize,
          key,
          state.sequence,
          fmt::join(diagnosis->missing, ", ")),
      key,
      state.sequence,
      state.timeout,
      diagnosis->missing);
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
  throw error;
}

void enterRound(BarrierState& state, Clock::time_point deadline) {
  // A loss noticed between rounds ends the barrier before this rank counts
  // itself into a round that cannot complete.
  if (auto alarm = state.liveness->alarm()) {
    throwAlarm(state, *alarm);
  }
  try {
    const auto replyBy = replyDeadline(state, deadline);
    if (!state.arrivalSent) {
      state.protocol->sendArrival(*state.connection, state.sequence, replyBy);
      state.arrivalSent = true;
    }
    state.arrival = state.protocol->finishArrival(*state.connection, replyBy);
  } catch (const StoreUnavailable& e) {
    detail::throwStoreUnreachable(state, e.what());
  }
  state.arrived = true;
  state.released = state.arrival.released;
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
        state.released = true;
        return;
      }
      if (auto alarm = state.liveness->alarm()) {
        throwAlarm(state, *alarm);
      }
      if (Clock::now() >= deadline) {
        throwTimeout(state);
      }
      if (!state.slowNoted) {
        state.protocol->noteSlowRound(*state.connection, state.sequence);
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
  if (!state.released) {
    awaitRelease(state, deadline);
  }
  state.liveness->leaveRound();
  deleteFinishedRounds(state);
  ++state.sequence;
  state.arrivalSent = false;
  state.arrived = false;
  state.released = false;
}

} // namespace

namespace detail {

void throwStoreUnreachable(BarrierState& state, const std::string& what) {
  std::vector<int64_t> lostRanks;
  if (state.hostsStore || state.ownsStore) {
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
  state.storeUnreachable = true;
  throw error;
}

void BarrierAccess::sendArrival(TCPStoreBarrier& barrier) {
  BarrierState& state = *barrier.state_;
  checkUsable(state);
  if (state.arrived || state.arrivalSent) {
    return;
  }
  try {
    state.protocol->sendArrival(
        *state.connection,
        state.sequence,
        replyDeadline(state, Clock::now() + state.timeout));
  } catch (const StoreUnavailable& e) {
    throwStoreUnreachable(state, e.what());
  }
  state.arrivalSent = true;
}

bool BarrierAccess::arrivalAnswered(
    TCPStoreBarrier& barrier, std::chrono::milliseconds patience) {
  BarrierState& state = *barrier.state_;
  if (state.arrived) {
    return true;
  }
  try {
    return state.protocol->arrivalAnswered(
        *state.connection, Clock::now() + patience);
  } catch (const StoreUnavailable& e) {
    throwStoreUnreachable(state, e.what());
  }
}

} // namespace detail

void TCPStoreBarrier::executeBarrier() {
  checkUsable(*state_);
  const auto deadline = Clock::now() + state_->timeout;
  if (!state_->arrived) {
    enterRound(*state_, deadline);
  }
  completeRound(*state_, deadline);
}

void TCPStoreBarrier::arrive() {
  checkUsable(*state_);
  if (!state_->arrived) {
    enterRound(*state_, Clock::now() + state_->timeout);
  }
}

void TCPStoreBarrier::wait() {
  checkUsable(*state_);
  if (!state_->arrived) {
    throw std::logic_error(
        fmt::format(
            "TCPStoreBarrier rank {}: wait() called before arrive() for "
            "sequence {}",
            state_->rank,
            state_->sequence));
  }
  completeRound(*state_, Clock::now() + state_->timeout);
}

bool TCPStoreBarrier::released() {
  BarrierState& state = *state_;
  if (state.released || !state.arrived || state.lost || state.closed) {
    return state.released;
  }
  try {
    state.released = state.connection->awaitRelease(Clock::now(), -1);
  } catch (const StoreUnavailable&) {
    // The next wait() reports it, with the round's context.
  }
  return state.released;
}

} // namespace tcpstore_barrier
