"""A tree makes progress by itself: each leader's worker climbs to the root,
releases its stores and relays verdicts, whatever its application thread is
doing; so arrive(), wait(), `released`, timeouts and verdicts mean in a tree
what they mean flat.

Simulated hosts are `host` strings on one machine, each a process whose ranks
are threads (support/launch.py), so that SIGKILL of a process is a host's (or a
rank's) crash. Round 0 of each scenario is a start line: the rounds judged come
after it, so that the spawning of processes is not measured. Times are
time.monotonic(), one clock for every process of the machine.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from support import free_port, report_figure
from support.barriers import describe, our_barrier, timed_round
from support.launch import (
    CONTEXT,
    await_fault,
    await_ready,
    by_rank,
    mark_ready,
    run_rank_groups,
    start_rank_groups,
)

import tcpstore_barrier
from tcpstore_barrier._bench.rank import server_threads

PREFIX = "ckpt"
FAN_IN = 2
# How long a leader's caller works between arrive() and wait().
WORK = 3.0
# A rank is released within this of the last arrival, however long a
# leader's caller works (the figure: within 1 s).
RELEASE_SLACK = 1.0
PEER_TIMEOUT = 2.0
# A verdict reaches every rank in a call within the peer timeout and this,
# at any depth, whatever any caller is doing.
VERDICT_SLACK = 2.0


def host_of(hosts, rank):
    return next(f"host{i}" for i, host in enumerate(hosts) if rank in host)


def tree_rank(
    rank, world_size, port, host, *, timeout=30.0, init=30, peer_timeout=5.0,
    fan_in=FAN_IN,
):  # fmt: skip
    """A rank of a tree of stores on the simulated host `host`."""
    return our_barrier(
        rank, world_size, port, prefix=PREFIX, init=init, timeout=timeout,
        options={
            "topology": "tree",
            "host": host,
            "tree_fan_in": fan_in,
            "peer_timeout_secs": peer_timeout,
        },
    )  # fmt: skip


# --- split phase: a leader's caller works between arrive() and wait() ---------

# (hosts, the leader whose caller works, its levels): with a fan-in of 2,
# rank 2 leads host (2, 3) and meets rank 0 at the root; with three hosts,
# rank 0 leads host (0, 1) and group (0, 2), and meets rank 4 at the root.
SPLIT_PHASE = {
    "2 levels": (((0, 1), (2, 3)), 2, 2),
    "3 levels": (((0, 1), (2, 3), (4, 5)), 0, 3),
}


def split_phase_rank(rank, world_size, port, hosts, leader):
    barrier = tree_rank(rank, world_size, port, host_of(hosts, rank))
    barrier.execute_barrier()
    result = {"levels": barrier.tree_levels}
    if rank == leader:
        result["arrived_at"] = time.monotonic()
        barrier.arrive()
        released_at = None
        until = time.monotonic() + WORK
        while time.monotonic() < until:
            if released_at is None and barrier.released:
                released_at = time.monotonic()
            time.sleep(0.01)
        result["released_at"] = released_at
        barrier.wait()
        result["left_at"] = time.monotonic()
    else:
        # Everyone else arrives after the leader, one after another.
        time.sleep(0.2 + 0.05 * rank)
        result["arrived_at"] = time.monotonic()
        barrier.execute_barrier()
        result["left_at"] = time.monotonic()
    barrier.execute_barrier()
    barrier.close()
    return result


@pytest.mark.parametrize("shape", list(SPLIT_PHASE))
def test_a_leaders_split_phase_holds_nobody_back(shape):
    hosts, leader, levels = SPLIT_PHASE[shape]
    results = run_rank_groups(split_phase_rank, hosts, free_port(), hosts, leader)
    assert results[leader]["levels"] == levels
    last_arrival = max(result["arrived_at"] for result in results)
    others = [r for r in range(len(results)) if r != leader]
    late = {r: results[r]["left_at"] - last_arrival for r in others}
    report_figure(
        f"split phase ({shape}): slowest release after the last arrival",
        max(late.values()),
    )
    assert max(late.values()) < RELEASE_SLACK, (
        f"released after the last arrival by {late} s while rank {leader}'s "
        f"caller worked {WORK} s"
    )
    released_at = results[leader]["released_at"]
    assert released_at is not None, (
        "`released` never became true while the leader worked"
    )
    assert released_at - last_arrival < RELEASE_SLACK


# --- a timed-out member that never calls again --------------------------------

TIMED_OUT_HOSTS = ((0, 1), (2, 3))
SHORT_TIMEOUT = 2.0


def never_again_rank(rank, world_size, port, hosts, late):
    barrier = tree_rank(
        rank, world_size, port, host_of(hosts, rank), timeout=SHORT_TIMEOUT
    )
    barrier.execute_barrier()
    if rank == 3:
        outcome = timed_round(barrier)
        late.set()
        # Times out: the others come later, and it never calls again.
        time.sleep(2.0)
        return outcome
    late.wait(timeout=30)
    time.sleep(0.2)
    outcome = timed_round(barrier)
    barrier.close()
    return outcome


def test_a_member_that_timed_out_and_never_calls_again_holds_nobody_back():
    late = CONTEXT.Event()
    results = run_rank_groups(
        never_again_rank, TIMED_OUT_HOSTS, free_port(), TIMED_OUT_HOSTS, late
    )
    gone = results[3]["error"]
    assert gone is not None and gone["type"] == "BarrierTimeoutError", results[3]
    # It names exactly the ranks that had not arrived.
    assert gone["missing_ranks"] == [0, 1, 2]
    for rank in (0, 1, 2):
        assert results[rank]["error"] is None, (rank, results[rank])
        assert results[rank]["elapsed"] < RELEASE_SLACK


# --- a loss while a leader is between calls -----------------------------------

# (hosts, the processes that run them, the idle leader, the rank killed (in
# the last process), the member below the idle leader). 2 levels: rank 2 leads host (2, 3) and meets rank 0 in group
# (0, 2); rank 5, on host (4, 5), is killed. 3 levels: four hosts, groups
# (0, 2) and (4, 6), root (0, 4): rank 7's loss climbs from host (6, 7)
# to the root and comes down through group (0, 2) and host (2, 3).
IDLE_LEADER = {
    "2 levels": (((0, 1), (2, 3), (4, 5)), ((0, 1), (2, 3), (4,), (5,)), 2, 5, 3),
    "3 levels": (
        ((0, 1), (2, 3), (4, 5), (6, 7)),
        ((0, 1), (2, 3), (4, 5), (6,), (7,)),
        2,
        7,
        3,
    ),
}
IDLE = 8.0


def idle_leader_rank(rank, world_size, port, hosts, idle, killed, ready):
    barrier = tree_rank(
        rank, world_size, port, host_of(hosts, rank), peer_timeout=PEER_TIMEOUT
    )
    barrier.execute_barrier()
    mark_ready(ready)
    if rank == killed:
        await_fault(rank, "SIGKILL")
    if rank == idle:
        # Alive and heartbeating, but its caller makes no call.
        time.sleep(IDLE)
        return {"idle": True}
    return timed_round(barrier)


@pytest.mark.parametrize("shape", list(IDLE_LEADER))
def test_a_loss_reaches_the_members_of_a_leader_between_calls(shape):
    hosts, groups, idle, killed, below = IDLE_LEADER[shape]
    world = sum(len(group) for group in groups)
    ready = CONTEXT.Value("i", 0)
    with start_rank_groups(
        idle_leader_rank, groups, free_port(), hosts, idle, killed, ready
    ) as processes:
        await_ready(ready, world, within=60)
        time.sleep(0.3)
        killed_at = time.monotonic()
        processes.signal(len(groups) - 1, signal.SIGKILL)
        reports = processes.results(range(len(groups) - 1), timeout=60)
    results = by_rank(reports, world)
    outcome = results[below]
    assert outcome["error"] is not None, outcome
    assert outcome["error"]["type"] == "PeerLostError", outcome
    assert killed in outcome["error"]["lost_ranks"]
    after = outcome["ended_at"] - killed_at
    report_figure(f"verdict under an idle leader ({shape}): s after the kill", after)
    assert after < PEER_TIMEOUT + VERDICT_SLACK, (
        f"rank {below} learnt the loss {after:.1f} s after the kill, while its "
        f"leader {idle} made no call"
    )
    # Every rank in a call names the same ranks.
    lost = {
        tuple(r["error"]["lost_ranks"])
        for rank, r in enumerate(results)
        if r is not None and "error" in r
    }
    assert len(lost) == 1, lost


# --- shapes the tree suite does not build --------------------------------------

# name: (world size, each rank's host, fan-in, peer timeout). Ranks are threads
# of the test's process.
SHAPES = {
    "world size 1": (1, lambda r: "h0", 2, 5.0),
    "world size 2, one host": (2, lambda r: "h0", 2, 5.0),
    "world size 2, two hosts": (2, lambda r: f"h{r}", 2, 5.0),
    # Ranks dealt to hosts in turn: a host's ranks are not contiguous.
    "cyclic placement": (9, lambda r: f"h{r % 3}", 2, 5.0),
    "liveness off": (6, lambda r: f"h{r // 2}", 2, None),
    # A host of more than 64 ranks has one store per 64.
    "a host of 70 ranks": (70, lambda r: "h0", 2, 5.0),
    # 66 hosts of one rank under a fan-in above 64: two group stores.
    "fan-in 65": (66, lambda r: f"h{r}", 65, 5.0),
}
SHAPE_ROUNDS = 5


def shape_rank(rank, world_size, port, shape):
    _, host, fan_in, peer_timeout = SHAPES[shape]
    barrier = tree_rank(
        rank, world_size, port, host(rank), timeout=60, init=60,
        peer_timeout=peer_timeout, fan_in=fan_in,
    )  # fmt: skip
    stamps, released = [], []
    for s in range(SHAPE_ROUNDS):
        # The last rank enters each round late, by turns through arrive().
        late = rank == (world_size - 1 - s) % world_size
        if late:
            time.sleep(0.05)
        entered = time.monotonic()
        if s % 2:
            # Split phase: `released` turns true by itself once the round
            # has released, as flat.
            barrier.arrive()
            until = time.monotonic() + 10
            while not barrier.released and time.monotonic() < until:
                time.sleep(0.002)
            released.append(barrier.released)
            barrier.wait()
        else:
            barrier.execute_barrier()
        stamps.append((entered, time.monotonic()))
    result = {
        "stamps": stamps, "sequence": barrier.sequence,
        "levels": barrier.tree_levels, "released": released,
    }  # fmt: skip
    barrier.close()
    return result


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_releases_each_round_only_once_all_have_entered(shape):
    from support.barriers import assert_no_early_release
    from support.launch import run_ranks

    world = SHAPES[shape][0]
    results = run_ranks(
        shape_rank, world, free_port(), shape, threads=True, timeout=120
    )
    assert all(r["sequence"] == SHAPE_ROUNDS for r in results)
    assert all(all(r["released"]) for r in results), "`released` stayed false"
    assert_no_early_release([r["stamps"] for r in results])
    if world > 2:
        assert max(r["levels"] for r in results) >= 2


# --- agreement: a slow root, and two losses at once ----------------------------

# Hosts (0, 1) (2, 3) (4, 5) with a fan-in of 2: group (0, 2) at rank 0's
# process, rank 4 at the root. Each tuple of processes below is (processes,
# strikes): strikes are (process, signal, after s).
AGREEMENT_HOSTS = ((0, 1), (2, 3), (4, 5))
AGREEMENT = {
    # Rank 2, the leader of host (2, 3), dies while rank 0's process (the
    # root's and group (0, 2)'s host) is frozen for 1.5 s, less than the
    # peer timeout: a slow root, not a lost one. Rank 3 loses its host store
    # at once and must wait for the root to decide.
    "a leader dies while the root stalls": (
        ((0, 1), (2,), (3,), (4, 5)),
        ((0, signal.SIGSTOP, 0.0), (1, signal.SIGKILL, 0.0), (0, signal.SIGCONT, 1.5)),
        5.0,
        [[2, 3]],
    ),
    # Ranks 3 and 5, in two subtrees, die together: the first loss decided at
    # the root is the verdict (either), named the same by every survivor.
    "two subtrees at once": (
        ((0, 1), (2,), (3,), (4,), (5,)),
        ((2, signal.SIGKILL, 0.0), (4, signal.SIGKILL, 0.0)),
        2.0,
        [[3], [5], [3, 5]],
    ),
}


def agreement_rank(rank, world_size, port, peer_timeout, doomed, ready):
    barrier = tree_rank(
        rank, world_size, port, host_of(AGREEMENT_HOSTS, rank),
        peer_timeout=peer_timeout,
    )  # fmt: skip
    barrier.execute_barrier()
    mark_ready(ready)
    if rank in doomed:
        await_fault(rank, "SIGKILL")
    outcome = timed_round(barrier)
    barrier.close()
    return outcome


@pytest.mark.parametrize("name", list(AGREEMENT))
def test_every_survivor_raises_one_verdict(name):
    groups, strikes, peer_timeout, verdicts = AGREEMENT[name]
    world = sum(len(group) for group in groups)
    killed = {p for p, signum, _ in strikes if signum == signal.SIGKILL}
    doomed = [rank for p in killed for rank in groups[p]]
    ready = CONTEXT.Value("i", 0)
    with start_rank_groups(
        agreement_rank, groups, free_port(), peer_timeout, doomed, ready
    ) as processes:
        await_ready(ready, world, within=60)
        time.sleep(0.3)
        start = time.monotonic()
        for process, signum, after in sorted(strikes, key=lambda s: s[2]):
            time.sleep(max(0.0, start + after - time.monotonic()))
            processes.signal(process, signum)
        alive = [i for i in range(len(groups)) if i not in killed]
        reports = processes.results(alive, timeout=60)
    results = by_rank(reports, world)
    outcomes = {rank: result["error"] for rank, result in enumerate(results) if result}
    kinds = {rank: error and error["type"] for rank, error in outcomes.items()}
    assert set(kinds.values()) == {"PeerLostError"}, kinds
    named = {tuple(error["lost_ranks"]) for error in outcomes.values()}
    assert len(named) == 1, f"survivors named different ranks: {outcomes}"
    assert list(named.pop()) in verdicts


# --- a timeout names the same missing ranks on every rank, with no herd --------

WIDE = 64
ABSENT = 45


def absent_leaf_rank(rank, world_size, port, proxy_port, started, timed_out):
    # Every rank but rank 0 (which hosts the root) reaches the root through
    # the counting forwarder.
    barrier = tree_rank(
        rank, world_size, port if rank == 0 else proxy_port, f"h{rank // 2}",
        timeout=4, init=60,
    )  # fmt: skip
    barrier.execute_barrier()
    started.wait(timeout=60)
    if rank == ABSENT:
        time.sleep(8)
        barrier.close()
        return None
    outcome = timed_round(barrier)
    timed_out.wait(timeout=60)
    barrier.close()
    return outcome


def test_every_rank_that_times_out_names_the_same_missing_ranks_without_a_herd():
    from support.launch import run_ranks
    from support.proxy import counting_proxy

    port = free_port()
    connects = {}
    with counting_proxy(port) as proxy:
        started = threading.Barrier(
            WIDE, action=lambda: connects.update(started=proxy.connects())
        )
        timed_out = threading.Barrier(
            WIDE - 1, action=lambda: connects.update(timed_out=proxy.connects())
        )
        results = run_ranks(
            absent_leaf_rank, WIDE, port, proxy.port, started, timed_out,
            threads=True, timeout=120,
        )  # fmt: skip
    named = {
        rank: r["error"] and (r["error"]["type"], tuple(r["error"]["missing_ranks"]))
        for rank, r in enumerate(results)
        if rank != ABSENT
    }
    assert set(named.values()) == {("BarrierTimeoutError", (ABSENT,))}, named
    # 63 ranks timed out and named the missing rank; rank 0's store took no
    # connection for it but the other top leader's one for its engine's
    # diagnosis (a walk from the root took one a rank).
    during = connects["timed_out"] - connects["started"]
    report_figure("connects at rank 0 while 63 ranks time out", during)
    assert during <= FAN_IN - 1, connects


# --- wake-ups between rounds and in a slow round ---------------------------------

QUIET_WORLD = 64
# A rank a host, fan-in 2: 64 host stores and 63 above them.
QUIET_STORES = 2 * QUIET_WORLD - 1
QUIET_WINDOW = 4.0
# Wake-ups a second with liveness on (a heartbeat a second at every store a
# rank meets), counted, not timed: a loaded machine batches requests into
# fewer wake-ups, so the bounds hold under load.
# - A store's server in a slow round: measured 5.2-5.7 here; 28-29 when the
#   watchers at every store whose members had all arrived polled every 10 ms
#   for `rank{m}` keys that a leader climbing at once never writes.
# - A rank's threads and its share of the servers between rounds: measured
#   14-15 here; 58-59 when each engine woke every 50 ms to look for a stop
#   and a leader of several stores reported every 200 ms that nobody below
#   it had arrived.
QUIET_BOUNDS = {"slow round, a store's server": 12.0, "between rounds, a rank": 30.0}


def wakeups():
    """Wake-ups so far of this process's threads: (store servers', all)."""
    server_tids = server_threads()
    servers, every = 0, 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as stat:
                woken = int(stat.read().split()[2])
        except OSError:
            continue  # a thread that has ended
        servers += woken if int(tid) in server_tids else 0
        every += woken
    return servers, every


def idle_then_one_rank_late(world_size, port):
    """64 ranks as threads of this process, each a host: all wait
    QUIET_WINDOW + 1 s between two rounds, and the last comes QUIET_WINDOW
    + 2 s late to the second. Wake-ups a second, by window and kind."""
    all_up = threading.Barrier(world_size + 1)

    def rank_main(rank):
        barrier = tree_rank(
            rank, world_size, port, f"h{rank}", timeout=60, init=60, peer_timeout=5.0
        )
        barrier.execute_barrier()
        all_up.wait()
        time.sleep(QUIET_WINDOW + 1.0)
        if rank == world_size - 1:
            time.sleep(QUIET_WINDOW + 2.0)
        barrier.execute_barrier()
        # Each rank closes its own: a host's close waits for its members'.
        barrier.close()

    def window():
        (servers, every), started = wakeups(), time.monotonic()
        time.sleep(QUIET_WINDOW)
        (servers_after, every_after), elapsed = wakeups(), time.monotonic() - started
        return (servers_after - servers) / elapsed, (every_after - every) / elapsed

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    all_up.wait(timeout=60)
    time.sleep(0.5)
    _, between = window()
    # Past the slow round's first second, once every other rank is waiting.
    time.sleep(2.0)
    slow, _ = window()
    for thread in threads:
        thread.join(timeout=60)
    return {
        "slow round, a store's server": slow / QUIET_STORES,
        "between rounds, a rank": between / world_size,
    }


def test_a_tree_wakes_only_for_liveness_between_rounds_and_in_a_slow_round():
    with CONTEXT.Pool(1) as pool:
        rates = pool.apply(idle_then_one_rank_late, (QUIET_WORLD, free_port()))
    for name, rate in rates.items():
        report_figure(f"wake-ups a second, {name}", rate)
    assert all(rates[name] < bound for name, bound in QUIET_BOUNDS.items()), rates


# --- no call holds the GIL ------------------------------------------------------

GIL_HOSTS = ((0, 1), (2, 3), (4, 5))
GIL_TIMEOUT = 3.0
# Far above a loopback request's round trip (well under 1 ms) and the
# scheduling noise of a loaded 2-CPU machine; far below the seconds a call
# that ran a loss or a timeout's diagnosis with the GIL held would take.
GIL_LIMIT = 0.25


class GilTicker:
    """The longest this process's threads went without the GIL: a thread
    that sleeps 1 ms at a time cannot wake while another holds it."""

    def __init__(self):
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        last = time.monotonic()
        while not self._stop.is_set():
            time.sleep(0.001)
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.longest


def gil_rank(rank, world_size, port, ready, killed):
    barrier = tree_rank(
        rank, world_size, port, host_of(GIL_HOSTS, rank), timeout=GIL_TIMEOUT,
        peer_timeout=PEER_TIMEOUT,
    )  # fmt: skip
    barrier.execute_barrier()
    # Ranks 0 and 1 share a process, and so a GIL: rank 0 watches it.
    ticker = GilTicker() if rank == 0 else None
    for _ in range(20):
        barrier.execute_barrier()
    # Split phase, `released` polled from Python.
    barrier.arrive()
    while not barrier.released:
        time.sleep(0.001)
    barrier.wait()
    # A timeout, named and resumed: rank 5 comes late.
    if rank == 5:
        time.sleep(GIL_TIMEOUT + 1.0)
    timeout = timed_round(barrier)["error"]
    if timeout is not None:
        barrier.execute_barrier()
    mark_ready(ready)
    if rank in GIL_HOSTS[2]:
        await_fault(rank, "SIGKILL")
    killed.wait(timeout=30)
    # A loss, learnt in wait() and raised again by the next arrive().
    lost = None
    while lost is None:
        try:
            barrier.arrive()
            barrier.wait()
        except tcpstore_barrier.PeerLostError as e:
            lost = sorted(e.lost_ranks)
        except tcpstore_barrier.BarrierTimeoutError:
            # (PeerLostError is one too.)
            continue
    with pytest.raises(tcpstore_barrier.PeerLostError):
        barrier.arrive()
    return {
        "timeout": timeout,
        "lost": lost,
        "longest": ticker.stop() if ticker else None,
    }


def test_no_call_holds_the_gil_in_rounds_timeouts_and_losses():
    world = sum(len(group) for group in GIL_HOSTS)
    ready = CONTEXT.Value("i", 0)
    killed = CONTEXT.Event()
    with start_rank_groups(
        gil_rank, GIL_HOSTS, free_port(), ready, killed
    ) as processes:
        await_ready(ready, world, within=60)
        processes.signal(2, signal.SIGKILL)
        killed.set()
        reports = processes.results(range(2), timeout=60)
    results = by_rank(reports, world)
    for rank in range(4):
        timeout = results[rank]["timeout"]
        assert timeout["type"] == "BarrierTimeoutError", (rank, timeout)
        assert timeout["missing_ranks"] == [5], (rank, timeout)
        assert {4, 5} <= set(results[rank]["lost"]), (rank, results[rank])
    longest = results[0]["longest"]
    report_figure("longest GIL hold in a tree's calls (s)", longest)
    assert longest < GIL_LIMIT, (
        f"a call held the GIL for {longest:.3f} s while it ran rounds, a timeout "
        "and a loss"
    )


# --- a leader that dies once its group has arrived ------------------------------

# Rank 2 leads host (2, 3) and, in group (0, 2), its worker has carried the
# whole host's arrival up when the test strikes it; rank 5 holds the root's
# round open meanwhile, entering only `late_by` s after the fault.
ARRIVED_HOSTS = ((0, 1), (2, 3), (4, 5))
ARRIVED_GROUPS = ((0, 1), (2,), (3,), (4, 5))
ARRIVED_LEADER, ARRIVED_LATE = 2, 5


def stricken_leader_rank(rank, world_size, port, ready, struck, late_by):
    """Round 1 as ARRIVED_* describe it; a rank released from it runs round
    2 too. Returns each round's outcome."""
    barrier = tree_rank(
        rank, world_size, port, host_of(ARRIVED_HOSTS, rank),
        peer_timeout=PEER_TIMEOUT,
    )  # fmt: skip
    barrier.execute_barrier()
    mark_ready(ready)
    if rank == ARRIVED_LATE:
        struck.wait(timeout=30)
        time.sleep(late_by)
    outcomes = [timed_round(barrier)]
    if rank == ARRIVED_LEADER:
        await_fault(rank, "fault")
    if outcomes[0]["error"] is None:
        outcomes.append(timed_round(barrier))
    return outcomes


