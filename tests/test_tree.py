"""A tree of stores (topology="tree"): rounds, arrival orders, torch's ranks at
the root, timeouts, faults, close(), bounded stores, quiet output.

Simulated hosts are `host` strings on one machine; each is a process whose
ranks are threads (support/launch.py's start_rank_groups), so that SIGKILL or
SIGSTOP of the process is a host's crash or freeze, and a rank that must
fail alone gets a process of its own. Every store is a real TCPStore on
127.0.0.1. A scenario that several tests judge runs once per module (a
fixture); times are time.monotonic(), one clock for every process of the
machine.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from typing import NamedTuple

import pytest
import torch.distributed as dist
from support import LOOPBACK, free_port, report_figure
from support.barriers import (
    assert_no_early_release,
    await_key,
    describe,
    our_barrier,
    timed_round,
    torch_barrier,
)
from support.launch import (
    CONTEXT,
    await_fault,
    by_rank,
    mark_ready,
    run_rank_groups,
    start_rank_groups,
)

from tcpstore_barrier import BarrierTimeoutError

PREFIX = "ckpt"
FAN_IN = 2
# 14 ranks on 6 hosts of 1 to 3 ranks. With a fan-in of 2 the hosts' leaders
# 0, 3, 5, 8, 10, 11 meet in pairs (0,3) (5,8) (10,11); those leaders in
# (0,5), 10 alone; and 0 and 10 at the root: rank 0 meets at 4 stores, and
# ranks 5-9 are 4 stores away from the root.
HOSTS = ((0, 1, 2), (3, 4), (5, 6, 7), (8, 9), (10,), (11, 12, 13))
WORLD = sum(len(host) for host in HOSTS)


def host_name(hosts, rank):
    return next(f"host{i}" for i, host in enumerate(hosts) if rank in host)


def planned_stores(hosts, fan_in):
    """Each rank's stores, bottom up, as the tree's design places them: the
    ranks of a host meet at a store of their lowest rank (its leader);
    leaders, in order, in groups of at most `fan_in` at a store of the
    group's first one, and so on until at most `fan_in` remain, who meet at
    the root. A host or group of one has no store. A store is named by its
    members ("root" for the root)."""
    stores = {rank: [] for host in hosts for rank in host}

    def gather(nodes):
        if len(nodes) > 1:
            for leader in nodes:
                stores[leader].append(tuple(nodes))
        return nodes[0]

    level = [gather(sorted(host)) for host in sorted(hosts, key=min)]
    while len(level) > fan_in:
        level = [gather(level[i : i + fan_in]) for i in range(0, len(level), fan_in)]
    for leader in level:
        stores[leader].append("root")
    return stores


def walk_tree(root):
    """Every store of the tree, reached as a timeout's walk reaches them from
    the root: each store keeps its record at `{prefix}/tree/record`
    ("host subtree;member:child:subtree|..."), and where the store led by its
    member m listens at `{prefix}/tree/below/{m}` ("host|port|key prefix": a
    process keeps the stores it hosts in one server, each under its own key
    prefix). Returns (members, server, store) a store: its members, the
    "host:port" of its server ("root" for the root) and a client of it."""
    found, queue, servers = [], [("root", root)], {}
    while queue:
        server, store = queue.pop(0)
        record = store.get(f"{PREFIX}/tree/record").decode().split(";", 1)[1]
        entries = [entry.split(":") for entry in record.split("|")]
        found.append((tuple(int(e[0]) for e in entries), server, store))
        for m, (_, child, _) in enumerate(entries):
            if int(child) < 0:
                continue
            address = store.get(f"{PREFIX}/tree/below/{m}").decode()
            # The first of the hosts, "*" for rank 0's, is where this
            # machine reaches it.
            hosts, port, key_prefix = address.split("|")
            host = hosts.split(",")[0].replace("*", LOOPBACK)
            server_name = f"{host}:{port}"
            if server_name not in servers:
                servers[server_name] = dist.TCPStore(
                    host, int(port), is_master=False, wait_for_workers=False,
                    timeout=timedelta(seconds=10),
                )  # fmt: skip
            below = dist.PrefixStore(key_prefix.strip("/"), servers[server_name])
            queue.append((server_name, below))
    return found


def published_stores(root, world_size):
    """Each rank's stores as the tree holds them: each named by its members,
    bottom up ("root" for the root)."""
    stores = walk_tree(root)
    named = {}
    for rank in range(world_size):
        mine = [(members, server) for members, server, _ in stores if rank in members]
        mine.reverse()  # found top down
        named[rank] = ["root" if server == "root" else m for m, server in mine]
    return named


def make_tree(
    rank, world_size, port, *, hosts=HOSTS, protocol="torch", libuv=True,
    timeout=30.0, peer_timeout=5.0, init=30.0,
):  # fmt: skip
    """A rank of a tree of stores with a fan-in of 2 over `hosts`."""
    return our_barrier(
        rank, world_size, port, prefix=PREFIX, init=init, timeout=timeout,
        libuv=libuv,
        options={
            "protocol": protocol,
            "peer_timeout_secs": peer_timeout,
            "topology": "tree",
            "host": host_name(hosts, rank),
            "tree_fan_in": FAN_IN,
        },
    )  # fmt: skip


def stamped_rounds(rank, world_size, barrier, rounds, seed, extra_delay=None):
    """`rounds` rounds, each entered after a random sleep of 0-5 ms (seeded by
    rank), plus `extra_delay(round)` s if given; returns (entered, left) of
    each round."""
    rng = random.Random(f"{seed}-{rank}")
    stamps = []
    for s in range(rounds):
        time.sleep(rng.uniform(0, 0.005) + (extra_delay(s) if extra_delay else 0))
        entered = time.monotonic()
        barrier.execute_barrier()
        stamps.append((entered, time.monotonic()))
    return stamps


def assert_arrival_orders_vary(stamps, at_least):
    """The random sleeps did their job: many different ranks entered rounds
    last."""
    last = {
        max(range(len(stamps)), key=lambda r: stamps[r][s][0])
        for s in range(len(stamps[0]))
    }
    assert len(last) >= at_least, f"only ranks {sorted(last)} ever entered last"


# --- 1, 2. a deep tree: rounds, plan, arrival orders ---------------------------

ROUNDS = 50


def deep_tree_rounds(rank, world_size, port, protocol, libuv):
    barrier = make_tree(rank, world_size, port, protocol=protocol, libuv=libuv)
    # While every store is up: the others wait for rank 0 in round 0.
    published = published_stores(barrier.store, world_size) if rank == 0 else None
    result = {
        "stamps": stamped_rounds(rank, world_size, barrier, ROUNDS, seed=protocol),
        "sequence": barrier.sequence,
        "topology": barrier.topology,
        "tree_levels": barrier.tree_levels,
        "uses_libuv": barrier.uses_libuv,
    }
    if rank == 0:
        result["published"] = published
    barrier.close()
    return result


@pytest.fixture(
    scope="module",
    params=[("torch", True), ("native", False)],
    ids=["torch-libuv", "native-legacy"],
)
def deep_tree(request):
    protocol, libuv = request.param
    results = run_rank_groups(
        deep_tree_rounds, HOSTS, free_port(), protocol, libuv, timeout=90
    )
    return libuv, results


def test_a_deep_tree_completes_every_round_and_advances_the_sequence(deep_tree):
    libuv, results = deep_tree
    assert [r["sequence"] for r in results] == [ROUNDS] * WORLD
    assert {r["topology"] for r in results} == {"tree"}
    assert all(len(r["stamps"]) == ROUNDS for r in results)
    assert results[0]["uses_libuv"] is libuv


def test_each_rank_meets_at_the_stores_the_plan_gives_it(deep_tree):
    _, results = deep_tree
    planned = planned_stores(HOSTS, FAN_IN)
    # Rank 0: its host's store, two group stores and the root.
    assert planned[0] == [(0, 1, 2), (0, 3), (0, 5), "root"]
    assert [r["tree_levels"] for r in results] == [
        len(planned[rank]) for rank in range(WORLD)
    ]
    assert results[0]["published"] == planned


def test_no_rank_leaves_a_round_before_the_last_rank_entered_it(deep_tree):
    _, results = deep_tree
    stamps = [r["stamps"] for r in results]
    assert_arrival_orders_vary(stamps, at_least=5)
    assert_no_early_release(stamps)


# --- 3. torch's Python ranks at the root ------------------------------------

# Ranks 0-5 ours, on 3 hosts (a 3-level tree for rank 0); 6 and 7 torch's
# class, each a process of its own, counting themselves in at the root.
MIXED_HOSTS = ((0, 1), (2, 3), (4, 5))
TORCH_RANKS = (6, 7)
MIXED_WORLD = 8
MIXED_ROUNDS = 50
# torch's rank 7 enters every 5th round 30 ms late: everyone must wait for it.
LATE_TORCH_RANK, LATE_EVERY, LATE_BY = 7, 5, 0.03


def late_torch_delay(s):
    return LATE_BY if s % LATE_EVERY == 0 else 0.0


def mixed_rounds(rank, world_size, port):
    if rank in TORCH_RANKS:
        barrier = torch_barrier(rank, world_size, port, prefix=PREFIX)
        delay = late_torch_delay if rank == LATE_TORCH_RANK else None
        return {
            "stamps": stamped_rounds(
                rank, world_size, barrier, MIXED_ROUNDS, "mixed", delay
            )
        }
    barrier = make_tree(rank, world_size, port, hosts=MIXED_HOSTS)
    stamps = stamped_rounds(rank, world_size, barrier, MIXED_ROUNDS, "mixed")
    result = {
        "stamps": stamps,
        "sequence": barrier.sequence,
        "topology": barrier.topology,
        "tree_levels": barrier.tree_levels,
    }
    barrier.close()
    return result


@pytest.fixture(scope="module")
def mixed():
    groups = (*MIXED_HOSTS, *((r,) for r in TORCH_RANKS))
    return run_rank_groups(mixed_rounds, groups, free_port(), timeout=90)


def test_torch_ranks_join_a_tree_at_the_root_and_every_round_completes(mixed):
    ours = [r for r in range(MIXED_WORLD) if r not in TORCH_RANKS]
    assert [mixed[r]["sequence"] for r in ours] == [MIXED_ROUNDS] * len(ours)
    assert {mixed[r]["topology"] for r in ours} == {"tree"}
    assert mixed[0]["tree_levels"] == 3
    assert all(len(mixed[r]["stamps"]) == MIXED_ROUNDS for r in TORCH_RANKS)


def test_no_rank_of_a_mixed_tree_leaves_before_the_last_rank_entered(mixed):
    stamps = [r["stamps"] for r in mixed]
    assert_arrival_orders_vary(stamps, at_least=3)
    assert_no_early_release(stamps)


def test_a_late_torch_rank_holds_every_rank_of_the_tree(mixed):
    for s in range(0, MIXED_ROUNDS, LATE_EVERY):
        late_entry = mixed[LATE_TORCH_RANK]["stamps"][s][0]
        left = [r["stamps"][s][1] for r in mixed]
        assert min(left) >= late_entry, f"round {s} released before rank 7 entered"


# --- 4. timeouts --------------------------------------------------------------

TIMEOUT = 1.5
# A tree spends up to 0.9 s past the deadline naming the missing ranks
# across its stores (tree.cpp, kDiagnosisBudget: "within its deadline plus
# a second"); half a second more for wake-ups on a loaded machine (at a
# load average in the hundreds, 1.007 s was seen).
TIMEOUT_SLACK = 1.5
# Round 1: rank 7, deep in the tree, is missing; round 2: its whole host.
ABSENCES = ((7,), (5, 6, 7))


def absent_rounds(rank, world_size, port):
    """Round 0 with everyone; in round s (1, 2, ...), the ranks ABSENCES[s-1]
    enter only once every other rank has timed out there once, and the
    others retry until the round completes; then one more round."""
    barrier = make_tree(rank, world_size, port, timeout=TIMEOUT)
    store = barrier.store
    barrier.execute_barrier()
    outcomes = []
    for s, absent in enumerate(ABSENCES, start=1):
        if rank in absent:
            await_key(
                store, f"test/timed_out/{s}",
                lambda count, absent=absent: int(count) >= world_size - len(absent),
            )  # fmt: skip
            entered = time.monotonic()
            barrier.execute_barrier()
            outcomes.append({"entered": entered, "left": time.monotonic()})
            continue
        first = timed_round(barrier)
        first["sequence_after"] = barrier.sequence
        store.add(f"test/timed_out/{s}", 1)
        retries = []
        while True:
            try:
                barrier.execute_barrier()
                break
            except BarrierTimeoutError as e:
                retries.append(describe(e))
                assert len(retries) < 20, retries
        first.update(left=time.monotonic(), retries=retries)
        outcomes.append(first)
    barrier.execute_barrier()
    result = {"rounds": outcomes, "sequence": barrier.sequence}
    barrier.close()
    return result


@pytest.fixture(scope="module")
def timed_out():
    return run_rank_groups(absent_rounds, HOSTS, free_port(), timeout=90)


def first_calls(results, s):
    """How the first call of round s ended, on every rank that was there."""
    absent = ABSENCES[s - 1]
    return {
        rank: result["rounds"][s - 1]
        for rank, result in enumerate(results)
        if rank not in absent
    }


def test_a_rank_deep_in_the_tree_that_never_arrives_is_named_alone(timed_out):
    for rank, outcome in first_calls(timed_out, 1).items():
        error = outcome["error"]
        assert error is not None, f"rank {rank} left round 1 without rank 7"
        assert error["type"] == "BarrierTimeoutError", error
        assert error["missing_ranks"] == [7], (rank, error)
        assert error["sequence"] == 1


def test_a_host_that_never_arrives_is_named_whole(timed_out):
    for rank, outcome in first_calls(timed_out, 2).items():
        error = outcome["error"]
        assert error is not None, f"rank {rank} left round 2 without ranks 5-7"
        assert error["type"] == "BarrierTimeoutError", error
        assert error["missing_ranks"] == [5, 6, 7], (rank, error)


def test_a_tree_times_out_after_timeout_secs_and_within_a_second_of_it(timed_out):
    elapsed = [
        outcome["elapsed"]
        for s in (1, 2)
        for outcome in first_calls(timed_out, s).values()
    ]
    report_figure("tree_timeout_overshoot_s", max(elapsed) - TIMEOUT)
    assert min(elapsed) >= TIMEOUT - 0.01
    assert max(elapsed) <= TIMEOUT + TIMEOUT_SLACK


def test_the_call_after_a_timeout_resumes_the_round_until_the_late_ranks_arrive(
    timed_out,
):
    for s, absent in enumerate(ABSENCES, start=1):
        late_entry = max(timed_out[r]["rounds"][s - 1]["entered"] for r in absent)
        for rank, outcome in first_calls(timed_out, s).items():
            assert outcome["sequence_after"] == s, "a timeout advanced the round"
            for retry in outcome["retries"]:
                assert retry["sequence"] == s
            assert outcome["left"] >= late_entry, f"rank {rank} left round {s} early"
    assert [r["sequence"] for r in timed_out] == [len(ABSENCES) + 2] * WORLD


# --- 5. faults ----------------------------------------------------------------

PEER_TIMEOUT = 1.0
# How a loss is found in a tree (tree.cpp, liveness.h): a watcher first
# reads the silent rank's final counter within a heartbeat interval (a
# fifth of the peer timeout at these sizes), declares it at the first
# watch a peer timeout later (one more interval), the root decides, and
# the verdict goes down each level of the tree within one more interval
# (each level's ranks learn it from their next heartbeat's reply, then
# carry it on). A store that dies with its host is seen at once. MARGIN is
# for a machine with a load average in the hundreds (3.25 s was seen for a
# frozen host at 400).
INTERVAL = PEER_TIMEOUT / 5
LEVELS = 4
MARGIN = 1.5
DETECTION_SLACK = INTERVAL + INTERVAL + LEVELS * INTERVAL + MARGIN
# Far above detection: a loss must be found by liveness, not by the deadline.
FAULT_TIMEOUT = 30.0
# A store's host waits in close() for the ranks that meet there, except
# those named lost; the others close once they have learnt the verdict,
# within the detection time.
CLOSE_AFTER_LOSS = PEER_TIMEOUT + DETECTION_SLACK


class Fault(NamedTuple):
    # The ranks of each process: a process is a host, or part of one.
    groups: tuple
    # (process, signal), in order.
    strikes: tuple
    # What every survivor must name: the faulty ranks' whole subtree.
    lost: list
    # Live ranks whose way to the root went through a faulty rank: they
    # raise the same verdict (PeerLostError), never StoreUnreachableError.
    cut_off: list = []

    @property
    def struck(self):
        return [i for i, _ in self.strikes]

    @property
    def faulty(self):
        return [r for i in self.struck for r in self.groups[i]]

    @property
    def survivors(self):
        """The ranks outside the lost subtree."""
        return [r for r in range(WORLD) if r not in self.lost]

    @property
    def reporting(self):
        return self.survivors + self.cut_off


SPLIT_HOST = ((0, 1, 2), (3, 4), (5, 7), (6,), (8, 9), (10,), (11, 12, 13))
FAULTS = {
    # Rank 6 is on host (5, 6, 7) but alone in its process.
    "non-leader killed": Fault(SPLIT_HOST, ((3, signal.SIGKILL),), [6]),
    # Rank 8 leads host (8, 9), whose store it hosts; rank 9 lives on.
    "host leader killed": Fault(
        ((0, 1, 2), (3, 4), (5, 6, 7), (8,), (9,), (10,), (11, 12, 13)),
        ((3, signal.SIGKILL),), [8, 9], [9],
    ),
    # Both ranks of host (8, 9) in one process.
    "host frozen": Fault(HOSTS, ((3, signal.SIGSTOP),), [8, 9]),
    # Rank 5 leads host (5, 6, 7) and group (5, 8): its subtree is 5-9. Host
    # (8, 9) is frozen first, so that the verdict can only come from ranks
    # 6 and 7, which lose their host's store at once, or from rank 0, which
    # sees rank 5 silent a peer timeout later.
    "group leader killed": Fault(
        ((0, 1, 2), (3, 4), (5,), (6, 7), (8, 9), (10,), (11, 12, 13)),
        ((4, signal.SIGSTOP), (2, signal.SIGKILL)), [5, 6, 7, 8, 9], [6, 7],
    ),
}  # fmt: skip


def naming_faults(which=lambda fault: True):
    """FAULTS' names as parameters of a test of which ranks are named: the
    group leader's is expected to fail."""
    return [
        pytest.param(name) if name == "group leader killed" else name
        for name, fault in FAULTS.items()
        if which(fault)
    ]


