"""The bench command: its pure pieces fast, then the real thing, small."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpstore_barrier.__main__ import build_parser, main
from tcpstore_barrier._bench.config import BenchConfig, config_from_args, cpu_for_rank
from tcpstore_barrier._bench.plot import (
    PlotUnavailable,
    plot_series,
    require_matplotlib,
)
from tcpstore_barrier._bench.progress import QUIET_SECS, Progress, progress_line
from tcpstore_barrier._bench.rank import floor_ranks
from tcpstore_barrier._bench.report import build_document, describe_run, format_table
from tcpstore_barrier._bench.results import summarize_world
from tcpstore_barrier._bench.schedule import ab_schedule
from tcpstore_barrier._bench.stats import median, percentile, ratio, summarize


# --- statistics -------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=50),
    q=st.floats(min_value=0, max_value=100),
)
def test_percentile_agrees_with_numpy(values, q):
    assert percentile(values, q) == pytest.approx(numpy.percentile(values, q))


def test_median_of_odd_and_even_counts():
    assert median([5, 1, 3]) == 3
    assert median([4, 1, 3, 2]) == 2.5
    assert median([7]) == 7


def test_p99_sits_near_the_top():
    values = list(range(1, 101))
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1


@pytest.mark.parametrize("q", [-1, 100.5, float("nan")])
def test_percentile_rejects_out_of_range(q):
    with pytest.raises(ValueError):
        percentile([1, 2], q)


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        percentile([], 50)


def test_ratio_is_none_when_undefined():
    assert ratio(3.0, 1.5) == 2.0
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_summarize_converts_to_microseconds():
    summary = summarize([1000, 2000, 3000], walls_ns=[30_000, 50_000], iters=10)
    assert summary.samples == 3
    assert summary.median_us == 2.0
    assert summary.p99_us == pytest.approx(2.98)
    # Mean block wall (40 us) over 10 barriers.
    assert summary.wall_per_iter_us == 4.0
    assert summarize([1000]).wall_per_iter_us is None


# --- schedule and pinning ----------------------------------------------------


def test_ab_schedule_alternates_order_and_ends_rounds_with_a_floor():
    blocks = ab_schedule(3)
    assert [b.kind for b in blocks] == [
        "ours", "torch", "floor",
        "torch", "ours", "floor",
        "ours", "torch", "floor",
    ]  # fmt: skip
    assert [b.index for b in blocks] == list(range(9))
    assert [b.round for b in blocks] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_ab_schedule_without_torch():
    assert [b.kind for b in ab_schedule(2, include_torch=False)] == [
        "ours", "floor", "ours", "floor",
    ]  # fmt: skip


def test_ab_schedule_needs_a_round():
    with pytest.raises(ValueError):
        ab_schedule(0)


def test_cpu_for_rank():
    assert cpu_for_rank(3, [0, 1], None) == [None, None, None]
    assert cpu_for_rank(5, [3, 1], "spread") == [1, 3, 1, 3, 1]
    assert cpu_for_rank(3, [3, 1], "same") == [1, 1, 1]


def test_floor_is_measured_by_rank_0_and_by_a_peer():
    assert floor_ranks(1) == [0]
    assert floor_ranks(2) == [0, 1]
    assert floor_ranks(8) == [0, 7]


# --- command line ------------------------------------------------------------


def parse_bench(*argv: str) -> BenchConfig:
    return config_from_args(build_parser().parse_args(["bench", *argv]))


def test_bench_defaults():
    config = parse_bench()
    assert config == BenchConfig()
    assert config.world_sizes == (4,)
    assert config.ranks == "processes"
    assert config.protocol == "torch"
    assert config.use_libuv
    assert config.include_torch


def test_bench_options():
    config = parse_bench(
        "--world-size", "2", "4", "8", "--iters", "20", "--rounds", "3",
        "--ranks", "threads", "--busy-thread", "--backend", "legacy",
        "--protocol", "native", "--no-torch", "--pin", "--timeout", "30",
        "--json", "out.json", "--warmup", "0",
    )  # fmt: skip
    assert config.world_sizes == (2, 4, 8)
    assert (config.iters, config.rounds, config.warmup) == (20, 3, 0)
    assert config.ranks == "threads"
    assert config.busy_thread
    assert not config.use_libuv
    assert config.protocol == "native"
    assert not config.include_torch
    assert config.pin == "spread"
    assert config.timeout_secs == 30
    assert config.json_path == "out.json"
    assert parse_bench("--pin", "same").pin == "same"


@pytest.mark.parametrize(
    "argv",
    [
        ["--world-size", "0"],
        ["--iters", "-3"],
        ["--rounds", "0"],
        ["--timeout", "0"],
        ["--ranks", "fibers"],
        ["--backend", "epoll"],
        ["--protocol", "mpi"],
        ["--world-size"],
    ],
)
def test_bench_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_bench(*argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_help_explains_the_measurement(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    text = capsys.readouterr().out
    assert "perf_counter_ns" in text
    assert "always uses the libuv" in text


def test_version_and_info(capsys):
    import torch

    import tcpstore_barrier

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert tcpstore_barrier.__version__ in capsys.readouterr().out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert tcpstore_barrier.__version__ in out
    assert f"built with torch {tcpstore_barrier.built_with_torch}" in out
    assert f"running torch {torch.__version__}" in out


# --- summaries and report ----------------------------------------------------


def fake_figures(world_size: int, schedule, iters: int):
    """Figures as ranks send them: ours takes 10 us, torch 30 us, a round
    trip 5 us from rank 0 and 7 us from the last rank."""
    figures = []
    for rank in range(world_size):
        blocks = []
        for block in schedule:
            if block.kind == "floor":
                floor_ns = 5_000 if rank == 0 else 7_000
                measured = rank in floor_ranks(world_size)
                blocks.append(
                    {
                        "ours_store_ns": [floor_ns] * iters,
                        "torch_store_ns": [9_000] * iters,
                    }
                    if measured
                    else {}
                )
            else:
                ns = 10_000 if block.kind == "ours" else 30_000
                blocks.append({"samples_ns": [ns] * iters, "wall_ns": ns * iters * 2})
        figures.append({"blocks": blocks, "cpu": None})
    return figures


def test_summarize_world_pools_every_rank_and_block():
    schedule = ab_schedule(2)
    summary = summarize_world(3, schedule, fake_figures(3, schedule, 4), iters=4)
    assert summary.ours.samples == 3 * 2 * 4
    assert summary.ours.median_us == 10
    assert summary.ours.wall_per_iter_us == 20
    assert summary.torch is not None and summary.torch.median_us == 30
    assert summary.floor.median_us == 7
    assert summary.host_floor.median_us == 5
    assert summary.torch_store_floor is not None
    assert summary.torch_over_ours == 3
    assert summary.ours_over_floor == pytest.approx(10 / 7)


def test_summarize_world_without_torch():
    schedule = ab_schedule(1, include_torch=False)
    summary = summarize_world(2, schedule, fake_figures(2, schedule, 3), iters=3)
    assert summary.torch is None
    assert summary.torch_over_ours is None


def test_summarize_world_wants_every_rank():
    schedule = ab_schedule(1)
    with pytest.raises(ValueError):
        summarize_world(3, schedule, fake_figures(2, schedule, 3), iters=3)


def test_table_has_a_row_per_world_size_with_aligned_columns():
    schedule = ab_schedule(1)
    summaries = [
        summarize_world(n, schedule, fake_figures(n, schedule, 2), iters=2)
        for n in (2, 16)
    ]
    lines = format_table(summaries).splitlines()
    assert len(lines) == 3
    assert lines[0].split()[:3] == ["world", "ours", "med"]
    assert len({len(line) for line in lines}) == 1
    row = lines[2].split()
    assert row[0] == "16"
    assert row[1:6] == ["10.0", "10.0", "30.0", "30.0", "3.00x"]


def test_table_shows_dashes_without_torch():
    schedule = ab_schedule(1, include_torch=False)
    summary = summarize_world(2, schedule, fake_figures(2, schedule, 2), iters=2)
    row = format_table([summary]).splitlines()[1].split()
    assert row[3:6] == ["-", "-", "-"]


def test_description_says_torch_always_uses_libuv():
    text = "\n".join(describe_run(BenchConfig(backend="legacy", pin="same"), [0, 1]))
    assert "ours legacy" in text
    assert "always libuv" in text
    assert "every rank pinned to CPU 0" in text


def test_document_is_json_with_raw_samples():
    config = BenchConfig(world_sizes=(2,), iters=2, rounds=1)
    schedule = ab_schedule(1)
    figures = fake_figures(2, schedule, 2)
    summary = summarize_world(2, schedule, figures, iters=2)
    worlds = [(summary, schedule, figures)]
    document = json.loads(
        json.dumps(build_document(config, {"torch": "x"}, [0, 1], worlds))
    )
    world = document["worlds"][0]
    assert document["config"]["world_sizes"] == [2]
    assert world["summary"]["torch_over_ours"] == 3
    assert world["blocks"][1]["kind"] == "torch"
    assert world["blocks"][1]["ranks"][1]["samples_ns"] == [30_000, 30_000]


def test_plot_series_and_missing_matplotlib():
    schedule = ab_schedule(1, include_torch=False)
    summary = summarize_world(2, schedule, fake_figures(2, schedule, 2), iters=2)
    series = plot_series([summary])
    assert series["ours median"] == [10]
    assert series["torch median"] == [None]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(PlotUnavailable, match="pip install"):
            require_matplotlib()
    else:
        require_matplotlib()


def test_plot_without_matplotlib_fails_before_running(tmp_path, capsys):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("matplotlib is installed")
    started = time.monotonic()
    assert main(["bench", "--plot", str(tmp_path / "p.png")]) == 2
    assert "matplotlib" in capsys.readouterr().err
    assert time.monotonic() - started < 5


# --- progress -----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_line():
    assert progress_line(0, 4, "x").startswith("[" + "." * 24 + "] 0/4 x")
    assert progress_line(4, 4, "y").startswith("[" + "#" * 24 + "] 4/4 y")


def test_progress_off_a_terminal_is_quiet_at_first_then_a_line_per_block():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(4, stream=stream, is_tty=False, clock=clock)
    progress.show("starting")
    progress.advance("block 1")
    assert stream.getvalue() == ""
    clock.now = QUIET_SECS + 0.1
    progress.show("ready")
    progress.advance("block 2")
    progress.advance("block 3")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("2/4 block 2")
    assert "\r" not in stream.getvalue()


def test_progress_on_a_terminal_redraws_one_line():
    stream = io.StringIO()
    progress = Progress(2, stream=stream, is_tty=True, clock=FakeClock())
    progress.advance("a")
    progress.advance("b")
    progress.close()
    text = stream.getvalue()
    assert "\n" not in text
    assert text.count("\r") == 3
    assert text.endswith("\r\x1b[2K")


# --- the real bench, small ---------------------------------------------------


def run_cli(*argv: str, marker: str, timeout: float = 120):
    env = {**os.environ, "TCPSTORE_BENCH_TEST_MARKER": marker}
    return subprocess.run(
        [sys.executable, "-m", "tcpstore_barrier", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def processes_with(marker: str) -> list[int]:
    needle = f"TCPSTORE_BENCH_TEST_MARKER={marker}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def assert_no_process_left(marker: str) -> None:
    # The forkserver notices its parent is gone on its own, a moment later.
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(marker) == []


@pytest.mark.parametrize("ranks", ["processes", "threads"])
def test_bench_end_to_end(ranks, tmp_path):
    out, marker = tmp_path / "out.json", uuid.uuid4().hex
    iters, rounds = 20, 2
    result = run_cli(
        "bench", "--world-size", "2", "--iters", str(iters), "--rounds", str(rounds),
        "--ranks", ranks, "--json", str(out), marker=marker,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "torch/ours" in result.stdout
    document = json.loads(out.read_text())
    assert document["config"]["ranks"] == ranks
    assert document["versions"]["torch"]
    (world,) = document["worlds"]
    summary = world["summary"]
    for name in ("ours", "torch", "floor", "host_floor"):
        assert summary[name]["median_us"] > 0, name
        assert summary[name]["p99_us"] >= summary[name]["median_us"], name
    assert summary["ours"]["samples"] == 2 * iters * rounds
    assert summary["torch"]["samples"] == 2 * iters * rounds
    assert [r["ours_uses_libuv"] for r in world["ranks"]] == [True, True]
    samples = [
        ns for block in world["blocks"] if block["kind"] != "floor"
        for rank in block["ranks"] for ns in rank["samples_ns"]
    ]  # fmt: skip
    assert len(samples) == 2 * 2 * iters * rounds
    assert all(ns > 0 for ns in samples)
    assert_no_process_left(marker)


def test_bench_overrunning_its_timeout_kills_every_rank():
    marker = uuid.uuid4().hex
    started = time.monotonic()
    result = run_cli(
        "bench", "--world-size", "3", "--iters", "1000000", "--rounds", "1",
        "--timeout", "6", marker=marker,
    )  # fmt: skip
    assert result.returncode == 1
    assert "overran --timeout" in result.stderr
    assert time.monotonic() - started < 60
    assert_no_process_left(marker)