def strike_leader(late_by, strike):
    """Runs stricken_leader_rank; once every rank but rank 5 is in round 1,
    `strike(processes)` makes the fault and returns when rank 2 died.
    Returns (each rank's outcomes, when rank 2 died)."""
    world = sum(len(group) for group in ARRIVED_GROUPS)
    ready = CONTEXT.Value("i", 0)
    struck = CONTEXT.Event()
    with start_rank_groups(
        stricken_leader_rank, ARRIVED_GROUPS, free_port(), ready, struck, late_by
    ) as processes:
        await_ready(ready, world, within=60)
        # Every rank but rank 5 is in the round, and rank 2's worker has
        # carried its host's arrival up to group (0, 2).
        time.sleep(0.5)
        killed_at = strike(processes, struck)
        reports = processes.results((0, 2, 3), timeout=60)
    return by_rank(reports, world), killed_at


def test_a_leader_that_dies_after_its_group_arrived_ends_the_round_with_one_verdict():
    def kill(processes, struck):
        killed_at = time.monotonic()
        processes.signal(1, signal.SIGKILL)
        struck.set()
        return killed_at

    results, killed_at = strike_leader(1.0, kill)
    survivors = [r for r in range(len(results)) if r != ARRIVED_LEADER]
    first = {rank: results[rank][0] for rank in survivors}
    # Rank 3 cannot be released without its leader: the round ends for all
    # with the one verdict, decided at the root, that rank 2's host is lost.
    for rank, outcome in first.items():
        error = outcome["error"]
        assert error is not None and error["type"] == "PeerLostError", (rank, results)
        assert ARRIVED_LEADER in error["lost_ranks"], (rank, error)
        after = outcome["ended_at"] - killed_at
        assert after < PEER_TIMEOUT + VERDICT_SLACK, (rank, after)
    named = {tuple(outcome["error"]["lost_ranks"]) for outcome in first.values()}
    assert len(named) == 1, named
    # Decided at once (rank 3 finds its store gone), it wakes every rank in
    # a call at once, and rank 5, arriving after it, raises it at once: no
    # trip waits out a store that is already gone.
    for rank in (0, 1, 3, 4):
        assert first[rank]["ended_at"] - killed_at < 1.0, (rank, first[rank])
    assert first[ARRIVED_LATE]["elapsed"] < 0.5, first[ARRIVED_LATE]
    report_figure(
        "leader dead after its group's arrival: last survivor's verdict, s after the kill",
        max(outcome["ended_at"] for outcome in first.values()) - killed_at,
    )