def faulted_round(rank, world_size, port, faulty, ready):
    """Round 0 with everyone; then the ranks in `faulty` wait for the test's
    fault and never enter round 1, while the others enter it and report how
    it ended, how a second call ends, and how long close() took."""
    barrier = make_tree(
        rank, world_size, port, timeout=FAULT_TIMEOUT, peer_timeout=PEER_TIMEOUT
    )
    barrier.execute_barrier()
    mark_ready(ready)
    if rank in faulty:
        await_fault(rank, "fault")
    outcome = timed_round(barrier)
    outcome["again"] = timed_round(barrier)["error"]
    close_start = time.monotonic()
    barrier.close()
    outcome["close_elapsed"] = time.monotonic() - close_start
    return outcome


@pytest.fixture(scope="module")
def fault():
    """fault(name) -> (each rank's outcome, when the first strike came);
    each fault runs once."""
    outcomes = {}

    def run(name):
        if name not in outcomes:
            spec = FAULTS[name]
            ready = CONTEXT.Value("i", 0)
            with start_rank_groups(
                faulted_round, spec.groups, free_port(), spec.faulty, ready
            ) as processes:
                deadline = time.monotonic() + 60
                while ready.value < WORLD:
                    assert time.monotonic() < deadline, (
                        f"round 0 never completed: exit codes {processes.exit_codes()}"
                    )
                    time.sleep(0.01)
                struck_at = time.monotonic()
                for process, signum in spec.strikes:
                    processes.signal(process, signum)
                others = [i for i in range(len(spec.groups)) if i not in spec.struck]
                reports = processes.results(others, timeout=60)
            outcomes[name] = (by_rank(reports, WORLD), struck_at)
        return outcomes[name]

    return run


