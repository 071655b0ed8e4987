"""Barriers over stores that are not TCPStores: a HashStore shared by ranks
that are threads of one process, and a FileStore shared by ranks that are
processes (or threads) opening one file.

``from_store`` talks to such stores through c10d's ``Store`` API (no wire
protocol, no sockets of ours), so rounds, timeouts, liveness and store
failures all go through what these stores do. Stores and faults are real:
the FileStore's file is broken on disk, a peer dies by SIGKILL.

What these stores do that matters here (torch 2.13):

- ``FileStore.wait(keys, timeout)`` compares the elapsed time in whole
  seconds, so any wait shorter than a second lasts a second; it raises a
  plain ``RuntimeError("Wait timeout")`` (a c10::Error), where a HashStore
  raises ``DistStoreError("Wait timeout")`` on time.
- A FileStore call on a file it cannot open raises ``DistStoreError`` with
  strerror's text at once, except when the file is missing: reads then
  retry for the store's whole timeout (300 s by default) and writes create
  a new, empty file, so removing the file stalls ranks or splits the store
  rather than fail it. Making the path a symbolic link to itself fails
  every call at once (ELOOP), which is how the tests break a FileStore.
- ``~FileStore`` writes to its file (a ``refcount/`` key, also written by
  the constructor); on a path that is a directory it throws from the
  destructor and the process aborts. It skips a path it cannot access.
- A process killed while it writes a record (the key's length, the key,
  the value's length and the value are four writes) leaves the record torn:
  from then on every call, in every process that reads the file, loops
  forever at the file's end holding the store's lock, and no deadline can
  end a call inside the store. Tests that kill a rank do it while that rank
  holds the file's flock, which FileStore's writers take.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time

import pytest
import torch.distributed as dist
from support import report_figure
from support.barriers import assert_no_early_release, timed_round
from support.launch import CONTEXT, run_ranks

from tcpstore_barrier import TCPStoreBarrier

PREFIX = "shards"
# How late an error may come past its limit: docs/deadlines-and-shutdown.md's "deadline plus
# about a second".
SLACK = 1.0
# A FileStore's wait lasts at least a second, however short it is asked to
# be (see the module's docstring): a waiting rank looks at anything else
# (the liveness alarm, its deadline) only between two such waits.
FILESTORE_WAIT_GRANULARITY = 1.0
# Far beyond anything a passing test needs, short enough that a broken one
# ends.
COORDINATION = 20.0


# Rank bodies are module-level functions, as the forkserver needs; they
# return plain data (times are time.monotonic(), one clock for every process
# of the machine). `store` is the HashStore itself when ranks are threads,
# or the path of the FileStore's file, which each rank opens.


def open_store(store, world_size):
    if isinstance(store, str):
        return dist.FileStore(store, world_size)
    return store


def make(store, rank, world_size, *, timeout=30.0, **options):
    return TCPStoreBarrier.from_store(
        open_store(store, world_size), rank, world_size, PREFIX, timeout, **options
    )


# Each rank of a store, as the tests run it: a HashStore lives in one
# process, so its ranks are threads; a FileStore's ranks are processes, or
# threads each with its own FileStore object on the file.
STORES = ["HashStore-threads", "FileStore-threads", "FileStore-processes"]


def store_for(kind, tmp_path):
    """What rank bodies take as `store`, and whether ranks are threads."""
    if kind.startswith("HashStore"):
        return dist.HashStore(), True
    return str(tmp_path / "store"), kind.endswith("threads")


# --- 1. rounds -------------------------------------------------------------

ROUNDS = 20
# Each round, one rank arrives this late, so that a round released early
# would show in the stamps.
LATE = 0.02


def stamped_rounds(rank, world_size, store, rounds):
    """`rounds` rounds; in round s, rank s % world_size arrives late. Returns
    when the rank entered and left each round, and its final sequence."""
    stamps = []
    with make(store, rank, world_size) as barrier:
        for s in range(rounds):
            if s % world_size == rank:
                time.sleep(LATE)
            entered = time.monotonic()
            barrier.execute_barrier()
            stamps.append((entered, time.monotonic()))
        return stamps, barrier.sequence


@pytest.mark.parametrize("kind", STORES)
def test_rounds_complete_and_no_rank_leaves_before_every_rank_entered(kind, tmp_path):
    world_size = 3
    store, threads = store_for(kind, tmp_path)
    results = run_ranks(
        stamped_rounds, world_size, store, ROUNDS, threads=threads, timeout=60
    )
    assert [sequence for _, sequence in results] == [ROUNDS] * world_size
    assert_no_early_release([stamps for stamps, _ in results])


# --- 2. a timeout ------------------------------------------------------------

TIMEOUT = 1.0
ABSENT = 2


def one_rank_absent(rank, world_size, store, timeout, done):
    """Every rank but ABSENT enters round 0; ABSENT stays alive (its
    heartbeat goes on) until the others have timed out."""
    barrier = make(store, rank, world_size, timeout=timeout)
    if rank == ABSENT:
        for event in done:
            assert event.wait(COORDINATION), "the others never finished"
        barrier.close()
        return None
    outcome = timed_round(barrier)
    done[rank].set()
    barrier.close()
    return outcome


@pytest.mark.parametrize("kind", ["HashStore-threads", "FileStore-processes"])
def test_timeout_names_the_missing_rank_after_timeout_secs(kind, tmp_path):
    world_size = 3
    store, threads = store_for(kind, tmp_path)
    done = [CONTEXT.Event() for rank in range(world_size) if rank != ABSENT]
    results = run_ranks(
        one_rank_absent, world_size, store, TIMEOUT, done, threads=threads
    )
    for rank in range(world_size):
        if rank == ABSENT:
            continue
        outcome = results[rank]
        error = outcome["error"]
        assert error is not None, "the round completed without the absent rank"
        # A timeout, not a loss: the absent rank is alive and heartbeating.
        assert error["type"] == "BarrierTimeoutError", error
        assert error["missing_ranks"] == [ABSENT]
        # Over a FileStore too: a wait it makes last a second must not
        # carry the round past its deadline by more than that.
        assert TIMEOUT <= outcome["elapsed"] <= TIMEOUT + SLACK, outcome["elapsed"]


# --- 3. a store that fails mid-round ----------------------------------------

# Longer than a store failure may take to be reported, so that a timeout
# cannot pass for one; short enough that a barrier still waiting after the
# failure (rather than lost) fails its test in seconds.
STORE_FAILURE_TIMEOUT = 4.0
# How soon after the store broke the waiting rank must know.
STORE_FAILURE_BOUND = 2.0
# strerror(ELOOP): the cause, which the error must keep.
ELOOP_TEXT = "Too many levels of symbolic links"


def break_file_store(path):
    """Every FileStore call on `path` now fails at once: the path becomes a
    symbolic link to itself (open() fails with ELOOP). The file is kept
    beside it for repair_file_store()."""
    os.rename(path, path + ".saved")
    os.symlink(path, path)


def repair_file_store(path):
    os.remove(path)
    os.rename(path + ".saved", path)


def store_fails_while_waiting(rank, world_size, path, broken, failed, repaired):
    """Round 0 with both ranks. Rank 0 then waits in round 1, which rank 1
    never enters: rank 1 breaks the store's file once rank 0 has arrived,
    and repairs it once rank 0 has reported the failure. Rank 0 then calls
    again, once with the store repaired."""
    store = open_store(path, world_size)
    barrier = make(store, rank, world_size, timeout=STORE_FAILURE_TIMEOUT)
    barrier.execute_barrier()
    if rank == 1:
        # Rank 0's arrival in round 1 is on the store: it is waiting.
        deadline = time.monotonic() + COORDINATION
        while not store.check([f"{PREFIX}1/num_members"]):
            assert time.monotonic() < deadline, "rank 0 never entered round 1"
            time.sleep(0.01)
        time.sleep(0.1)
        break_file_store(path)
        broken.value = time.monotonic()
        assert failed.wait(COORDINATION), "rank 0 never reported"
        repair_file_store(path)
        repaired.set()
        return None
    outcome = timed_round(barrier)
    outcome["while_broken"] = timed_round(barrier)
    failed.set()
    assert repaired.wait(COORDINATION), "rank 1 never repaired the store"
    outcome["once_repaired"] = timed_round(barrier)
    return outcome


@pytest.fixture(scope="module")
def store_failure(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("failing") / "store")
    broken, failed, repaired = CONTEXT.Value("d", 0.0), CONTEXT.Event(), CONTEXT.Event()
    results = run_ranks(
        store_fails_while_waiting, 2, path, broken, failed, repaired, timeout=60
    )
    return broken.value, results[0]


def test_store_failing_mid_round_raises_store_unreachable_error(store_failure):
    _, outcome = store_failure
    error = outcome["error"]
    assert error is not None, "the round completed without rank 1"
    # The store is gone, as for a TCPStore whose host died: a DistNetworkError
    # that ends the barrier, not a timeout to retry nor c10d's own error.
    assert error["type"] == "StoreUnreachableError", error
    assert error["is_dist_network_error"], error
    assert not error["is_barrier_timeout"], error


def test_store_failure_is_reported_within_two_seconds(store_failure):
    broken_at, outcome = store_failure
    reported = outcome["ended_at"] - broken_at
    assert reported <= STORE_FAILURE_BOUND, f"{reported:.2f} s"
    report_figure("FileStore failure reported", reported)


def test_store_failure_message_says_what_failed_without_a_cpp_backtrace(
    store_failure,
):
    _, outcome = store_failure
    message = outcome["error"]["message"]
    # Which barrier, and the store's own words for what went wrong.
    assert "rank 0" in message and PREFIX in message, message
    assert ELOOP_TEXT in message, message
    assert "Exception raised from" not in message, message
    assert "frame #" not in message, message


@pytest.mark.parametrize("when", ["while_broken", "once_repaired"])
def test_barrier_is_lost_after_a_store_failure_every_later_call_raises_it_at_once(
    store_failure, when
):
    _, outcome = store_failure
    # A barrier does not reconnect: even with the store working again, the
    # round this rank was in cannot be trusted.
    later = outcome[when]
    assert later["error"] is not None, "the barrier carried on"
    assert later["error"]["type"] == "StoreUnreachableError", later["error"]
    assert later["elapsed"] < 0.5, f"{later['elapsed']:.2f} s"


# --- 4. liveness --------------------------------------------------------------

PEER_TIMEOUT = 1.0
VICTIM = 2
# docs/liveness.md: a rank beats every interval; a watcher reads a missing
# rank's counter once an interval and declares it lost once it has not moved
# for the silence allowed. So a watcher declares the loss at most an
# interval (its next read) + the silence + an interval (the read that finds
# it over) after the kill; the other survivors learn of it from their next
# heartbeat, one more interval. A waiting rank looks at that alarm between
# two FileStore waits, each a second long. Plus scheduling on 2 busy CPUs.
INTERVAL = PEER_TIMEOUT / 5
SILENCE = PEER_TIMEOUT
DETECTION_BOUND = 3 * INTERVAL + SILENCE + FILESTORE_WAIT_GRANULARITY + 0.5


def peer_killed_before_arriving(rank, world_size, path, killed_at):
    """The victim constructs its barrier, waits until the others are in
    round 0 (their arrivals are on the store), then dies by SIGKILL without
    arriving; the others wait with timeout_secs far above the detection."""
    store = open_store(path, world_size)
    barrier = make(
        store, rank, world_size, timeout=60.0, peer_timeout_secs=PEER_TIMEOUT
    )
    if rank == VICTIM:
        count = f"{PREFIX}0/num_members"
        deadline = time.monotonic() + COORDINATION
        while not (store.check([count]) and int(store.get(count)) == world_size - 1):
            assert time.monotonic() < deadline, "the others never entered round 0"
            time.sleep(0.01)
        # Only once no thread of this process is half-way through a write:
        # torch's FileStore reads a record torn by a writer's death in a loop
        # that never ends, in every process that opens the file (see the
        # module's docstring). Its writers hold the file's flock, so taking
        # it waits for the write under way; SIGKILL releases it.
        torn_guard = os.open(path, os.O_RDONLY)
        fcntl.flock(torn_guard, fcntl.LOCK_EX)
        killed_at.value = time.monotonic()
        os.kill(os.getpid(), signal.SIGKILL)
    outcome = timed_round(barrier)
    barrier.close()
    return outcome


def test_killed_peer_is_named_lost_by_every_survivor_over_a_file_store(tmp_path):
    world_size = 3
    killed_at = CONTEXT.Value("d", 0.0)
    results = run_ranks(
        peer_killed_before_arriving, world_size, str(tmp_path / "store"), killed_at,
        killed=(VICTIM,), timeout=60,
    )  # fmt: skip
    detections = []
    for rank in range(world_size):
        if rank == VICTIM:
            continue
        outcome = results[rank]
        error = outcome["error"]
        assert error is not None, f"rank {rank} completed a round without the victim"
        assert error["type"] == "PeerLostError", error
        assert error["lost_ranks"] == [VICTIM]
        detection = outcome["ended_at"] - killed_at.value
        assert detection <= DETECTION_BOUND, f"rank {rank} took {detection:.2f} s"
        detections.append(detection)
    report_figure("killed peer detected over a FileStore (slowest)", max(detections))


# --- 5. protocol="native" -----------------------------------------------------


def store_and_contents(kind, tmp_path):
    """A store of `kind`, and a function returning what it holds."""
    if kind == "FileStore":
        path = tmp_path / "store"
        # The file is a log every write appends to (torch 2.13's FileStore
        # writes one key already when it is constructed).
        return dist.FileStore(str(path), 1), path.read_bytes
    hash_store = dist.HashStore()
    if kind == "PrefixStore over a HashStore":
        return dist.PrefixStore("trainer", hash_store), hash_store.num_keys
    return hash_store, hash_store.num_keys


@pytest.mark.parametrize(
    "kind", ["HashStore", "FileStore", "PrefixStore over a HashStore"]
)
def test_native_protocol_over_a_store_that_is_not_a_tcp_store_is_refused(
    kind, tmp_path
):
    store, contents = store_and_contents(kind, tmp_path)
    before = contents()
    with pytest.raises(ValueError) as refused:
        TCPStoreBarrier.from_store(store, 0, 1, PREFIX, 30, protocol="native")
    message = str(refused.value)
    assert "protocol" in message and "native" in message, message
    assert "TCPStore" in message, message
    # Refused before anything reached the store.
    assert contents() == before
