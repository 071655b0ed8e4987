"""Housekeeping, flat and in a tree: finished rounds' keys are deleted once,
by one rank per batch, and a quiet barrier's stores stay within the key
bound, with none of a tree's plan keys left after construction.

Deletes are counted at the store's server, not by the barrier: torch's libuv
server traces every request it serves (`delete key:{key} address:{client}`,
TCPStoreLibUvBackend.cpp) when its process runs with TORCH_CPP_LOG_LEVEL=INFO
and TORCH_DISTRIBUTED_DEBUG=DETAIL, set before torch starts; so the ranks run
as threads of a subprocess that hosts every store, and the test reads its
stderr. Key counts are read with a c10d client of each server the ranks'
process listens on (support/resources.py), found without reading any of the
barrier's own keys.
"""

from __future__ import annotations

import collections
import datetime
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from support import LOOPBACK, free_port, report_figure
from support.barriers import our_barrier
from support.launch import run_ranks
from support.resources import listening_ports

# --- 1. deletes take turns ----------------------------------------------------

DELETE_WORLD, DELETE_ROUNDS = 8, 64
BATCH = 32
DELETE_PREFIX = "p"

COUNTED_DELETES = textwrap.dedent(
    """
    import threading, time
    from tcpstore_barrier import TCPStoreBarrier

    WORLD, ROUNDS, TOPOLOGY = {world}, {rounds}, {topology!r}
    errors, closing = [], []

    def rank(r):
        try:
            options = {{}}
            if TOPOLOGY == "tree":
                options = dict(topology="tree", host=f"h{{r // 2}}", tree_fan_in=2)
            barrier = TCPStoreBarrier(r, WORLD, {prefix!r}, 30, True, {port},
                                      "127.0.0.1", 30, **options)
            for _ in range(ROUNDS):
                barrier.execute_barrier()
            time.sleep(0.5)   # quiet: the batches' turns come after 50 ms
            closing.append(time.time())
            barrier.close()
        except BaseException as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(WORLD)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors, errors
    print(min(closing))
    """
)
# glog's prefix: severity, MMDD, local time; then c10d's trace.
TRACED_DELETE = re.compile(
    r"^\[?I(\d{4}) (\d\d:\d\d:\d\d\.\d+) .*\] \[c10d - trace\] "
    r"delete key:(\S+) address:(\S+)",
    re.MULTILINE,
)


def trace_time(month_day, clock):
    """A glog timestamp (local time, no year) as seconds since the epoch."""
    year = datetime.datetime.now().year
    stamp = datetime.datetime.strptime(
        f"{year}{month_day} {clock[:15]}", "%Y%m%d %H:%M:%S.%f"
    )
    return stamp.timestamp()