@pytest.mark.parametrize("name", naming_faults())
def test_every_rank_outside_the_lost_subtree_names_it_lost(fault, name):
    results, _ = fault(name)
    spec = FAULTS[name]
    for rank in spec.survivors:
        error = results[rank]["error"]
        assert error is not None, f"rank {rank} completed round 1"
        assert error["type"] == "PeerLostError", (rank, error)
        assert error["lost_ranks"] == spec.lost, (rank, error)
        assert error["sequence"] == 1


@pytest.mark.parametrize("name", naming_faults(lambda fault: fault.cut_off))
def test_live_ranks_cut_off_with_a_leader_raise_the_same_verdict(fault, name):
    results, _ = fault(name)
    spec = FAULTS[name]
    for rank in spec.cut_off:
        error = results[rank]["error"]
        assert error is not None, f"rank {rank} completed round 1"
        assert error["type"] == "PeerLostError", (rank, error)
        assert error["lost_ranks"] == spec.lost, (rank, error)


@pytest.mark.parametrize("name", list(FAULTS))
def test_every_survivor_names_the_same_lost_ranks(fault, name):
    results, _ = fault(name)
    named = {tuple(results[r]["error"]["lost_ranks"]) for r in FAULTS[name].reporting}
    assert len(named) == 1, named


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_fault_is_reported_within_the_peer_timeout_and_its_trip_down_the_tree(
    fault, name
):
    results, struck_at = fault(name)
    detection = [results[r]["ended_at"] - struck_at for r in FAULTS[name].reporting]
    report_figure(f"tree_fault_detected_s[{name}]", max(detection))
    assert max(detection) <= PEER_TIMEOUT + DETECTION_SLACK, detection


