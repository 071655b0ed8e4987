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

import signal
import time

import pytest
from support import free_port, report_figure
from support.barriers import our_barrier, timed_round
from support.launch import CONTEXT, by_rank, run_rank_groups, start_rank_groups

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


def tree_rank(rank, world_size, port, hosts, **options):
    arguments = {"timeout": options.pop("timeout", 30.0)}
    return our_barrier(
        rank, world_size, port, prefix=PREFIX, init=30, **arguments,
        options={
            "topology": "tree",
            "host": host_of(hosts, rank),
            "tree_fan_in": FAN_IN,
            "peer_timeout_secs": options.pop("peer_timeout", 5.0),
            **options,
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
    barrier = tree_rank(rank, world_size, port, hosts)
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
    report_figure(f"split phase ({shape}): slowest release after the last arrival", max(late.values()))
    assert max(late.values()) < RELEASE_SLACK, (
        f"released after the last arrival by {late} s while rank {leader}'s "
        f"caller worked {WORK} s"
    )
    released_at = results[leader]["released_at"]
    assert released_at is not None, "`released` never became true while the leader worked"
    assert released_at - last_arrival < RELEASE_SLACK


# --- a timed-out member that never calls again --------------------------------

TIMED_OUT_HOSTS = ((0, 1), (2, 3))
SHORT_TIMEOUT = 2.0


def never_again_rank(rank, world_size, port, hosts, late):
    barrier = tree_rank(rank, world_size, port, hosts, timeout=SHORT_TIMEOUT)
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
    "2 levels": (
        ((0, 1), (2, 3), (4, 5)), ((0, 1), (2, 3), (4,), (5,)), 2, 5, 3
    ),
    "3 levels": (
        ((0, 1), (2, 3), (4, 5), (6, 7)),
        ((0, 1), (2, 3), (4, 5), (6,), (7,)),
        2, 7, 3,
    ),
}
IDLE = 15.0


def idle_leader_rank(rank, world_size, port, hosts, idle, killed, ready):
    barrier = tree_rank(rank, world_size, port, hosts, peer_timeout=PEER_TIMEOUT)
    barrier.execute_barrier()
    with ready.get_lock():
        ready.value += 1
    if rank == killed:
        time.sleep(60)
        raise AssertionError(f"rank {rank} outlived its fault")
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
        deadline = time.monotonic() + 60
        while ready.value < world:
            assert time.monotonic() < deadline, "round 0 never completed"
            time.sleep(0.01)
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

