"""No false alarm at scale: a slow round at 1024 ranks and the default peer
timeout; at this size "auto" builds a tree (every rank on this machine, so
host stores of 64), each store watching its own members."""

from __future__ import annotations

import resource
import threading
import time

import pytest
from support import LOOPBACK
from support.launch import run_ranks

PROCESSES, PER_PROCESS = 8, 128


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


@pytest.mark.slow
def test_a_slow_round_at_1024_ranks_raises_no_false_alarm(port):
    late = 8.0  # longer than the default peer timeout (5 s)
    results = run_ranks(
        slow_round_of_thread_ranks, PROCESSES, port, PER_PROCESS, late, timeout=240
    )
    outcomes = {rank: o for per_process in results for rank, o in per_process.items()}
    assert sorted(outcomes) == list(range(PROCESSES * PER_PROCESS))
    failed = {rank: what for rank, (what, _) in outcomes.items() if what != "ok"}
    assert not failed, dict(list(failed.items())[:5])
    waited = [elapsed for what, elapsed in outcomes.values()]
    assert max(waited) >= late - 1.0