@pytest.mark.parametrize("name", list(FAULTS))
def test_every_later_call_raises_the_loss_again(fault, name):
    results, _ = fault(name)
    for rank in FAULTS[name].reporting:
        first, again = results[rank]["error"], results[rank]["again"]
        assert again is not None, rank
        assert again["type"] == first["type"], (rank, again)
        assert again["lost_ranks"] == first["lost_ranks"], (rank, again)


@pytest.mark.parametrize("name", list(FAULTS))
def test_close_after_a_loss_returns_promptly(fault, name):
    results, _ = fault(name)
    for rank in FAULTS[name].reporting:
        assert results[rank]["close_elapsed"] < CLOSE_AFTER_LOSS, rank


# Rank 0's host dies while rank 2, a top leader, waits below the root, at
# its host's store, for rank 3, which enters 2 s late. Rank 3 then has no
# way to the root but through rank 2: it may also time out, after
# ROOT_TIMEOUT (above the detection time), but must not hang.
ROOT_HOSTS = ((0, 1), (2, 3))
LATE_MEMBER, LATE_FOR = 3, 2.0
ROOT_TIMEOUT = 5.0


def root_host_killed(rank, world_size, port, ready):
    barrier = make_tree(
        rank, world_size, port, hosts=ROOT_HOSTS, timeout=ROOT_TIMEOUT,
        peer_timeout=PEER_TIMEOUT,
    )  # fmt: skip
    barrier.execute_barrier()
    mark_ready(ready)
    if rank in ROOT_HOSTS[0]:
        await_fault(rank, "SIGKILL")
    if rank == LATE_MEMBER:
        time.sleep(LATE_FOR)
    outcome = timed_round(barrier)
    barrier.close()
    return outcome