def traced_deletes(topology):
    """Runs DELETE_WORLD ranks x DELETE_ROUNDS quiet rounds in a subprocess
    hosting every store; returns, by key, the clients that deleted it (one
    entry per delete request the servers served) while the barrier was
    running: before the first rank's close(), which may clean up too."""
    env = dict(os.environ, TORCH_CPP_LOG_LEVEL="INFO", TORCH_DISTRIBUTED_DEBUG="DETAIL")
    code = COUNTED_DELETES.format(
        world=DELETE_WORLD, rounds=DELETE_ROUNDS, topology=topology,
        prefix=DELETE_PREFIX, port=free_port(),
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The trace is on: the servers traced the ranks' requests.
    assert "[c10d - trace] validate magic" in proc.stderr, proc.stderr[-3000:]
    closing = float(proc.stdout.strip().splitlines()[-1])
    deleted = collections.defaultdict(list)
    for month_day, clock, key, client in TRACED_DELETE.findall(proc.stderr):
        if trace_time(month_day, clock) < closing:
            deleted[key].append(client)
    return deleted


def first_batch(prefix_of_round):
    """The keys of rounds 0-31 of torch's protocol, as the server names them
    (its client prefixes every key with '/')."""
    return {
        f"/{prefix_of_round}{s}/{suffix}"
        for s in range(BATCH)
        for suffix in ("num_members", "last_member")
    }


@pytest.mark.parametrize("topology", ["flat", "tree"])
def test_each_finished_rounds_keys_are_deleted_once_not_once_per_rank(topology):
    deleted = traced_deletes(topology)
    report_figure(
        f"{topology}: delete requests per deleted key",
        sum(len(c) for c in deleted.values()) / max(len(deleted), 1),
    )
    # The batch of rounds 0-31 at rank 0's store (the root) was deleted...
    assert first_batch(DELETE_PREFIX) <= deleted.keys(), sorted(deleted)[:10]
    # ...and every key, there and at any store of the tree, by one request.
    repeated = {
        key: len(clients) for key, clients in deleted.items() if len(clients) > 1
    }
    assert not repeated, (
        f"{len(repeated)} of {len(deleted)} deleted keys were deleted more than "
        f"once, e.g. {sorted(repeated.items())[:4]}"
    )


# --- 2. the key bound, once quiet, at every store of a tree --------------------

# 24 ranks on 4 hosts of 6, fan-in 2: host stores of 6 members led by 0, 6,
# 12, 18; group stores {0, 6} and {12, 18}; the root {0, 12}.
BOUND_WORLD, RANKS_PER_HOST = 24, 6
# 31 finished rounds wait for the next batch (of 32): the most a quiet store
# holds.
BOUND_ROUNDS = 223
BOUND_PREFIX = "bound"
# docs/trees.md's bounds once quiet, m: the ranks that arrive at a store (at
# the root: its top leaders). The root: at most 4 x m + 71 keys of the barrier,
# each member's `alive`, `rank`, `below` and (after a slow round)
# `missing_below` keys, the store's record and `missing` list, a batch of
# rounds of torch's two keys. A store below it: 3 x m + 32 x (m + 1) + 7, as
# many of the members' keys but `rank`, a batch of rounds of each member's `in`
# and the round's `out`.
HOST_STORES, HOST_MEMBERS = 4, RANKS_PER_HOST
GROUP_STORES, GROUP_MEMBERS = 2, 2
ROOT_MEMBERS = 2


def root_bound(members):
    return 4 * members + 71


def relay_store_bound(members):
    return 3 * members + 32 * (members + 1) + 7


def c10d_own_keys():
    """What a c10d server holds with no barrier in it (its `init/` key)."""
    server = dist.TCPStore(
        LOOPBACK, 0, 1, True, timedelta(seconds=10), wait_for_workers=False
    )
    return server.num_keys()


def plan_keys(world_size, stores):
    """The keys with which rank 0 published the tree's plan today."""
    keys = [f"{BOUND_PREFIX}/tree/joined"]
    for r in range(world_size):
        keys += [f"{BOUND_PREFIX}/tree/join/{r}", f"{BOUND_PREFIX}/tree/rank/{r}"]
    for i in range(stores):
        keys += [f"{BOUND_PREFIX}/tree/store/{i}", f"{BOUND_PREFIX}/tree/addr/{i}"]
    return keys


def quiet_counts(rank, world_size, port, before, everyone):
    barrier = our_barrier(
        rank, world_size, port, prefix=BOUND_PREFIX,
        options={
            "topology": "tree", "host": f"h{rank // RANKS_PER_HOST}",
            "tree_fan_in": 2,
        },
    )  # fmt: skip
    for _ in range(BOUND_ROUNDS):
        barrier.execute_barrier()
    counts = None
    if rank == 0:
        time.sleep(1.0)  # quiet: every batch due has had its turn
        root = barrier.store
        # A leader that reaches rank 0 over loopback listens on every
        # address (the wildcard): it is reached at loopback all the same.
        servers = {
            p
            for host, p in listening_ports() - before
            if p != port and host in (LOOPBACK, "0.0.0.0", "::")
        }
        counts = {"root": root.num_keys()}
        for p in sorted(servers):
            client = dist.TCPStore(
                LOOPBACK, p, is_master=False, wait_for_workers=False,
                timeout=timedelta(seconds=10),
            )  # fmt: skip
            counts[p] = client.num_keys()
        counts["plan keys left"] = [
            key for key in plan_keys(world_size, 7) if root.check([key])
        ]
    everyone.wait(timeout=30)
    barrier.close()
    return counts


def test_every_store_of_a_quiet_tree_holds_at_most_the_key_bound():
    own = c10d_own_keys()
    before = listening_ports()
    counts = run_ranks(
        quiet_counts, BOUND_WORLD, free_port(), before,
        threading.Barrier(BOUND_WORLD), threads=True, timeout=90,
    )[0]  # fmt: skip
    report_figure("24-rank tree: keys at the root once quiet", counts["root"])
    report_figure(
        "24-rank tree: keys at the lower stores' server once quiet",
        sum(n for p, n in counts.items() if isinstance(p, int)),
    )
    assert counts["plan keys left"] == [], counts
    assert counts["root"] <= root_bound(ROOT_MEMBERS) + own, counts
    # Every store below the root is hosted by this process's one server of
    # the tree (one per process, each store under a key prefix of its own):
    # it holds at most the sum of its stores' bounds.
    below = {p: n for p, n in counts.items() if isinstance(p, int)}
    assert below, f"no server of the tree's stores found: {counts}"
    allowed = (
        HOST_STORES * relay_store_bound(HOST_MEMBERS)
        + GROUP_STORES * relay_store_bound(GROUP_MEMBERS)
        + len(below) * own
    )
    assert sum(below.values()) <= allowed, counts
