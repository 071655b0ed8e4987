"""Rank bodies for test_liveness.py (imported by name in rank processes).

Every body is ``body(rank, world_size, port, ...)`` and returns plain data;
times are ``time.monotonic()``, one clock for every process of the machine.
Ranks that must meet outside the barrier use multiprocessing events, since
the store itself may be frozen.
"""

from __future__ import annotations

import ctypes
import os
import signal
import tempfile
import threading
import time

from conftest_shared import LOOPBACK

PREFIX = "ckpt"


def make(rank, world_size, port, *, timeout=120.0, peer_timeout=1.0, init=20.0):
    from tcpstore_barrier import TCPStoreBarrier

    return TCPStoreBarrier(
        rank,
        world_size,
        PREFIX,
        init,
        True,
        port,
        LOOPBACK,
        timeout,
        peer_timeout_secs=peer_timeout,
    )


def describe(error):
    """What a test needs to know of an exception, picklable."""
    from torch.distributed import DistNetworkError, DistStoreError

    from tcpstore_barrier import BarrierTimeoutError, PeerLostError

    return {
        "type": type(error).__name__,
        "message": str(error),
        "is_barrier_timeout": isinstance(error, BarrierTimeoutError),
        "is_peer_lost": isinstance(error, PeerLostError),
        "is_dist_store_error": isinstance(error, DistStoreError),
        "is_dist_network_error": isinstance(error, DistNetworkError),
        "missing_ranks": getattr(error, "missing_ranks", None),
        "lost_ranks": getattr(error, "lost_ranks", None),
        "sequence": getattr(error, "sequence", None),
    }


def timed_round(barrier):
    """Runs one round; returns how it ended and when."""
    start = time.monotonic()
    try:
        barrier.execute_barrier()
        error = None
    except Exception as e:  # noqa: BLE001 - reported to the test
        error = describe(e)
    end = time.monotonic()
    return {"error": error, "elapsed": end - start, "ended_at": end}


def killed_peer(rank, world_size, port, victim, peer_timeout, killed_at):
    """Round 0 with everyone; then the victim dies by SIGKILL while the
    others wait in round 1 (timeout_secs far above the detection time)."""
    barrier = make(rank, world_size, port, peer_timeout=peer_timeout)
    barrier.execute_barrier()
    if rank == victim:
        time.sleep(0.5)
        killed_at.value = time.monotonic()
        os.kill(os.getpid(), signal.SIGKILL)
    outcome = timed_round(barrier)
    again = timed_round(barrier)
    close_start = time.monotonic()
    barrier.close()
    outcome["close_elapsed"] = time.monotonic() - close_start
    outcome["again"] = again["error"]
    return outcome


def frozen_host(rank, world_size, port, peer_timeout, timeout, ready, frozen, when):
    """Rank 0 hosts the store and never enters round 1; the test freezes it
    with SIGSTOP either while the others wait ("waiting") or before they
    arrive ("before arrival")."""
    barrier = make(rank, world_size, port, timeout=timeout, peer_timeout=peer_timeout)
    barrier.execute_barrier()
    if rank == 0:
        ready[0].set()
        time.sleep(120)
        return None
    if when == "before arrival":
        ready[rank].set()
        frozen.wait(30)
    else:
        threading.Timer(0.3, ready[rank].set).start()
    outcome = timed_round(barrier)
    outcome["again"] = timed_round(barrier)["error"]
    close_start = time.monotonic()
    barrier.close()
    outcome["close_elapsed"] = time.monotonic() - close_start
    return outcome


def host_awaiting_a_peer(rank, world_size, port):
    """Rank 0 of 2: hosts the store and waits in its constructor for rank 1."""
    make(0, 2, port, init=60)


def join_frozen_host(rank, world_size, port, init):
    """Rank 1 of 2 joins a store whose host is frozen; reports how its
    construction ended."""
    start = time.monotonic()
    try:
        make(1, 2, port, init=init)
        error = None
    except Exception as e:  # noqa: BLE001
        error = describe(e)
    return {"error": error, "elapsed": time.monotonic() - start}


def _hold_gil(seconds):
    # A C function called through PyDLL keeps the GIL for its whole run, as
    # a long C extension call does.
    ctypes.PyDLL(None).usleep(int(seconds * 1_000_000))


def _spin_python(stop):
    while not stop.is_set():
        sum(range(1000))


def _write_shard(seconds):
    chunk = os.urandom(1 << 20)
    end = time.monotonic() + seconds
    with tempfile.TemporaryFile() as shard:
        while time.monotonic() < end:
            shard.write(chunk)
            shard.flush()


def late_rank(rank, world_size, port, peer_timeout, late, how, busy_thread):
    """Round 1 waits `late` seconds for the last rank, which is busy `how`
    (holding the GIL in C, sleeping, writing a shard); with `busy_thread`,
    every rank also runs a CPU-bound Python thread."""
    barrier = make(rank, world_size, port, peer_timeout=peer_timeout)
    stop = threading.Event()
    if busy_thread:
        threading.Thread(target=_spin_python, args=(stop,), daemon=True).start()
    barrier.execute_barrier()
    if rank == world_size - 1:
        if how == "gil held in C":
            _hold_gil(late)
        elif how == "shard write":
            _write_shard(late)
        else:
            time.sleep(late)
    outcome = timed_round(barrier)
    stop.set()
    barrier.close()
    return outcome


def mixed_with_torch(rank, world_size, port, torch_rank, late, timeout):
    """Our ranks and one torch rank, which arrives `late` s into round 1
    (never, if `late` is None)."""
    if rank == torch_rank:
        from torch.distributed.checkpoint._experimental.barriers import (
            TCPStoreBarrier as TorchBarrier,
        )

        barrier = TorchBarrier(
            global_rank=rank,
            global_world_size=world_size,
            barrier_prefix=PREFIX,
            timeout_barrier_init_secs=20,
            use_checkpoint_barrier_tcpstore_libuv=True,
            tcpstore_port=port,
            master_address=LOOPBACK,
            timeout_secs=60,
        )
        barrier.execute_barrier()
        if late is None:
            time.sleep(timeout + 3)
            return None
        time.sleep(late)
        barrier.execute_barrier()
        time.sleep(1)
        return None
    barrier = make(rank, world_size, port, timeout=timeout, peer_timeout=1.0)
    barrier.execute_barrier()
    outcome = timed_round(barrier)
    if late is None:
        time.sleep(2)
    barrier.close()
    return outcome
