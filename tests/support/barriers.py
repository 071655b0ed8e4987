"""Barriers as the tests build them, what they tell of an error, and the
property every barrier must have."""

from __future__ import annotations

import time

from support import LOOPBACK


def barrier_arguments(
    rank, world_size, port, *, prefix="ckpt", init=30, timeout=30, libuv=True,
    master_address=LOOPBACK,
):  # fmt: skip
    """torch's constructor arguments of one rank of a barrier at master_address:port."""
    return {
        "global_rank": rank,
        "global_world_size": world_size,
        "barrier_prefix": prefix,
        "timeout_barrier_init_secs": init,
        "use_checkpoint_barrier_tcpstore_libuv": libuv,
        "tcpstore_port": port,
        "master_address": master_address,
        "timeout_secs": timeout,
    }


def our_barrier(rank, world_size, port, *, options=None, **arguments):
    """tcpstore_barrier's barrier; `options` are its own keyword arguments
    (protocol, peer_timeout_secs)."""
    from tcpstore_barrier import TCPStoreBarrier

    return TCPStoreBarrier(
        **barrier_arguments(rank, world_size, port, **arguments), **(options or {})
    )


def torch_barrier(rank, world_size, port, **arguments):
    """torch's Python TCPStoreBarrier (it has no close())."""
    from torch.distributed.checkpoint._experimental.barriers import TCPStoreBarrier

    return TCPStoreBarrier(**barrier_arguments(rank, world_size, port, **arguments))


def describe(error):
    """What a test needs to know of an exception, picklable and JSON-able."""
    from torch.distributed import DistError, DistNetworkError, DistStoreError

    from tcpstore_barrier import BarrierTimeoutError, PeerLostError

    return {
        "type": type(error).__name__,
        "message": str(error),
        "is_barrier_timeout": isinstance(error, BarrierTimeoutError),
        "is_peer_lost": isinstance(error, PeerLostError),
        "is_dist_store_error": isinstance(error, DistStoreError),
        "is_dist_network_error": isinstance(error, DistNetworkError),
        "is_dist_error": isinstance(error, DistError),
        "missing_ranks": getattr(error, "missing_ranks", None),
        "lost_ranks": getattr(error, "lost_ranks", None),
        "barrier_key": getattr(error, "barrier_key", None),
        "sequence": getattr(error, "sequence", None),
        "timeout_secs": getattr(error, "timeout_secs", None),
    }


def timed_round(barrier):
    """Runs one round; returns how it ended (describe()d) and when."""
    start = time.monotonic()
    try:
        barrier.execute_barrier()
        error = None
    except Exception as e:  # noqa: BLE001 - reported to the test
        error = describe(e)
    end = time.monotonic()
    return {"error": error, "elapsed": end - start, "ended_at": end}


def assert_no_early_release(stamps, resolution=0.0):
    """`stamps[rank][round]` is when the rank entered and left the round: no
    rank may leave a round before the last one entered it (give or take the
    clock's `resolution`)."""
    for s in range(len(stamps[0])):
        last_entry = max(rank_stamps[s][0] for rank_stamps in stamps)
        first_exit = min(rank_stamps[s][1] for rank_stamps in stamps)
        assert first_exit + resolution >= last_entry, (
            f"round {s} released before every rank entered"
        )


def await_key(store, key, ready=lambda value: True, timeout=20.0, poll=0.002):
    """Polls `store` until `key` exists and `ready(its value)`; returns the
    value. Fails after `timeout` s: far beyond what a passing test needs."""
    deadline = time.monotonic() + timeout
    while True:
        if store.check([key]):
            value = store.get(key)
            if ready(value):
                return value
        assert time.monotonic() < deadline, f"{key} not ready within {timeout} s"
        time.sleep(poll)


def await_arrivals(store, prefix, sequence, count, timeout=20.0):
    """Blocks until `count` ranks have entered round `sequence` of the barrier
    `prefix` (torch's protocol): its `{prefix}{sequence}/num_members` counter,
    which each rank adds 1 to as it enters, is visible to everyone."""
    await_key(
        store,
        f"{prefix}{sequence}/num_members",
        lambda value: int(value) >= count,
        timeout,
    )
