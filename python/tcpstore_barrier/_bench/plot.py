"""``--plot``: latency against world size, when matplotlib is installed."""

from __future__ import annotations

from collections.abc import Sequence

from .results import WorldSummary


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`PlotUnavailable` unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise PlotUnavailable(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'tcpstore-barrier[plot]' (or pip install matplotlib)"
        ) from e


def plot_series(summaries: Sequence[WorldSummary]) -> dict[str, list[float | None]]:
    """The lines of the plot: label -> one value (us) per world size."""
    return {
        "ours median": [s.ours.median_us for s in summaries],
        "ours p99": [s.ours.p99_us for s in summaries],
        "torch median": [s.torch.median_us if s.torch else None for s in summaries],
        "torch p99": [s.torch.p99_us if s.torch else None for s in summaries],
        "store round trip": [s.floor.median_us for s in summaries],
    }


def plot_latency(summaries: Sequence[WorldSummary], path: str) -> None:
    """Write a PNG of :func:`plot_series` against world size to ``path``."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    world_sizes = [s.world_size for s in summaries]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    styles = {"ours": "C0", "torch": "C1", "store": "C2"}
    for label, values in plot_series(summaries).items():
        if all(v is None for v in values):
            continue
        axes.plot(
            world_sizes,
            [float("nan") if v is None else v for v in values],
            color=styles[label.split()[0]],
            linestyle="--" if "p99" in label else "-",
            marker="o",
            label=label,
        )
    axes.set_xlabel("world size")
    axes.set_ylabel("latency per barrier (us)")
    axes.set_yscale("log")
    axes.set_xticks(world_sizes)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
