"""The order in which the blocks of one world size run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: What a block measures: a block of barriers of one implementation, or
#: rank 0's bare store round trips while the other ranks wait; with
#: --split-phase, loop iterations of Python work and a barrier (see
#: ``rank._time_split_block``).
BlockKind = Literal[
    "ours", "torch", "floor", "work", "split", "serial", "torch_serial"
]


@dataclass(frozen=True)
class Block:
    """One block of the schedule: ``iters`` timed operations of one kind."""

    index: int
    round: int
    kind: BlockKind


def ab_schedule(rounds: int, include_torch: bool = True) -> list[Block]:
    """Blocks for ``rounds`` A/B rounds, each followed by a floor block.

    The order within a round alternates (ours, torch, then torch, ours) so
    that a drift over the run, such as a CPU warming up or a store growing,
    favours neither implementation.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    kinds_per_round: list[list[BlockKind]] = []
    for r in range(rounds):
        pair: list[BlockKind] = ["ours", "torch"] if include_torch else ["ours"]
        if r % 2 == 1:
            pair.reverse()
        kinds_per_round.append([*pair, "floor"])
    blocks = []
    for r, kinds in enumerate(kinds_per_round):
        for kind in kinds:
            blocks.append(Block(index=len(blocks), round=r, kind=kind))
    return blocks


def split_schedule(rounds: int, include_torch: bool = True) -> list[Block]:
    """Blocks of --split-phase: each round the work alone, then the ways of
    doing it with a barrier, in an order that reverses every other round."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    blocks: list[Block] = []
    for r in range(rounds):
        ways: list[BlockKind] = ["split", "serial"]
        if include_torch:
            ways.append("torch_serial")
        if r % 2 == 1:
            ways.reverse()
        for kind in ["work", *ways]:
            blocks.append(Block(index=len(blocks), round=r, kind=kind))
    return blocks