def test_the_root_host_killed_while_a_top_leader_waits_below_is_reported():
    ready = CONTEXT.Value("i", 0)
    with start_rank_groups(root_host_killed, ROOT_HOSTS, free_port(), ready) as ranks:
        deadline = time.monotonic() + 60
        while ready.value < 4:
            assert time.monotonic() < deadline, "round 0 never completed"
            time.sleep(0.01)
        time.sleep(0.3)  # rank 2 is waiting at its host's store
        struck_at = time.monotonic()
        ranks.signal(0, signal.SIGKILL)
        survivors = by_rank(ranks.results([1], timeout=30), 4)
    # The root's host is gone: nobody is left to decide a verdict.
    error = survivors[2]["error"]
    assert error is not None and error["type"] == "StoreUnreachableError", error
    assert error["lost_ranks"] == [0], error
    assert survivors[2]["ended_at"] - struck_at <= PEER_TIMEOUT + DETECTION_SLACK
    assert survivors[LATE_MEMBER]["error"]["is_dist_error"]


# A rank that sleeps 3 peer timeouts between rounds, its process alive: in
# round 1 rank 7 (deep in the tree), in round 2 rank 5 (it hosts two stores).
SLOW = {1: 7, 2: 5}
SLOW_FOR = 3 * PEER_TIMEOUT


