"""The tables ``bench-memory`` prints."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .memory_objects import ObjectsSummary
from .memory_store import StoreSummary

_KIB = 1024
_MIB = 1024 * 1024


def _kib(value: float | None) -> str:
    return "-" if value is None else f"{value / _KIB:.1f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_objects(summaries: Sequence[ObjectsSummary]) -> str:
    """Rows: figures; columns: implementations."""
    rows: list[tuple[str, Callable[[ObjectsSummary], str]]] = [
        ("RSS per object, constructed (KiB)", lambda s: _kib(s.rss_per_object)),
        ("RSS per object, after a round (KiB)",
         lambda s: _kib(s.rss_per_object_after_round)),
        ("malloc'd per object, constructed (KiB)",
         lambda s: _kib(s.heap_per_object)),
        ("malloc'd per object, after a round (KiB)",
         lambda s: _kib(s.heap_per_object_after_round)),
        ("fds per object, constructed", lambda s: _count(s.fds_per_object)),
        ("fds per object, after a round",
         lambda s: _count(s.fds_per_object_after_round)),
        ("threads per object, constructed", lambda s: _count(s.threads_per_object)),
        ("threads per object, after a round",
         lambda s: _count(s.threads_per_object_after_round)),
        ("host RSS per joined rank (KiB)", lambda s: _kib(s.host_rss_per_rank)),
        ("host RSS per rank, after a round (KiB)",
         lambda s: _kib(s.host_rss_per_rank_after_round)),
    ]  # fmt: skip
    table = [["", *[s.implementation for s in summaries]]]
    table += [[label, *[cell(s) for s in summaries]] for label, cell in rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    return "\n".join(
        "  ".join(
            text.ljust(width) if c == 0 else text.rjust(width)
            for c, (text, width) in enumerate(zip(row, widths))
        )
        for row in table
    )


def format_store(summary: StoreSummary) -> str:
    """One row per sample, then first/last/max."""
    lines = [f"{'barriers':>9}  {'rank0 RSS MiB':>13}  {'store keys':>10}  {'secs':>7}"]
    for s in summary.samples:
        lines.append(
            f"{s['barriers']:>9}  {s['rss'] / _MIB:>13.2f}  {s['keys']:>10}  "
            f"{s['secs']:>7.2f}"
        )
    lines.append(
        f"RSS MiB first {summary.first_rss / _MIB:.2f}, last "
        f"{summary.last_rss / _MIB:.2f}, max {summary.max_rss / _MIB:.2f}; keys "
        f"first {summary.first_keys}, last {summary.last_keys}, max "
        f"{summary.max_keys} ({summary.keys_per_barrier:+.3f} a barrier); "
        f"{_count(summary.barrier_us)} us a barrier"
    )
    return "\n".join(lines)
