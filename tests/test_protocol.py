"""The barrier speaks torch's key protocol and is a correct barrier.

torch's upstream test of its class (shared/reference) checks the keys it
writes against a mocked store; here the same expectations are checked
against a real TCPStore's contents.
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time

import pytest
from support import LOOPBACK
from support.barriers import (
    assert_no_early_release,
    our_barrier,
    torch_barrier,
)
from support.launch import run_ranks

from tcpstore_barrier import BarrierTimeoutError, TCPStoreBarrier


def make_pair(
    port,
    world_size=2,
    prefix="test_barrier",
    use_libuv=True,
    timeout_secs=30,
    **options,
):
    """Ranks 0..world_size-1 of one barrier, built concurrently (rank 0 waits for all)."""
    return run_ranks(
        lambda rank, world_size: our_barrier(
            rank, world_size, port, prefix=prefix, libuv=use_libuv,
            timeout=timeout_secs, options=options,
        ),
        world_size,
        threads=True,
    )  # fmt: skip


def run_round(barriers):
    run_ranks(lambda rank, _: barriers[rank].execute_barrier(), len(barriers),
              threads=True, timeout=30)  # fmt: skip


def accepts_connections(port):
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((LOOPBACK, port)) == 0


@pytest.mark.parametrize("use_libuv", [True, False])
def test_rank0_hosts_the_store_with_the_requested_backend(port, use_libuv):
    rank0, rank1 = make_pair(port, use_libuv=use_libuv)
    assert rank0.store.port == port and rank1.store.port == port
    assert rank0.store.host == LOOPBACK
    assert rank0.uses_libuv is use_libuv
    assert rank0.store.libuvBackend is use_libuv
    rank1.close()
    assert accepts_connections(port), "the store must outlive a non-host rank"
    rank0.close()
    assert not accepts_connections(port), "rank 0 hosted the store"


def test_execute_barrier_writes_torch_keys_for_each_sequence(port):
    barriers = make_pair(port, prefix="test_barrier")
    store = barriers[0].store

    run_round(barriers)
    assert store.get("rank0") == b"0"
    assert store.get("rank1") == b"0"
    assert store.get("test_barrier0/num_members") == b"2"
    assert store.check(["test_barrier0/last_member"])
    assert [b.sequence for b in barriers] == [1, 1]

    run_round(barriers)
    assert store.get("rank0") == b"1"
    assert store.get("test_barrier1/num_members") == b"2"
    assert store.check(["test_barrier1/last_member"])
    assert [b.sequence for b in barriers] == [2, 2]


def test_positional_arguments_in_torch_order(port):
    barriers = run_ranks(
        lambda rank, _: TCPStoreBarrier(rank, 2, "pos", 30, True, port, LOOPBACK, 30),
        2,
        threads=True,
    )
    assert [b.global_rank for b in barriers] == [0, 1]
    assert all(b.barrier_prefix == "pos" and b.timeout_secs == 30 for b in barriers)


def timestamped_rounds(
    rank, world_size, port, rounds, torch_ranks=(), protocol="torch"
):
    """Enter `rounds` barriers after random delays; return (enter, leave) times.

    Ranks in `torch_ranks` use torch's Python class, the others ours.
    """
    if rank in torch_ranks:
        barrier = torch_barrier(rank, world_size, port)
    else:
        barrier = our_barrier(rank, world_size, port, options={"protocol": protocol})
    rng = random.Random(rank)
    stamps = []
    for _ in range(rounds):
        time.sleep(rng.uniform(0, 0.002))
        # CLOCK_MONOTONIC: one clock for every process of the machine, and
        # one that no clock adjustment moves between two stamps.
        entered = time.monotonic()
        barrier.execute_barrier()
        stamps.append((entered, time.monotonic()))
    if rank not in torch_ranks:  # torch's class has no close()
        assert barrier.sequence == rounds
        barrier.close()
    return stamps


@pytest.mark.parametrize(
    "torch_ranks", [{1}, {0}, {0, 2}], ids=lambda r: f"torch{sorted(r)}"
)
def test_mixed_with_torch_ranks_never_releases_early(port, torch_ranks):
    world_size, rounds = 3, 200
    stamps = run_ranks(
        timestamped_rounds, world_size, port, rounds, torch_ranks, timeout=120
    )
    assert_no_early_release(stamps)


@pytest.mark.parametrize("protocol", ["torch", "native"])
def test_no_rank_leaves_before_every_rank_entered(port, protocol):
    world_size, rounds = 4, 300
    stamps = run_ranks(
        timestamped_rounds, world_size, port, rounds, (), protocol, timeout=120
    )
    assert_no_early_release(stamps)


def test_python_thread_keeps_running_while_a_rank_waits(port):
    barriers = make_pair(port)
    waiter = threading.Thread(target=barriers[1].execute_barrier)
    waiter.start()
    ticks = 0
    stop = time.monotonic() + 0.5
    while time.monotonic() < stop:
        ticks += 1
    assert waiter.is_alive(), "rank 1 left before rank 0 arrived"
    barriers[0].execute_barrier()
    waiter.join(timeout=10)
    # With the GIL held by the waiter this loop would barely run at all.
    assert ticks > 100_000


def test_two_ranks_as_threads_of_one_process(port):
    def rank_body(rank, world_size, port):
        # Closed on leaving, as the README's shutdown rule asks: rank 0's
        # thread would otherwise take the store down with it while rank 1
        # may still await the last round's reply.
        with our_barrier(rank, world_size, port) as barrier:
            for _ in range(100):
                barrier.execute_barrier()
            return barrier.sequence

    assert run_ranks(rank_body, 2, port, threads=True) == [100, 100]


def test_arrive_then_wait_completes_the_round(port):
    barriers = make_pair(port)
    barriers[0].arrive()
    barriers[0].arrive()  # a second arrive before wait() is not a second arrival
    assert not barriers[0].released
    barriers[1].arrive()
    assert barriers[1].released, "the last arriver releases the round"
    deadline = time.monotonic() + 5
    while not barriers[0].released and time.monotonic() < deadline:
        time.sleep(0.001)
    assert barriers[0].released, "the watcher saw the release before wait()"
    for b in barriers:
        b.wait()
    assert [b.sequence for b in barriers] == [1, 1]
    assert barriers[0].store.get("test_barrier0/num_members") == b"2"


def test_import_works_as_the_first_import_of_a_program():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import tcpstore_barrier; print(tcpstore_barrier.TCPStoreBarrier.__module__)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tcpstore_barrier"


def test_native_timeout_names_only_ranks_that_never_arrived(port):
    # Native ranks write their rank key only once their wait has been slow
    # for 100 ms. Rank 1 arrives first (arrive(): counted by the server, no
    # key) and starts waiting 50 ms before rank 0 times out, so its key comes
    # after rank 0 first reads the keys: the server's count must keep it off
    # the list while the key catches up (the core waits 300 ms for that, so a
    # timer up to ~250 ms late still passes). Only rank 2 never arrived.
    timeout = 1.0
    barriers = make_pair(port, world_size=3, timeout_secs=timeout, protocol="native")
    barriers[1].arrive()
    late = threading.Timer(timeout - 0.05, lambda: run_quietly(barriers[1].wait))
    late.start()
    with pytest.raises(BarrierTimeoutError) as caught:
        barriers[0].execute_barrier()
    late.join()
    assert caught.value.missing_ranks == [2]
    assert caught.value.barrier_key == "test_barrier0/barrier"


def run_quietly(call):
    try:
        call()
    except BarrierTimeoutError:
        pass
