"""The barrier speaks torch's key protocol and is a correct barrier."""

from __future__ import annotations

import protocol_ranks


def test_mixed_with_torch_ranks_never_releases_early(run_ranks, port):
    world_size, rounds = 3, 200
    stamps = run_ranks(
        protocol_ranks.timestamped_rounds, world_size, port, rounds, {1}, timeout=120
    )
    for s in range(rounds):
        last_entry = max(stamps[r][s][0] for r in range(world_size))
        first_exit = min(stamps[r][s][1] for r in range(world_size))
        assert first_exit >= last_entry, f"round {s} released before every rank entered"