# --- a leader that dies after the root released its round ----------------------


def test_a_leader_that_dies_after_the_roots_release_strands_only_its_members():
    # Rank 2's process is frozen; rank 5 then lets the root release the
    # round, which rank 2's worker can no longer pass on to host (2, 3);
    # then rank 2 dies.
    def freeze_then_kill(processes, struck):
        processes.signal(1, signal.SIGSTOP)
        struck.set()
        # Rank 5 arrives 0.3 s later and the root releases the round.
        time.sleep(1.0)
        killed_at = time.monotonic()
        processes.signal(1, signal.SIGKILL)
        return killed_at

    results, killed_at = strike_leader(0.3, freeze_then_kill)
    # Rank 3 never gets its release: it names its leader's host lost.
    stranded = results[3]
    assert len(stranded) == 1, stranded
    error = stranded[0]["error"]
    assert error is not None and error["type"] == "PeerLostError", stranded
    assert stranded[0]["ended_at"] - killed_at < PEER_TIMEOUT + VERDICT_SLACK
    verdicts = {tuple(error["lost_ranks"])}
    # The others were released, as flat releases a round its last rank
    # entered, and learn the loss in the next.
    for rank in (0, 1, 4, 5):
        released, lost = results[rank]
        assert released["error"] is None, (rank, results[rank])
        assert lost["error"] is not None and lost["error"]["type"] == "PeerLostError", (
            rank,
            results[rank],
        )
        verdicts.add(tuple(lost["error"]["lost_ranks"]))
    assert len(verdicts) == 1 and ARRIVED_LEADER in verdicts.pop(), results


# --- faults while the tree is built ---------------------------------------------

# Over a store that outlives the ranks (from_store, as torchrun's), so that a
# fault falls in the tree's own joining: rank 0 plans once every rank has
# joined, and the others wait for the plan.
BUILD_HOSTS = ((0, 1), (2, 3), (4, 5))
BUILD_TIMEOUT = 4.0
# (the processes, the rank killed, the rank that joins once it is): rank 0
# dies while it waits to plan (rank 5 has not joined yet); rank 3 dies
# before it joins.
BUILD_FAULTS = {
    "the planner": (((0,), (1,), (2, 3), (4, 5)), 0, 5),
    "a member before it joins": (((0, 1), (2,), (3,), (4, 5)), 3, None),
}


def building_rank(rank, world_size, port, started, killed, doomed, late):
    from datetime import timedelta

    import torch.distributed as dist

    from tcpstore_barrier import TCPStoreBarrier

    store = dist.TCPStore("127.0.0.1", port, world_size, False, timedelta(seconds=20))
    mark_ready(started)
    if rank == doomed and doomed != 0:
        await_fault(rank, "SIGKILL")
    if rank == late:
        killed.wait(timeout=30)
        time.sleep(0.5)
    try:
        barrier = TCPStoreBarrier.from_store(
            store, rank, world_size, PREFIX, BUILD_TIMEOUT, topology="tree",
            host=host_of(BUILD_HOSTS, rank), tree_fan_in=FAN_IN,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"error": describe(e), "ended_at": time.monotonic()}
    barrier.close()
    return {"error": None, "ended_at": time.monotonic()}