def slow_rounds(rank, world_size, port):
    barrier = make_tree(
        rank, world_size, port, timeout=FAULT_TIMEOUT, peer_timeout=PEER_TIMEOUT
    )
    outcomes = []
    for s in range(4):
        if SLOW.get(s) == rank:
            time.sleep(SLOW_FOR)
        outcomes.append(timed_round(barrier))
    barrier.close()
    return outcomes


def test_a_slow_rank_is_never_declared_lost():
    results = run_rank_groups(slow_rounds, HOSTS, free_port(), timeout=90)
    for rank, outcomes in enumerate(results):
        assert [o["error"] for o in outcomes] == [None] * 4, rank
    for s, slow in SLOW.items():
        # The others really waited for it, and through it all.
        waited = [o[s]["elapsed"] for r, o in enumerate(results) if r != slow]
        assert min(waited) >= SLOW_FOR - 0.5, (s, waited)


# --- 6. close() ---------------------------------------------------------------

CLOSE_HOSTS = ((0, 1), (2, 3), (4, 5))
LINGERER = 3  # a member of host (2, 3), whose leader is 2
LINGER = 1.0


def lingering_close(rank, world_size, port):
    """Three rounds; in the last, LINGERER arrives, lingers, waits, lingers
    again and only then closes; the others close as soon as it ends."""
    barrier = make_tree(rank, world_size, port, hosts=CLOSE_HOSTS, timeout=20.0)
    for _ in range(2):
        barrier.execute_barrier()
    if rank == LINGERER:
        barrier.arrive()
        time.sleep(LINGER)
        barrier.wait()
        time.sleep(LINGER)
    else:
        barrier.execute_barrier()
    sequence = barrier.sequence
    close_start = time.monotonic()
    barrier.close()
    return {
        "close_start": close_start,
        "close_end": time.monotonic(),
        "sequence": sequence,
        "closed": barrier.closed,
        "after_close": {
            "sequence": barrier.sequence,
            "topology": barrier.topology,
            "tree_levels": barrier.tree_levels,
        },
    }


