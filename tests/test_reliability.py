"""Reliability: timeouts, retries, Ctrl-C, dead peers, a dead store, close(),
a bounded store and where rank 0 listens.

Every scenario runs real TCPStores on 127.0.0.1 with one process per rank
(forkserver, see support/launch.py). A scenario that several tests judge runs once
per module (a fixture) and each test checks one behaviour of its outcome.
Measured figures are printed as ``FIGURE name: value`` lines (see them
with ``pytest -s``).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from support import LOOPBACK, free_port, report_figure
from support.barriers import (
    await_arrivals,
    describe,
    our_barrier,
    timed_round,
    torch_barrier,
)
from support.launch import run_ranks

from tcpstore_barrier import BarrierTimeoutError, TCPStoreBarrier

# Short enough to keep the suite fast, long enough to dwarf scheduling noise
# on 2 busy cores.
TIMEOUT = 1.0
# How late a timeout may fire.
TIMEOUT_SLACK = 1.0
TESTS = Path(__file__).resolve().parent

# Rank bodies return plain data (times from time.monotonic(), which is one
# clock for every process of the machine) for the tests to judge. Ranks
# coordinate through the barrier's own store with keys outside the
# barrier's key space.
PREFIX = "ckpt"
# How long a rank waits for a coordination key before giving up: far beyond
# anything a passing test needs, short enough that a broken one ends.
COORDINATION = timedelta(seconds=20)


def make(rank, world_size, port, *, timeout=10.0, init=10.0, protocol="torch"):
    return our_barrier(
        rank, world_size, port, prefix=PREFIX, init=init, timeout=timeout,
        options={"protocol": protocol},
    )  # fmt: skip


def _die_once_counted(store, count):
    """Dies (see _die) once `count` ranks are counted in round 1."""
    await_arrivals(store, PREFIX, 1, count)
    _die(store)


def _die(store):
    """Notes on `store` when this process dies, then SIGKILLs it."""
    store.set("test/killed_at", repr(time.monotonic()))
    os.kill(os.getpid(), signal.SIGKILL)


def listening_addresses(port):
    """Local addresses of the sockets in LISTEN state on `port`."""
    found = []
    for table, family in (("/proc/net/tcp", "v4"), ("/proc/net/tcp6", "v6")):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:
                if family == "v4":
                    address = socket.inet_ntop(
                        socket.AF_INET, bytes.fromhex(address)[::-1]
                    )
                else:
                    raw = bytes.fromhex(address)
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    address = socket.inet_ntop(socket.AF_INET6, words)
                found.append(address)
    return found


def connects(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect((host, port))
        except OSError:
            return False
        return True


# --- 1. timeouts -------------------------------------------------------------

# 4 ranks; ranks 0 and 2 enter, 1 and 3 never do.
ARRIVING = (0, 2)
NEVER = [1, 3]


def timeout_round(rank, world_size, port, arriving, rounds_before, timeout):
    """Complete `rounds_before` rounds with everyone, then only `arriving`
    ranks enter the next one; they report how their wait ended."""
    barrier = make(rank, world_size, port, timeout=timeout)
    store = barrier.store
    for _ in range(rounds_before):
        barrier.execute_barrier()
    result = None
    if rank in arriving:
        start = time.monotonic()
        try:
            barrier.execute_barrier()
        except Exception as e:  # noqa: BLE001 - judged by the test
            elapsed = time.monotonic() - start
            result = {"elapsed": elapsed, "error": describe(e), "exception": e}
        else:
            result = {"elapsed": time.monotonic() - start, "error": None}
        result["sequence_after"] = barrier.sequence
        store.set(f"test/done{rank}", "1")
    store.wait([f"test/done{r}" for r in arriving], COORDINATION)
    barrier.close()
    return result


@pytest.fixture(scope="module", params=[0, 1], ids=["first-round", "later-round"])
def timed_out(request):
    """Ranks 0 and 2 enter round `rounds_before` alone; they time out."""
    rounds_before = request.param
    results = run_ranks(
        timeout_round,
        4,
        free_port(),
        ARRIVING,
        rounds_before,
        TIMEOUT,
    )
    return rounds_before, [results[r] for r in ARRIVING]


def test_timeout_raises_no_earlier_than_timeout_secs_and_within_one_second_of_it(
    timed_out,
):
    _, outcomes = timed_out
    for outcome in outcomes:
        assert outcome["error"] is not None, "the round completed without ranks 1, 3"
        assert TIMEOUT - 0.01 <= outcome["elapsed"] <= TIMEOUT + TIMEOUT_SLACK
    report_figure("timeout_overshoot_s", max(o["elapsed"] - TIMEOUT for o in outcomes))


def test_timeout_is_a_barrier_timeout_error_and_a_dist_store_error(timed_out):
    _, outcomes = timed_out
    for outcome in outcomes:
        error = outcome["exception"]
        assert type(error) is BarrierTimeoutError
        assert isinstance(error, dist.DistStoreError)
        assert outcome["error"]["is_barrier_timeout"]
        assert outcome["error"]["is_dist_store_error"]


def test_timeout_names_the_missing_ranks_sorted(timed_out):
    _, outcomes = timed_out
    for outcome in outcomes:
        assert outcome["error"]["missing_ranks"] == NEVER


def test_timeout_reports_key_sequence_and_time_limit(timed_out):
    sequence, outcomes = timed_out
    for outcome in outcomes:
        error = outcome["error"]
        assert error["barrier_key"] == f"{PREFIX}{sequence}/last_member"
        assert error["sequence"] == sequence
        assert error["timeout_secs"] == pytest.approx(TIMEOUT)


def test_timeout_message_states_key_sequence_missing_ranks_and_time_limit(timed_out):
    sequence, outcomes = timed_out
    for outcome in outcomes:
        message = outcome["error"]["message"]
        assert f"{PREFIX}{sequence}/last_member" in message
        assert re.search(rf"sequence\D{{0,3}}{sequence}\b", message), message
        assert re.search(r"missing[^\[]*\[1, 3\]", message), message
        assert re.search(r"\b1(\.0+)?\s*s\b", message), message


def test_timeout_leaves_the_sequence_unchanged(timed_out):
    sequence, outcomes = timed_out
    for outcome in outcomes:
        assert outcome["sequence_after"] == sequence


def test_timeout_exception_survives_pickling(timed_out):
    # It crossed a process boundary to get here; its fields came along.
    _, outcomes = timed_out
    error = outcomes[0]["exception"]
    assert error.missing_ranks == NEVER
    assert error.barrier_key == outcomes[0]["error"]["barrier_key"]


# --- 2. resuming after a timeout ---------------------------------------------

SHORT_TIMEOUT = 0.4
TIMEOUTS_BEFORE_LATE = 2


# Each protocol's key that releases round 0, and the one that counts its
# arrivals (native: the server-side barrier's own count).
RELEASE_KEY = {"torch": f"{PREFIX}0/last_member", "native": f"{PREFIX}0/barrier"}
COUNT_KEY = {"torch": f"{PREFIX}0/num_members", "native": f"{PREFIX}0/barrier"}


def resume_after_timeouts(
    rank, world_size, port, short_timeout, timeouts_before_late, protocol
):
    """Rank 1 times out `timeouts_before_late` times and retries; only then
    does rank 2 enter. Everyone reports (entered, left) and what it saw."""
    barrier = make(
        rank, world_size, port, timeout=short_timeout if rank == 1 else 15.0,
        protocol=protocol,
    )  # fmt: skip
    store = barrier.store
    result = {"timeouts": [], "sequences_after_timeouts": []}
    if rank == 2:
        store.wait(["test/rank1_timed_out"], COORDINATION)
    entered = time.monotonic()
    if rank == 1:
        for _attempt in range(50):
            try:
                barrier.execute_barrier()
                break
            except Exception as e:  # noqa: BLE001
                result["timeouts"].append(describe(e))
                result["sequences_after_timeouts"].append(barrier.sequence)
                if len(result["timeouts"]) == timeouts_before_late:
                    store.set("test/rank1_timed_out", "1")
        else:
            raise AssertionError("rank 1 never got through the round")
    else:
        barrier.execute_barrier()
    left = time.monotonic()
    result.update(entered=entered, left=left, sequence=barrier.sequence)
    if rank == 0:
        # Round 0's keys live until round 1 has released.
        result["counted"] = int(store.get(COUNT_KEY[protocol]))
        store.set("test/counted", "1")
    store.wait(["test/counted"], COORDINATION)
    # The barrier keeps working after the retries.
    barrier.execute_barrier()
    result["sequence_final"] = barrier.sequence
    barrier.close()
    return result


@pytest.fixture(scope="module", params=["torch", "native"])
def resumed(request):
    protocol = request.param
    results = run_ranks(
        resume_after_timeouts,
        3,
        free_port(),
        SHORT_TIMEOUT,
        TIMEOUTS_BEFORE_LATE,
        protocol,
    )
    return protocol, [results[r] for r in range(3)]


def test_retrying_rank_times_out_naming_the_late_rank(resumed):
    protocol, resumed = resumed
    timeouts = resumed[1]["timeouts"]
    assert len(timeouts) >= TIMEOUTS_BEFORE_LATE
    for error in timeouts:
        assert error["type"] == "BarrierTimeoutError", error
        assert error["sequence"] == 0
        assert error["barrier_key"] == RELEASE_KEY[protocol], error
        assert error["missing_ranks"] == [2]


def test_no_rank_leaves_before_the_last_rank_enters_despite_retries(resumed):
    _, resumed = resumed
    last_entry = max(r["entered"] for r in resumed)
    assert last_entry == resumed[2]["entered"]
    for rank, result in enumerate(resumed):
        assert result["left"] >= last_entry, f"rank {rank} left early"


def test_sequence_advances_only_when_the_round_completes(resumed):
    _, resumed = resumed
    assert set(resumed[1]["sequences_after_timeouts"]) == {0}
    assert [r["sequence"] for r in resumed] == [1, 1, 1]
    assert [r["sequence_final"] for r in resumed] == [2, 2, 2]


def test_retries_never_count_a_rank_twice(resumed):
    _, resumed = resumed
    assert resumed[0]["counted"] == 3


# --- 3. Ctrl-C ---------------------------------------------------------------

INTERRUPT_LATENCY = 0.5


# When the signals come, after the blocked rank's arrival is on the store
# (so it is inside execute_barrier(), in the try that handles them): inside
# the first moments of its wait, or well into it.
SIGNAL_TIMES = {"early": (0.01, 0.02), "late": (0.3, 0.7)}


def interrupted_rank(rank, world_size, port, timeout, usr1_after, int_after):
    """Rank 1 blocks in a round rank 0 has not entered; rank 0 sends it
    SIGUSR1 and SIGINT `usr1_after` and `int_after` seconds after its
    arrival shows on the store, then enters once rank 1 has resumed."""
    barrier = make(rank, world_size, port, timeout=timeout)
    store = barrier.store
    if rank == 0:
        store.wait(["test/pid1"], COORDINATION)
        pid = int(store.get("test/pid1"))
        # Rank 1 counts itself in from inside execute_barrier(): from then on
        # a signal finds it in the call.
        await_arrivals(store, PREFIX, 0, 1)
        entered1 = time.monotonic()
        time.sleep(max(0.0, entered1 + usr1_after - time.monotonic()))
        usr1_sent = time.monotonic()
        os.kill(pid, signal.SIGUSR1)
        time.sleep(max(0.0, entered1 + int_after - time.monotonic()))
        int_sent = time.monotonic()
        os.kill(pid, signal.SIGINT)
        store.wait(["test/resumed"], COORDINATION)
        time.sleep(0.3)
        entered = time.monotonic()
        barrier.execute_barrier()
        barrier.close()
        return {
            "usr1_sent": usr1_sent,
            "int_sent": int_sent,
            "entered": entered,
            "usr1_after": usr1_after,
            "int_after": int_after,
        }

    signal.signal(signal.SIGINT, signal.default_int_handler)
    state = {"in_barrier": False}
    handled = []
    signal.signal(
        signal.SIGUSR1,
        lambda signum, frame: handled.append((time.monotonic(), state["in_barrier"])),
    )
    result = {
        "completed_first_call": False,
        "interrupted_at": None,
        "other_error": None,
    }
    store.set("test/pid1", str(os.getpid()))
    state["in_barrier"] = True
    try:
        barrier.execute_barrier()
        result["completed_first_call"] = True
    except KeyboardInterrupt:
        result["interrupted_at"] = time.monotonic()
    except BaseException as e:  # noqa: BLE001
        result["other_error"] = describe(e)
    state["in_barrier"] = False
    result["sequence_after_interrupt"] = barrier.sequence
    result["handled"] = list(handled)
    store.set("test/resumed", "1")
    barrier.execute_barrier()
    result["left"] = time.monotonic()
    result["sequence_after_resume"] = barrier.sequence
    result["num_members"] = store.add(f"{PREFIX}0/num_members", 0)
    barrier.close()
    return result


@pytest.fixture(scope="module", params=sorted(SIGNAL_TIMES))
def interrupted(request):
    usr1_after, int_after = SIGNAL_TIMES[request.param]
    results = run_ranks(interrupted_rank, 2, free_port(), 30.0, usr1_after, int_after)
    return results[0], results[1]


def test_sigint_raises_keyboard_interrupt_within_half_a_second(interrupted):
    sender, blocked = interrupted
    assert blocked["other_error"] is None, blocked["other_error"]
    assert not blocked["completed_first_call"]
    assert blocked["interrupted_at"] is not None
    latency = blocked["interrupted_at"] - sender["int_sent"]
    report_figure(f"ctrl_c_latency_s[{sender['int_after']}]", latency)
    assert 0 <= latency < INTERRUPT_LATENCY


def test_python_signal_handler_runs_while_blocked(interrupted):
    sender, blocked = interrupted
    assert len(blocked["handled"]) == 1, blocked["handled"]
    handled_at, in_barrier = blocked["handled"][0]
    assert in_barrier
    latency = handled_at - sender["usr1_sent"]
    report_figure(f"signal_handler_latency_s[{sender['usr1_after']}]", latency)
    assert 0 <= latency < INTERRUPT_LATENCY


def test_interrupt_leaves_the_round_entered(interrupted):
    _, blocked = interrupted
    assert blocked["sequence_after_interrupt"] == 0


def test_next_call_after_interrupt_completes_the_same_round(interrupted):
    sender, blocked = interrupted
    assert blocked["sequence_after_resume"] == 1
    assert blocked["left"] >= sender["entered"]
    assert blocked["num_members"] == 2


# Rank 1 of 2 enters a round rank 0 never enters, says so on stdout and
# blocks; the test interrupts it. It exits the way Python does.
BLOCKED_RANK = """
import sys
from support.barriers import our_barrier
barrier = our_barrier(1, 2, int(sys.argv[1]), timeout=float(sys.argv[2]), init=10.0)
print("entering", flush=True)
barrier.execute_barrier()
print("released?!", flush=True)
"""


def test_ctrl_c_then_exit_ends_the_process_promptly(port):
    """What a user does: Ctrl-C a rank stuck in a barrier and let Python exit."""
    host = []
    hosting = threading.Thread(
        target=lambda: host.append(make(0, 2, port, timeout=0.5)), daemon=True
    )
    hosting.start()
    with subprocess.Popen(
        [sys.executable, "-c", BLOCKED_RANK, str(port), "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=TESTS,
    ) as child:
        try:
            assert child.stdout.readline().strip() == "entering"
            # Signalled once its arrival is on the store: blocked in the call.
            client = dist.TCPStore(
                LOOPBACK, port, is_master=False, timeout=COORDINATION
            )
            await_arrivals(client, "ckpt", 0, 1)
            sent = time.monotonic()
            child.send_signal(signal.SIGINT)
            try:
                _, stderr = child.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                pytest.fail("the interrupted process did not exit within 5 s")
            elapsed = time.monotonic() - sent
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
    hosting.join(timeout=15)
    for barrier in host:
        barrier.close()
    report_figure("ctrl_c_exit_s", elapsed)
    assert child.returncode in (-signal.SIGINT, 128 + signal.SIGINT, 1), stderr
    assert "KeyboardInterrupt" in stderr
    assert elapsed < 2.0


# --- 4. peer failure ---------------------------------------------------------

VICTIM = 2


DEATHS = ["before", "while others wait", "after entering"]


def peer_killed(rank, world_size, port, victim, when, timeout):
    """The victim dies by SIGKILL `when` ("before" entering round 1, "while
    others wait" in round 1, or "after entering" round 1); survivors report
    how their rounds ended."""
    barrier = make(rank, world_size, port, timeout=timeout)
    store = barrier.store
    barrier.execute_barrier()  # round 0: everyone is alive
    survivors = [r for r in range(world_size) if r != victim]
    if rank == victim:
        if when == "before":
            _die(store)
        elif when == "while others wait":
            # Both survivors are counted in round 1: they wait there.
            await_arrivals(store, PREFIX, 1, len(survivors))
            _die(store)
        else:  # "after entering": dies while blocked in round 1
            # Only survivors[0] and the victim enter before the death: a
            # count of 2 is the victim's own arrival.
            threading.Thread(target=_die_once_counted, args=(store, 2)).start()
            barrier.execute_barrier()
        # Released by a survivor in the instant before SIGKILL landed.
        time.sleep(COORDINATION.total_seconds())
        raise AssertionError("the victim outlived its SIGKILL")

    rounds = []
    if when == "after entering" and rank == survivors[-1]:
        # Enter round 1 only once the victim, counted in it, is killed.
        store.wait(["test/killed_at"], COORDINATION)
    for _ in range(2 if when == "after entering" else 1):
        rounds.append(timed_round(barrier))
        if rounds[-1]["error"] is not None:
            break
    killed_at = (
        float(store.get("test/killed_at")) if store.check(["test/killed_at"]) else None
    )
    if rank == 0:
        # close() would wait timeout_secs for the dead rank to close too;
        # the store only has to outlive the other survivors' last use.
        store.wait([f"test/done{r}" for r in survivors if r != 0], COORDINATION)
    else:
        barrier.close()
        store.set(f"test/done{rank}", "1")
    return {"rounds": rounds, "killed_at": killed_at}


@pytest.fixture(scope="module")
def peer_death():
    """peer_death(when) -> survivors' outcomes; each scenario runs once."""
    outcomes = {}

    def run(when):
        if when not in outcomes:
            results = run_ranks(
                peer_killed,
                3,
                free_port(),
                VICTIM,
                when,
                TIMEOUT,
                killed=(VICTIM,),
            )
            outcomes[when] = [results[0], results[1]]
        return outcomes[when]

    return run


@pytest.mark.parametrize("when", DEATHS)
def test_killed_peer_is_named_missing_by_every_survivor(peer_death, when):
    for survivor in peer_death(when):
        rounds = survivor["rounds"]
        failed = rounds[-1]["error"]
        assert failed is not None, f"survivors never timed out: {rounds}"
        assert failed["is_barrier_timeout"], failed
        assert failed["missing_ranks"] == [VICTIM]


@pytest.mark.parametrize("when", DEATHS)
def test_killed_peer_is_reported_within_timeout_secs(peer_death, when):
    survivors = peer_death(when)
    for survivor in survivors:
        failed = survivor["rounds"][-1]
        assert TIMEOUT - 0.01 <= failed["elapsed"] <= TIMEOUT + TIMEOUT_SLACK
    report_figure(
        f"time_to_name_killed_rank_after_death_s[{when}]",
        max(s["rounds"][-1]["ended_at"] - s["killed_at"] for s in survivors),
    )
    report_figure(
        f"killed_rank_round_overshoot_s[{when}]",
        max(s["rounds"][-1]["elapsed"] - TIMEOUT for s in survivors),
    )


def test_round_a_peer_died_in_after_entering_still_completes(peer_death):
    # It did enter: the round is complete, and the next one names it.
    for survivor in peer_death("after entering"):
        assert survivor["rounds"][0]["error"] is None
        assert survivor["rounds"][1]["error"]["sequence"] == 2


STORE_TIMEOUT = 3.0


def store_host_killed(rank, world_size, port, timeout):
    """Rank 0 (the store's host) dies by SIGKILL while the others wait in
    round 1; they report what they raised, and that close() copes."""
    barrier = make(rank, world_size, port, timeout=timeout)
    store = barrier.store
    barrier.execute_barrier()
    if rank == 0:
        # The others are counted in round 1: they wait there.
        await_arrivals(store, PREFIX, 1, world_size - 1)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("rank 0 outlived its SIGKILL")
    result = timed_round(barrier)
    close_start = time.monotonic()
    try:
        barrier.close()
        result["close_error"] = None
    except Exception as e:  # noqa: BLE001
        result["close_error"] = describe(e)
    result["close_elapsed"] = time.monotonic() - close_start
    return result


@pytest.fixture(scope="module")
def store_host_death():
    port = free_port()
    results = run_ranks(store_host_killed, 3, port, STORE_TIMEOUT, killed=(0,))
    return port, [results[1], results[2]]


def test_store_host_failure_raises_dist_error_saying_the_store_is_gone(
    store_host_death,
):
    port, survivors = store_host_death
    for survivor in survivors:
        error = survivor["error"]
        assert error is not None, "the round completed without the store's host"
        # A DistNetworkError, as torch raises for a store that went away,
        # naming rank 0, the store's host; not a timeout.
        assert error["type"] == "StoreUnreachableError", error
        assert error["is_dist_network_error"], error
        assert not error["is_barrier_timeout"], error
        assert error["lost_ranks"] == [0], error
        assert f"{LOOPBACK}:{port}" in error["message"]
        assert "gone" in error["message"]


def test_store_host_failure_is_reported_before_timeout_secs(store_host_death):
    _, survivors = store_host_death
    for survivor in survivors:
        assert survivor["elapsed"] < STORE_TIMEOUT
    report_figure("store_loss_detected_s", max(s["elapsed"] for s in survivors))


def test_close_after_store_host_failure_returns_quietly(store_host_death):
    _, survivors = store_host_death
    for survivor in survivors:
        assert survivor["close_error"] is None, survivor["close_error"]
        assert survivor["close_elapsed"] < STORE_TIMEOUT


def test_store_host_failure_message_carries_no_cpp_backtrace(store_host_death):
    _, survivors = store_host_death
    for survivor in survivors:
        message = survivor["error"]["message"]
        assert "frame #" not in message
        assert "Exception raised from" not in message


# --- 4. close() --------------------------------------------------------------

LINGER = 1.0


def slow_peer_close(rank, world_size, port, linger):
    """Both ranks use the context manager. Rank 1 enters the last round
    first and finishes it (wait, store use, close) `linger` seconds after rank
    0 has released it and gone straight on to close."""
    with make(rank, world_size, port, timeout=10.0) as barrier:
        assert isinstance(barrier, TCPStoreBarrier)
        store = barrier.store
        for _ in range(3):
            barrier.execute_barrier()
        if rank == 1:
            barrier.arrive()
            store.set("test/rank1_arrived", "1")
            time.sleep(linger)
            barrier.wait()
            store.set("test/rank1_after", "still here")
            value = store.get("test/rank1_after")
            close_start = time.monotonic()
        else:
            store.wait(["test/rank1_arrived"], COORDINATION)
            barrier.execute_barrier()  # the last arriver: released at once
            close_start = time.monotonic()
            value = None
    return {
        "close_elapsed": time.monotonic() - close_start,
        "sequence": barrier.sequence,
        "value": value,
        "closed": barrier.closed,
    }


def test_host_close_waits_for_a_peer_still_finishing_its_last_round(port):
    host, peer = run_ranks(slow_peer_close, 2, port, LINGER, timeout=30)
    # The peer's wait(), store use and close all needed the store: they
    # worked, so rank 0 kept it up until the peer had closed.
    assert peer["value"] == b"still here"
    assert peer["sequence"] == host["sequence"] == 4
    assert host["closed"] and peer["closed"]
    assert host["close_elapsed"] >= LINGER - 0.1


def _single_rank(port, **kwargs):
    return make(0, 1, port, timeout=2.0, init=5.0, **kwargs)


def test_close_is_idempotent(port):
    barrier = _single_rank(port)
    barrier.execute_barrier()
    barrier.close()
    barrier.close()
    with barrier:
        pass
    assert barrier.closed


def test_context_manager_closes_the_barrier(port):
    with _single_rank(port) as barrier:
        barrier.execute_barrier()
        assert not barrier.closed
    assert barrier.closed


@pytest.mark.parametrize("method", ["execute_barrier", "arrive", "wait"])
def test_using_a_closed_barrier_raises_a_clear_error(port, method):
    barrier = _single_rank(port)
    barrier.close()
    start = time.monotonic()
    with pytest.raises((RuntimeError, ValueError), match="closed"):
        getattr(barrier, method)()
    assert time.monotonic() - start < 0.5


def test_close_of_the_host_releases_its_port(port):
    barrier = _single_rank(port)
    assert connects(LOOPBACK, port)
    barrier.close()
    assert not listening_addresses(port)


# --- 6. bounded store --------------------------------------------------------

# Without deletes, N rounds leave 2N keys. The core deletes finished rounds
# in batches of 32 by turns once the barrier is quiet for 50 ms, and at once
# when 1024 rounds wait: in a tight loop keys of at most that many rounds
# (plus a batch per rank in flight) remain; once quiet, only the rounds of
# the latest unfinished batch. Besides rounds: two keys per rank of ours
# (`rank{r}`, its heartbeat counter) and a few of the store's.
MAX_PENDING_ROUNDS, BATCH = 1024, 32
MANY_ROUNDS = 2000
MIXED_ROUNDS = 300


def busy_key_bound(world_size):
    return 2 * world_size + 4 + 2 * (MAX_PENDING_ROUNDS + BATCH * (world_size + 1))


def quiet_key_bound(world_size):
    return 2 * world_size + 4 + 2 * BATCH


# With torch's ranks mixed in, rounds are deleted only once quiet: 300 rounds
# stay far below the 1024 that force deletes, so in a tight loop every round
# legitimately keeps its keys. Rank 0 therefore pauses at each sample: once
# quiet, what is left is the rounds since the newest batch of one of ours, as
# the walk back from it also deletes the batches of torch's turns before it.
# With 1 torch rank in 3 that is under 2 batches of rounds (the turns of
# ours come 32 or 64 rounds apart), plus the next round's counter: 138 keys
# in all. Without deletes it would be every round so far: 200 keys at the
# sample after 100 rounds, 600 after 300, above this bound from the second
# sample on (the old bound, busy_key_bound(3) = 2314 keys, was above what
# 300 rounds can leave, 606, even without deletes).
def quiet_mixed_key_bound(world_size):
    return quiet_key_bound(world_size) + 2 * BATCH


# How long rank 0 gives the quiet ranks (50 ms each) to delete before it
# samples: far beyond what they need, still bounded.
SETTLE_WITHIN = 5.0


def many_rounds(
    rank, world_size, port, rounds, sample_every, torch_ranks=(), settle_below=None
):
    """`rounds` barriers; rank 0 samples the store's key count every
    `sample_every` rounds, then reports it and which rounds still have keys.
    With `settle_below`, rank 0 pauses before each sample (the others wait
    in the next round: the barrier is quiet) until the count is that low or
    SETTLE_WITHIN has passed."""
    if rank in torch_ranks:
        barrier = torch_barrier(rank, world_size, port, prefix=PREFIX)
        store = barrier._tcp_store
    else:
        barrier = make(rank, world_size, port, timeout=30.0, init=30.0)
        store = barrier.store
    samples = []
    for done in range(1, rounds + 1):
        barrier.execute_barrier()
        if rank == 0 and done % sample_every == 0:
            if settle_below is not None:
                settle = time.monotonic() + SETTLE_WITHIN
                while store.num_keys() > settle_below and time.monotonic() < settle:
                    time.sleep(0.01)
            samples.append((done, store.num_keys()))
    result = None
    if rank == 0:
        busy_num_keys = store.num_keys()
        # Deletes wait for the barrier to be quiet (50 ms on every rank).
        time.sleep(0.5)
        leftover = [
            s
            for s in range(rounds)
            if store.check([f"{PREFIX}{s}/num_members"])
            or store.check([f"{PREFIX}{s}/last_member"])
        ]
        result = {
            "busy_num_keys": busy_num_keys,
            "num_keys": store.num_keys(),
            "samples": samples,
            "rounds_with_keys": leftover,
        }
        store.set("test/counted", "1")
    store.wait(["test/counted"], COORDINATION)
    if rank in torch_ranks:
        pass  # torch's class has no close(), and our ranks do not wait for it
    else:
        barrier.close()
    return result


@pytest.fixture(scope="module")
def many_rounds_ours():
    return run_ranks(many_rounds, 3, free_port(), MANY_ROUNDS, 250)[0]


@pytest.fixture(scope="module")
def many_rounds_mixed():
    # Ranks 0 and 1 ours, rank 2 torch's Python class.
    return run_ranks(
        many_rounds,
        3,
        free_port(),
        MIXED_ROUNDS,
        50,
        (2,),
        quiet_mixed_key_bound(3),
        timeout=120,
    )[0]


def test_store_does_not_grow_with_the_number_of_rounds(many_rounds_ours):
    counts = [n for _, n in many_rounds_ours["samples"]]
    assert len(counts) == MANY_ROUNDS // 250
    assert max(counts) <= busy_key_bound(3), many_rounds_ours["samples"]
    assert many_rounds_ours["busy_num_keys"] <= busy_key_bound(3)


def test_store_does_not_grow_with_a_torch_rank_mixed_in(many_rounds_mixed):
    counts = [n for _, n in many_rounds_mixed["samples"]]
    assert len(counts) == MIXED_ROUNDS // 50
    assert max(counts) <= quiet_mixed_key_bound(3), many_rounds_mixed["samples"]


def test_a_quiet_barrier_deletes_every_finished_batch(many_rounds_ours):
    assert many_rounds_ours["num_keys"] <= quiet_key_bound(3), many_rounds_ours
    leftover = many_rounds_ours["rounds_with_keys"]
    assert not leftover or min(leftover) >= MANY_ROUNDS - BATCH - 1, leftover


def test_a_quiet_barrier_deletes_the_rounds_of_torch_ranks_turns(many_rounds_mixed):
    assert many_rounds_mixed["num_keys"] <= quiet_mixed_key_bound(3)
    leftover = many_rounds_mixed["rounds_with_keys"]
    assert not leftover or min(leftover) >= MIXED_ROUNDS - 2 * BATCH - 1, leftover


# --- 7. listening where asked ------------------------------------------------


def address_to_listen_on(host):
    """What rank 0 must listen on for `host`: the first address it resolves
    to (where peers connect), or the next when this machine cannot bind that
    one (say ::1 with IPv6 off)."""
    for family, kind, proto, _, address in socket.getaddrinfo(
        host, None, type=socket.SOCK_STREAM
    ):
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind((address[0], 0, *address[2:]))
            except OSError:
                continue
        return address[0]
    pytest.skip(f"{host} resolves to nothing this machine can listen on")


@pytest.mark.parametrize("libuv", [True, False], ids=["libuv", "classic"])
@pytest.mark.parametrize("master_address", [LOOPBACK, "localhost"])
def test_rank0_listens_only_on_master_address(port, libuv, master_address):
    # localhost may be 127.0.0.1, ::1 or both, in either order.
    expected = address_to_listen_on(master_address)
    barrier = TCPStoreBarrier(
        global_rank=0,
        global_world_size=1,
        barrier_prefix=PREFIX,
        timeout_barrier_init_secs=5,
        use_checkpoint_barrier_tcpstore_libuv=libuv,
        tcpstore_port=port,
        master_address=master_address,
        timeout_secs=2,
    )
    try:
        assert listening_addresses(port) == [expected]
        assert connects(expected, port)
        assert not connects("127.0.0.2", port)
        barrier.execute_barrier()
    finally:
        barrier.close()
