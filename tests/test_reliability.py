"""Reliability: timeouts, retries, Ctrl-C, dead peers, a dead store, close(),
a bounded store and where rank 0 listens.

Every scenario runs real TCPStores on 127.0.0.1 with one process per rank
(forkserver, see conftest.py). A scenario that several tests judge runs once
per module (a fixture) and each test checks one behaviour of its outcome.
Measured figures are printed as ``FIGURE name: value`` lines (see them
with ``pytest -s``).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import ranks
import reliability_ranks as rr
from conftest import collect_reports
from conftest_shared import LOOPBACK
from tcpstore_barrier import BarrierTimeoutError, TCPStoreBarrier

# Short enough to keep the suite fast, long enough to dwarf scheduling noise
# on 2 busy cores.
TIMEOUT = 1.0
# How late a timeout may fire.
TIMEOUT_SLACK = 1.0
TESTS = Path(__file__).resolve().parent


def report_figure(name, value):
    print(f"FIGURE {name}: {value:.3f}")


# --- launching ranks that may be killed --------------------------------------


def launch(mp_context, target, world_size, *args, killed=(), timeout=30.0):
    """Run ``target(rank, world_size, *args)`` in one process per rank.

    Ranks in ``killed`` are expected to die by SIGKILL without reporting;
    every other rank must report and exit normally. Returns {rank: result}.
    """
    results_queue = mp_context.Queue()
    procs = {
        rank: mp_context.Process(
            target=ranks.rank_main,
            args=(results_queue, target, rank, (world_size, *args)),
            daemon=True,
        )
        for rank in range(world_size)
    }
    expected = set(range(world_size)) - set(killed)
    try:
        for p in procs.values():
            p.start()
        results, failures = collect_reports(
            results_queue,
            expected,
            timeout,
            lambda pending: any(procs[r].is_alive() for r in pending),
        )
        for p in procs.values():
            p.join(timeout=10)
        exit_codes = {r: p.exitcode for r, p in procs.items()}
        if failures:
            raise AssertionError(
                "\n".join(f"rank {r} failed:\n{failures[r]}" for r in sorted(failures))
            )
        silent = sorted(expected - results.keys())
        assert not silent, (
            f"ranks {silent} did not report within {timeout} s "
            f"(exit codes {exit_codes})"
        )
        for r in killed:
            assert exit_codes[r] == -signal.SIGKILL, (
                f"rank {r} exit code {exit_codes[r]}"
            )
        for r in expected:
            assert exit_codes[r] == 0, f"rank {r} exited with {exit_codes[r]}"
        return results
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join()


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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
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


@pytest.fixture(scope="module", params=[0, 1], ids=["first-round", "later-round"])
def timed_out(request, mp_context):
    """Ranks 0 and 2 enter round `rounds_before` alone; they time out."""
    rounds_before = request.param
    results = launch(
        mp_context,
        rr.timeout_round,
        4,
        rr.free_port(),
        ARRIVING,
        rounds_before,
        TIMEOUT,
    )
    return rounds_before, [results[r] for r in ARRIVING]


def test_timeout_raises_no_earlier_than_timeout_secs_and_within_one_second_of_it(
    timed_out
):
    _, outcomes = timed_out
    for outcome in outcomes:
        assert outcome["error"] is not None, "the round completed without ranks 1, 3"
        assert TIMEOUT - 0.01 <= outcome["elapsed"] <= TIMEOUT + TIMEOUT_SLACK
    report_figure(
        "timeout_overshoot_s", max(o["elapsed"] - TIMEOUT for o in outcomes)
    )


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
        assert error["barrier_key"] == f"{rr.PREFIX}{sequence}/last_member"
        assert error["sequence"] == sequence
        assert error["timeout_secs"] == pytest.approx(TIMEOUT)


def test_timeout_message_states_key_sequence_missing_ranks_and_time_limit(timed_out):
    sequence, outcomes = timed_out
    for outcome in outcomes:
        message = outcome["error"]["message"]
        assert f"{rr.PREFIX}{sequence}/last_member" in message
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


@pytest.fixture(scope="module")
def resumed(mp_context):
    results = launch(
        mp_context,
        rr.resume_after_timeouts,
        3,
        rr.free_port(),
        SHORT_TIMEOUT,
        TIMEOUTS_BEFORE_LATE,
    )
    return [results[r] for r in range(3)]


def test_retrying_rank_times_out_naming_the_late_rank(resumed):
    timeouts = resumed[1]["timeouts"]
    assert len(timeouts) >= TIMEOUTS_BEFORE_LATE
    for error in timeouts:
        assert error["is_barrier_timeout"]
        assert error["sequence"] == 0
        assert error["missing_ranks"] == [2]


def test_no_rank_leaves_before_the_last_rank_enters_despite_retries(resumed):
    last_entry = max(r["entered"] for r in resumed)
    assert last_entry == resumed[2]["entered"]
    for rank, result in enumerate(resumed):
        assert result["left"] >= last_entry, f"rank {rank} left early"


def test_sequence_advances_only_when_the_round_completes(resumed):
    assert resumed[1]["sequence_after_timeouts"] == 0
    assert [r["sequence"] for r in resumed] == [1, 1, 1]
    assert [r["sequence_final"] for r in resumed] == [2, 2, 2]


def test_retries_never_count_a_rank_twice(resumed):
    assert resumed[0]["num_members"] == 3


# --- 3. Ctrl-C ---------------------------------------------------------------

INTERRUPT_LATENCY = 0.5


# When the signals come, after the blocked rank entered: inside the first
# moments of its wait, or well into it.
SIGNAL_TIMES = {"early": (0.01, 0.02), "late": (0.3, 0.7)}


@pytest.fixture(scope="module", params=sorted(SIGNAL_TIMES))
def interrupted(request, mp_context):
    usr1_after, int_after = SIGNAL_TIMES[request.param]
    results = launch(
        mp_context, rr.interrupted_rank, 2, rr.free_port(), 30.0, usr1_after, int_after
    )
    return results[0], results[1]


def test_sigint_raises_keyboard_interrupt_within_half_a_second(
    interrupted
):
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


def test_ctrl_c_then_exit_ends_the_process_promptly(port):
    """What a user does: Ctrl-C a rank stuck in a barrier and let Python exit."""
    host = []
    hosting = threading.Thread(
        target=lambda: host.append(rr.make(0, 2, port, timeout=0.5)), daemon=True
    )
    hosting.start()
    with subprocess.Popen(
        [sys.executable, str(TESTS / "reliability_ranks.py"), str(port), "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=TESTS,
    ) as child:
        try:
            assert child.stdout.readline().strip() == "entering"
            time.sleep(0.5)
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


@pytest.fixture(scope="module")
def peer_death(mp_context):
    """peer_death(when) -> survivors' outcomes; each scenario runs once."""
    outcomes = {}

    def run(when):
        if when not in outcomes:
            results = launch(
                mp_context,
                rr.peer_killed,
                3,
                rr.free_port(),
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
        max(s["rounds"][-1]["raised_at"] - s["killed_at"] for s in survivors),
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


@pytest.fixture(scope="module")
def store_host_death(mp_context):
    port = rr.free_port()
    results = launch(
        mp_context, rr.store_host_killed, 3, port, STORE_TIMEOUT, killed=(0,)
    )
    return port, [results[1], results[2]]


def test_store_host_failure_raises_dist_error_saying_the_store_is_gone(
    store_host_death,
):
    port, survivors = store_host_death
    for survivor in survivors:
        error = survivor["error"]
        assert error is not None, "the round completed without the store's host"
        # A DistNetworkError, as torch raises for a store that went away;
        # also a PeerLostError naming rank 0, the store's host.
        assert error["type"] == "StoreUnreachableError", error
        assert error["is_dist_network_error"], error
        assert f"{LOOPBACK}:{port}" in error["message"]
        assert "gone" in error["message"]


def test_store_host_failure_is_reported_before_timeout_secs(
    store_host_death
):
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


def test_host_close_waits_for_a_peer_still_finishing_its_last_round(
    run_ranks, port
):
    host, peer = run_ranks(rr.slow_peer_close, 2, port, LINGER, timeout=30)
    # The peer's wait(), store use and close all needed the store: they
    # worked, so rank 0 kept it up until the peer had closed.
    assert peer["value"] == b"still here"
    assert peer["sequence"] == host["sequence"] == 4
    assert host["closed"] and peer["closed"]
    assert host["close_elapsed"] >= LINGER - 0.1


def _single_rank(port, **kwargs):
    return rr.make(0, 1, port, timeout=2.0, init=5.0, **kwargs)


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


@pytest.fixture(scope="module")
def many_rounds_ours(mp_context):
    return launch(mp_context, rr.many_rounds, 3, rr.free_port(), MANY_ROUNDS, 250)[0]


@pytest.fixture(scope="module")
def many_rounds_mixed(mp_context):
    # Ranks 0 and 1 ours, rank 2 torch's Python class.
    return launch(
        mp_context, rr.many_rounds, 3, rr.free_port(), MIXED_ROUNDS, 50, (2,)
    )[0]


def test_store_does_not_grow_with_the_number_of_rounds(many_rounds_ours):
    counts = [n for _, n in many_rounds_ours["samples"]]
    assert len(counts) == MANY_ROUNDS // 250
    assert max(counts) <= busy_key_bound(3), many_rounds_ours["samples"]
    assert many_rounds_ours["busy_num_keys"] <= busy_key_bound(3)


def test_store_does_not_grow_with_a_torch_rank_mixed_in(many_rounds_mixed):
    counts = [n for _, n in many_rounds_mixed["samples"]]
    assert len(counts) == MIXED_ROUNDS // 50
    assert max(counts) <= busy_key_bound(3), many_rounds_mixed["samples"]


def test_a_quiet_barrier_deletes_every_finished_batch(many_rounds_ours):
    assert many_rounds_ours["num_keys"] <= quiet_key_bound(3), many_rounds_ours
    leftover = many_rounds_ours["rounds_with_keys"]
    assert not leftover or min(leftover) >= MANY_ROUNDS - BATCH - 1, leftover


def test_a_quiet_barrier_deletes_the_rounds_of_torch_ranks_turns(many_rounds_mixed):
    assert many_rounds_mixed["num_keys"] <= quiet_key_bound(3) + 2 * BATCH
    leftover = many_rounds_mixed["rounds_with_keys"]
    assert not leftover or min(leftover) >= MIXED_ROUNDS - 2 * BATCH - 1, leftover


# --- 7. listening where asked ------------------------------------------------


@pytest.mark.parametrize("libuv", [True, False], ids=["libuv", "classic"])
@pytest.mark.parametrize("master_address", [LOOPBACK, "localhost"])
def test_rank0_listens_only_on_master_address(port, libuv, master_address):
    barrier = TCPStoreBarrier(
        global_rank=0,
        global_world_size=1,
        barrier_prefix=rr.PREFIX,
        timeout_barrier_init_secs=5,
        use_checkpoint_barrier_tcpstore_libuv=libuv,
        tcpstore_port=port,
        master_address=master_address,
        timeout_secs=2,
    )
    try:
        assert listening_addresses(port) == [LOOPBACK]
        assert connects(LOOPBACK, port)
        assert not connects("127.0.0.2", port)
        barrier.execute_barrier()
    finally:
        barrier.close()
