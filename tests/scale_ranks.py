"""Rank bodies for test_scale.py: many ranks as threads of a few processes."""

from __future__ import annotations

import resource
import threading
import time

from conftest_shared import LOOPBACK


def slow_round_of_thread_ranks(process, processes, port, per_process, late):
    """Ranks [process * per_process, ...) as threads: round 0, then round 1
    in which the last rank arrives `late` seconds after the others."""
    from tcpstore_barrier import TCPStoreBarrier

    # Two connections and an eventfd per rank, and rank 0's server side.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    world_size = processes * per_process
    outcomes = {}

    def rank_main(rank):
        try:
            barrier = TCPStoreBarrier(
                rank, world_size, "scale", 120, True, port, LOOPBACK, 120
            )
            barrier.execute_barrier()
            if rank == world_size - 1:
                time.sleep(late)
            start = time.monotonic()
            barrier.execute_barrier()
            outcomes[rank] = ("ok", time.monotonic() - start)
            barrier.close()
        except Exception as e:  # noqa: BLE001 - reported to the test
            outcomes[rank] = (f"{type(e).__name__}: {e}", None)

    threads = [
        threading.Thread(target=rank_main, args=(rank,))
        for rank in range(process * per_process, (process + 1) * per_process)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes
