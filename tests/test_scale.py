"""No false alarm at scale: a slow round at 1024 ranks, the default peer
timeout, and every rank of this library heartbeating through one store."""

from __future__ import annotations

import pytest

import scale_ranks

PROCESSES, PER_PROCESS = 8, 128


@pytest.mark.slow
def test_a_slow_round_at_1024_ranks_raises_no_false_alarm(run_ranks, port):
    late = 8.0  # longer than the default peer timeout (5 s)
    results = run_ranks(
        scale_ranks.slow_round_of_thread_ranks,
        PROCESSES,
        port,
        PER_PROCESS,
        late,
        timeout=240,
    )
    outcomes = {rank: o for per_process in results for rank, o in per_process.items()}
    assert sorted(outcomes) == list(range(PROCESSES * PER_PROCESS))
    failed = {rank: what for rank, (what, _) in outcomes.items() if what != "ok"}
    assert not failed, dict(list(failed.items())[:5])
    waited = [elapsed for what, elapsed in outcomes.values()]
    assert max(waited) >= late - 1.0