@pytest.fixture(scope="module")
def closed():
    return run_rank_groups(lingering_close, CLOSE_HOSTS, free_port(), timeout=60)


def test_every_rank_closes_after_its_rounds_without_error_or_hang(closed):
    assert [r["sequence"] for r in closed] == [3] * 6
    assert all(r["closed"] for r in closed)
    for rank, result in enumerate(closed):
        elapsed = result["close_end"] - result["close_start"]
        assert elapsed < LINGER + 5, (rank, elapsed)


def test_a_closed_tree_keeps_its_sequence_topology_and_levels(closed):
    # As a flat barrier keeps its sequence, and topology is documented as
    # "as chosen at construction".
    planned = planned_stores(CLOSE_HOSTS, FAN_IN)
    assert [r["after_close"] for r in closed] == [
        {"sequence": 3, "topology": "tree", "tree_levels": len(planned[rank])}
        for rank in range(6)
    ]


def test_a_leader_closes_only_after_its_members_have_left(closed):
    member = closed[LINGERER]
    # Rank 2 hosts the store of host (2, 3); rank 0 the group store rank 2
    # meets at: both wait for what is below them.
    for leader in (2, 0):
        result = closed[leader]
        assert result["close_end"] >= member["close_start"], leader
        assert result["close_end"] - result["close_start"] >= LINGER - 0.1, leader


# --- 7. bounded stores --------------------------------------------------------

KEY_HOSTS = ((0, 1), (2, 3), (4, 5), (6, 7))
# Rank 0 samples every store's key count after these rounds, while the
# others wait in the next one: the barrier is quiet.
SAMPLES = (1, 50, 200)
# Finished rounds are deleted in batches of 32, once the barrier has been
# quiet for 50 ms: a quiet store keeps, beyond the keys it had after round 1,
# the keys of the rounds since the newest batch (fewer than 34 rounds of the
# store, 2 keys each at most: torch's num_members and last_member; native's
# 1 a round, a store below the root having 2 rounds per round of the tree).
# Without deletes, 150 rounds add 300 keys to each store.
BATCH = 32
QUIET_EXTRA = 2 * (BATCH + 2)
SETTLE_WITHIN = 3.0


def store_clients(root):
    """A client of every server of the tree, and how many of its stores each
    holds (walk_tree)."""
    clients, levels = {}, {}
    for _, server, store in walk_tree(root):
        clients.setdefault(server, store)
        levels[server] = levels.get(server, 0) + 1
    return clients, levels


def settled_counts(clients, bounds=None):
    """Every store's key count, once each is within `bounds` (by store), or
    after SETTLE_WITHIN; without bounds, once they stop changing."""
    deadline = time.monotonic() + SETTLE_WITHIN
    counts = {i: c.num_keys() for i, c in clients.items()}
    while time.monotonic() < deadline:
        if bounds and all(counts[i] <= bounds[i] for i in counts):
            break
        time.sleep(0.1)
        previous, counts = counts, {i: c.num_keys() for i, c in clients.items()}
        if not bounds and counts == previous:
            break
    return counts


def counted_rounds(rank, world_size, port, protocol):
    barrier = make_tree(rank, world_size, port, hosts=KEY_HOSTS, protocol=protocol)
    clients, levels = store_clients(barrier.store) if rank == 0 else (None, None)
    samples = {}
    for done in range(1, max(SAMPLES) + 2):
        barrier.execute_barrier()
        if rank == 0 and done in SAMPLES:
            bounds = None
            if done > 1:
                bounds = {i: n + extra(levels, i) for i, n in samples[1].items()}
            samples[done] = settled_counts(clients, bounds)
    barrier.close()
    return samples, levels


