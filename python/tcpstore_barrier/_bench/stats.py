"""Order statistics of latency samples, and the summary of one world size."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated.

    Interpolates between the closest ranks as numpy's default method does,
    so a reader can check a figure with ``numpy.percentile``.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    fraction = position - below
    return ordered[below] + (ordered[above] - ordered[below]) * fraction


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return percentile(values, 50)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class LatencySummary:
    """Latency of one implementation at one world size, in microseconds.

    ``median_us`` and ``p99_us`` are over every rank's samples of every
    block; ``wall_per_iter_us`` is a block's wall time divided by its
    barriers, averaged over ranks and blocks.
    """

    samples: int
    median_us: float
    p99_us: float
    wall_per_iter_us: float | None = None


def summarize(
    samples_ns: Iterable[int], walls_ns: Sequence[int] = (), iters: int = 0
) -> LatencySummary:
    """Summarize pooled samples (ns) and block wall times (ns) in microseconds."""
    samples_us = [ns / 1000 for ns in samples_ns]
    if not samples_us:
        raise ValueError("no samples to summarize")
    wall = None
    if walls_ns and iters > 0:
        wall = sum(walls_ns) / len(walls_ns) / iters / 1000
    return LatencySummary(
        samples=len(samples_us),
        median_us=median(samples_us),
        p99_us=percentile(samples_us, 99),
        wall_per_iter_us=wall,
    )