@pytest.mark.parametrize("fault", list(BUILD_FAULTS))
def test_a_fault_while_the_tree_is_built_ends_every_constructor_in_time(fault):
    from datetime import timedelta

    import torch.distributed as dist

    groups, doomed, late = BUILD_FAULTS[fault]
    world = sum(len(group) for group in groups)
    port = free_port()
    master = dist.TCPStore(
        "127.0.0.1", port, world, True, timedelta(seconds=30), wait_for_workers=False
    )
    started = CONTEXT.Value("i", 0)
    killed = CONTEXT.Event()
    process = next(i for i, group in enumerate(groups) if doomed in group)
    with start_rank_groups(
        building_rank, groups, port, started, killed, doomed, late
    ) as processes:
        await_ready(started, world, within=60)
        time.sleep(0.5)
        killed_at = time.monotonic()
        processes.signal(process, signal.SIGKILL)
        killed.set()
        others = [i for i in range(len(groups)) if i != process]
        reports = processes.results(others, timeout=60)
    del master
    results = by_rank(reports, world)
    for rank in range(world):
        if rank == doomed:
            continue
        error = results[rank]["error"]
        assert error is not None and error["is_dist_error"], (rank, error)
        # Each names what holds it back: rank 0 the ranks that joined, the
        # others the plan that never came.
        expected = (
            "5 of 6 ranks had joined"
            if rank == 0
            else "did not publish the tree's plan"
        )
        assert expected in error["message"], (rank, error)
        after = results[rank]["ended_at"] - killed_at
        assert after < BUILD_TIMEOUT + 3.0, (rank, after)