def extra(levels, server):
    """What a quiet server may hold beyond its keys after round 1."""
    return QUIET_EXTRA * levels[server]


@pytest.fixture(scope="module", params=["torch", "native"])
def key_counts(request):
    samples = run_rank_groups(
        counted_rounds, KEY_HOSTS, free_port(), request.param, timeout=90
    )[0]
    return request.param, samples


def test_every_store_of_a_tree_stays_bounded_over_many_rounds(key_counts):
    _, (samples, levels) = key_counts
    # Root, 4 host stores, 2 group stores: the 6 below the root in the
    # servers of the 4 hosts' leaders' processes.
    assert sorted(levels.values()) == [1, 1, 1, 2, 2], levels
    for server, early in samples[50].items():
        late = samples[200][server]
        assert late <= early + extra(levels, server), (server, samples)


def test_a_quiet_tree_keeps_at_most_a_batch_of_rounds_in_each_store(key_counts):
    _, (samples, levels) = key_counts
    for n in SAMPLES[1:]:
        for server, count in samples[n].items():
            assert count <= samples[1][server] + extra(levels, server), (n, samples)


# --- 9. quiet -----------------------------------------------------------------

QUIET_TREE = textwrap.dedent(
    """
    import threading
    from tcpstore_barrier import TCPStoreBarrier

    HOSTS = ((0, 1), (2, 3), (4, 5))
    WORLD = 6
    errors = []

    def rank(r, port, libuv):
        try:
            host = next(f"h{{i}}" for i, h in enumerate(HOSTS) if r in h)
            with TCPStoreBarrier(r, WORLD, "quiet", 30, libuv, port, "127.0.0.1", 30,
                                 topology="tree", host=host, tree_fan_in=2) as b:
                for _ in range(20):
                    b.execute_barrier()
        except BaseException as e:
            errors.append(repr(e))

    for port, libuv in (({port1}, True), ({port2}, False)):
        threads = [threading.Thread(target=rank, args=(r, port, libuv))
                   for r in range(WORLD)]
        for t in threads: t.start()
        for t in threads: t.join()
    assert not errors, errors
    """
)


def test_a_trees_rounds_and_close_print_nothing():
    proc = subprocess.run(
        [sys.executable, "-c", QUIET_TREE.format(port1=free_port(), port2=free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", (proc.stdout, proc.stderr)


# --- from_store ----------------------------------------------------------------


def test_from_store_builds_a_tree_over_a_prefix_store_of_a_tcp_store(port):
    """The program's own store as the root (a PrefixStore over a TCPStore, as
    a process group's): the tree's keys go under its prefix, and the stores
    below are the tree's own."""
    import threading

    from tcpstore_barrier import TCPStoreBarrier

    world, hosts = 6, ((0, 1), (2, 3), (4, 5))
    master = dist.TCPStore(
        "127.0.0.1", port, world, True, timedelta(seconds=30), wait_for_workers=False
    )
    outcomes, recorded = {}, {}

    def rank_main(rank):
        try:
            store = master if rank == 0 else dist.TCPStore(
                "127.0.0.1", port, world, False, timedelta(seconds=30)
            )  # fmt: skip
            barrier = TCPStoreBarrier.from_store(
                dist.PrefixStore("job", store), rank, world, PREFIX, 30,
                topology="tree", host=host_name(hosts, rank), tree_fan_in=FAN_IN,
            )  # fmt: skip
            for _ in range(20):
                barrier.execute_barrier()
            outcomes[rank] = (barrier.topology, barrier.tree_levels, barrier.sequence)
            if rank == 0:
                record = f"{PREFIX}/tree/record"
                recorded["job"] = master.check([f"job/{record}"])
                recorded["bare"] = master.check([record])
            barrier.close()
        except Exception as e:  # noqa: BLE001 - reported to the test
            outcomes[rank] = describe(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    planned = planned_stores(hosts, FAN_IN)
    assert outcomes == {
        rank: ("tree", len(planned[rank]), 20) for rank in range(world)
    }, outcomes
    # Under the PrefixStore's prefix, as everything the barrier keeps there,
    # and gone with the last rank's clean close().
    assert not master.check([f"job/{PREFIX}/tree/joined"])
    assert not master.check([f"job/{PREFIX}/tree/record"])
    assert recorded == {"job": True, "bare": False}
