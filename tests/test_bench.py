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
from tcpstore_barrier._bench import importtime, memory
from tcpstore_barrier._bench.config import (
    BenchConfig,
    ConfigError,
    config_from_args,
    cpu_for_rank,
)
from tcpstore_barrier._bench.launch import BenchError, check_fd_limit
from tcpstore_barrier._bench.plot import (
    PlotUnavailable,
    plot_series,
    require_matplotlib,
)
from tcpstore_barrier._bench.progress import QUIET_SECS, Progress, progress_line
from tcpstore_barrier._bench.rank import (
    CpuMeter,
    RankPlan,
    calibrate_work_loops,
    fds_needed,
    floor_ranks,
    python_work,
    raise_fd_limit,
    rank_groups,
    server_threads,
    thread_cpu_ns,
)
from tcpstore_barrier._bench.report import (
    build_document,
    describe_run,
    format_cost_table,
    format_split_table,
    format_table,
    has_costs,
)
from tcpstore_barrier._bench.results import (
    requests_per_round,
    summarize_split,
    summarize_world,
)
from tcpstore_barrier._bench.schedule import ab_schedule, split_schedule
from tcpstore_barrier.bench import format_report, init_timeout_secs
from tcpstore_barrier._bench.stats import median, percentile, ratio, summarize


# --- statistics ---------------------------------------------------------------


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


# --- schedule and pinning -----------------------------------------------------


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


# --- command line -------------------------------------------------------------


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


# --- summaries and report -----------------------------------------------------


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


# --- the real bench, small ----------------------------------------------------


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


# --- ranks as threads of several processes ------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    world_size=st.integers(min_value=1, max_value=2000),
    processes=st.integers(min_value=1, max_value=64),
)
def test_rank_groups_cover_every_rank_once_in_order(world_size, processes):
    groups = rank_groups(world_size, processes)
    assert len(groups) == min(world_size, processes)
    assert [r for g in groups for r in g] == list(range(world_size))
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
    assert 0 in groups[0]


def test_rank_groups_examples_and_bad_input():
    assert rank_groups(5, 2) == [(0, 1, 2), (3, 4)]
    assert rank_groups(2, 8) == [(0,), (1,)]
    assert rank_groups(1024, 8)[7] == tuple(range(896, 1024))
    with pytest.raises(ValueError):
        rank_groups(0, 1)
    with pytest.raises(ValueError):
        rank_groups(4, 0)


def test_fds_needed_counts_the_hosts_server_side():
    # Ours: own and watcher connections; torch: one more; plus the server ends.
    assert fds_needed(128, 1024, False, True) == 64 + 3 * 128
    assert fds_needed(128, 1024, True, True) == 64 + 3 * 128 + 3 * 1024 + 16
    assert fds_needed(1, 2, True, False) == 64 + 2 + 4 + 8


def test_raise_fd_limit_never_lowers_nor_passes_the_hard_limit():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        assert raise_fd_limit(1) == soft
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
        if hard != resource.RLIM_INFINITY:
            assert raise_fd_limit(hard + 10) == hard
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def tiny_plan(world_size: int, torch_port: int | None = 2) -> RankPlan:
    return RankPlan(
        world_size=world_size, ours_port=1, torch_port=torch_port, use_libuv=True,
        protocol="torch", iters=1, warmup=0, schedule=tuple(ab_schedule(1)),
        cpus=(None,) * world_size, busy_thread=False, timeout_secs=1,
        init_timeout_secs=1, deadline_unix=0,
    )  # fmt: skip


def test_fd_check_fails_early_when_the_host_cannot_fit():
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on file descriptors")
    huge = hard  # 3 fds a rank at the host alone
    with pytest.raises(BenchError, match="ulimit -Hn"):
        check_fd_limit(tiny_plan(huge), rank_groups(huge, 8))
    check_fd_limit(tiny_plan(16), rank_groups(16, 8))


def test_processes_option():
    assert parse_bench("--ranks", "threads", "--processes", "8").processes == 8
    assert parse_bench("--ranks", "threads").processes == 1
    config = parse_bench("--ranks", "threads", "--processes", "8")
    assert config.processes_for(4) == 4
    assert config.processes_for(1024) == 8
    assert parse_bench().processes_for(4) == 4
    with pytest.raises(ConfigError, match="--ranks threads"):
        parse_bench("--processes", "2")
    with pytest.raises(SystemExit):
        parse_bench("--ranks", "threads", "--processes", "0")


def test_processes_without_threads_exits_2(capsys):
    assert main(["bench", "--processes", "2"]) == 2
    assert "--ranks threads" in capsys.readouterr().err


def test_init_timeout_grows_with_large_worlds_within_the_deadline():
    assert init_timeout_secs(4, 600) == 60
    assert init_timeout_secs(1024, 600) == pytest.approx(102.4)
    assert init_timeout_secs(1024, 30) == 30


# --- where the time goes ------------------------------------------------------


def test_requests_per_round():
    assert requests_per_round(4, "torch", "torch") == 13
    assert requests_per_round(4, "torch", "native") == 13
    assert requests_per_round(4, "ours", "torch") == pytest.approx(12 + 2.25)
    assert requests_per_round(4, "ours", "native") == 5


def costed_figures(world_size, schedule, iters):
    """fake_figures plus CPU readings: per barrier block, ours' server 30 us
    and torch's 60 us a barrier; each process 100 us a barrier."""
    figures = fake_figures(world_size, schedule, iters)
    barriers = iters
    for rank, rank_figures in enumerate(figures):
        for block, block_figures in zip(schedule, rank_figures["blocks"]):
            if block.kind == "floor":
                continue
            block_figures["process_cpu_ns"] = 100_000 * barriers
            if rank == 0:
                per = 30_000 if block.kind == "ours" else 60_000
                block_figures[f"{block.kind}_server_cpu_ns"] = per * barriers
    return figures


def test_cpu_costs_per_barrier_and_per_request():
    schedule = ab_schedule(2)
    figures = costed_figures(4, schedule, iters=10)
    summary = summarize_world(4, schedule, figures, iters=10)
    assert summary.ours_cost is not None and summary.torch_cost is not None
    assert summary.ours_cost.server_us == pytest.approx(30)
    assert summary.ours_cost.total_us == pytest.approx(4 * 100)
    assert summary.ours_cost.requests == pytest.approx(14.25)
    assert summary.ours_cost.server_per_request_us == pytest.approx(30 / 14.25)
    assert summary.torch_cost.server_us == pytest.approx(60)
    assert summary.torch_cost.server_per_request_us == pytest.approx(60 / 13)
    assert has_costs([summary])
    lines = format_cost_table([summary]).splitlines()
    assert lines[0].split()[:3] == ["world", "ours", "req/it"]
    assert lines[1].split()[:5] == ["4", "14.25", "30.0", "2.11", "400.0"]
    report = format_report([summary])
    assert "where the time goes" in report and "torch srv/req" in report


def test_no_cpu_readings_no_cost_table():
    schedule = ab_schedule(1)
    summary = summarize_world(2, schedule, fake_figures(2, schedule, 2), iters=2)
    assert summary.ours_cost is None and not has_costs([summary])
    assert "where the time goes" not in format_report([summary])


def test_cpu_meter_reads_a_store_servers_thread():
    import torch.distributed as dist

    before = server_threads()
    store = dist.TCPStore("127.0.0.1", 0, 1, True, use_libuv=True)
    try:
        mine = server_threads() - before
        assert len(mine) == 1
        meter = CpuMeter({"ours": mine}, whole_process=True)
        first = meter.read()
        for _ in range(200):
            store.add("k", 1)
        spent = CpuMeter.spent(first, meter.read())
        assert set(spent) == {"ours_server_cpu_ns", "process_cpu_ns"}
        assert spent["ours_server_cpu_ns"] > 0
        assert spent["process_cpu_ns"] >= spent["ours_server_cpu_ns"] > 0
    finally:
        del store
    assert thread_cpu_ns([]) == 0
    assert thread_cpu_ns([2**30]) == 0  # no such thread


# --- split phase --------------------------------------------------------------


def test_split_schedule():
    kinds = [b.kind for b in split_schedule(2)]
    assert kinds == [
        "work", "split", "serial", "torch_serial",
        "work", "torch_serial", "serial", "split",
    ]  # fmt: skip
    assert [b.kind for b in split_schedule(1, include_torch=False)] == [
        "work", "split", "serial",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        split_schedule(0)


def test_split_options():
    config = parse_bench("--split-phase", "--work-us", "50", "--busy-thread")
    assert config.split_phase and config.work_us == 50 and config.busy_thread
    assert parse_bench().work_us == 200 and not parse_bench().split_phase
    with pytest.raises(ConfigError):
        parse_bench("--split-phase", "--plot", "x.png")
    with pytest.raises(SystemExit):
        parse_bench("--work-us", "-1")
    text = "\n".join(describe_run(config, [0, 1]))
    assert "50 us of" in text and "arrive()" in text


def test_python_work_and_its_calibration():
    assert python_work(0) == 0
    assert python_work(4) == 0 + 1 + 4 + 9
    assert calibrate_work_loops(0) == 0
    small, large = calibrate_work_loops(20), calibrate_work_loops(2000)
    assert 1 <= small < large


def split_figures(world_size, schedule, iters):
    """Per iteration: work 200 us, split 300 us, serial 500 us, torch 900 us;
    half the split iterations find the round released at wait()."""
    ns = {"work": 200_000, "split": 300_000, "serial": 500_000, "torch_serial": 900_000}
    figures = []
    for _ in range(world_size):
        blocks = []
        for block in schedule:
            figures_of_block = {
                "samples_ns": [ns[block.kind]] * iters,
                "wall_ns": ns[block.kind] * iters,
            }
            if block.kind == "split":
                figures_of_block["released_at_wait"] = iters // 2
                figures_of_block["arrive_ns"] = [40_000] * iters
                figures_of_block["wait_ns"] = [10_000] * iters
            blocks.append(figures_of_block)
        figures.append({"blocks": blocks})
    return figures


def test_summarize_split_and_its_table():
    schedule = split_schedule(2)
    summary = summarize_split(2, schedule, split_figures(2, schedule, 4), iters=4)
    assert summary.work.median_us == 200
    assert summary.split.median_us == 300
    assert summary.serial.median_us == 500
    assert summary.torch_serial is not None
    assert summary.torch_serial.median_us == 900
    assert summary.saved_us == 200
    assert summary.released_at_wait == 0.5
    assert (summary.arrive_median_us, summary.wait_median_us) == (40, 10)
    assert summary.split.samples == 2 * 2 * 4
    lines = format_split_table([summary]).splitlines()
    assert lines[0].split()[:4] == ["world", "work", "med", "split"]
    assert lines[1].split() == [
        "2", "200.0", "300.0", "300.0", "500.0", "500.0", "200.0", "40.0",
        "10.0", "900.0", "900.0", "300.0", "500.0", "50%",
    ]  # fmt: skip
    assert format_report([summary]) == format_split_table([summary])
    document = json.loads(
        json.dumps(
            build_document(
                BenchConfig(split_phase=True), {}, [0], [(summary, schedule, [])]
            )
        )
    )
    assert document["worlds"][0]["summary"]["saved_us"] == 200
    with pytest.raises(ValueError):
        summarize_split(3, schedule, split_figures(2, schedule, 4), iters=4)


# --- memory -------------------------------------------------------------------


def test_memory_readings_of_this_process():
    assert memory.rss_bytes() > 10 * 1024 * 1024
    assert memory.rss_bytes(os.getpid()) > 0
    heap = memory.heap_in_use()
    assert heap is None or heap > 0
    assert memory.open_fds() > 0 and memory.thread_count() >= 1


def test_memory_checkpoints():
    assert memory.checkpoints(200) == [0, 20, 100, 200]
    assert memory.checkpoints(4) == [0, 1, 2, 4]
    assert memory.checkpoints(1) == [0, 1]


def fake_objects_raw(objects, rss_per=4096, heap_per=1000, round_rss=8192):
    def reading(n, extra_rss=0, extra_fds=0, extra_threads=0):
        return {
            "rss": 100_000_000 + 5_000_000 * (n > 0) + rss_per * n + extra_rss,
            "heap": 1_000_000 + heap_per * n,
            "fds": 10 + n + extra_fds,
            "threads": 3 + extra_threads,
            "host_rss": 200_000_000 + 2048 * n + extra_rss,
        }

    # JSON keys are strings after a round trip; the summary takes both.
    return {
        "host": {"before": {}, "joined": {}},
        "measurer": {
            "constructed": {str(n): reading(n) for n in memory.checkpoints(objects)},
            "after_round": reading(
                objects, round_rss * objects, objects - 1, objects - 1
            ),
        },
    }


def test_summarize_objects_takes_slopes_past_one_time_costs():
    summary = memory.summarize_objects("ours", 200, fake_objects_raw(200))
    # The 5 MB jump at the first object is a one-time cost, not a slope.
    assert summary.rss_per_object == 4096
    assert summary.rss_per_object_after_round == 4096 + 8192
    assert summary.heap_per_object == 1000
    assert summary.fds_per_object == 1
    assert summary.fds_per_object_after_round == pytest.approx(2 - 1 / 200)
    assert summary.threads_per_object == 0
    assert summary.threads_per_object_after_round == pytest.approx(1 - 1 / 200)
    assert summary.host_rss_per_rank == 2048
    assert summary.host_rss_per_rank_after_round == 2048 + 8192
    raw = fake_objects_raw(200)
    del raw["measurer"]["after_round"]
    torch_like = memory.summarize_objects("torch", 200, raw)
    assert torch_like.rss_per_object_after_round is None
    text = memory.format_objects([summary, torch_like])
    assert text.splitlines()[0].split() == ["ours", "torch"]
    assert "RSS per object, constructed (KiB)" in text and "4.0" in text


def test_store_summary_first_last_max_and_growth():
    samples = [
        {"barriers": b, "rss": 50 * 2**20 + (2**20 if b == 20 else 0), "keys": k,
         "secs": b / 1000}
        for b, k in [(1, 8), (10, 14), (20, 12), (30, 14)]
    ]  # fmt: skip
    summary = memory.StoreSummary("ours", 30, samples)
    assert (summary.first_keys, summary.last_keys, summary.max_keys) == (8, 14, 14)
    assert summary.max_rss == 51 * 2**20 and summary.last_rss == 50 * 2**20
    assert summary.keys_per_barrier == pytest.approx(6 / 29)
    assert summary.barrier_us == pytest.approx(1000)
    text = memory.format_store(summary)
    assert len(text.splitlines()) == 1 + 4 + 1
    assert "max 51.00" in text and "keys first 8, last 14, max 14" in text


def test_memory_options():
    args = build_parser().parse_args(
        ["bench-memory", "--objects", "5", "--barriers", "100", "--sample-every",
         "10", "--torch-barriers", "50", "--torch-sample-every", "5", "--no-torch",
         "--only", "store", "--protocol", "native"]
    )  # fmt: skip
    config = memory.memory_config_from_args(args)
    assert (config.objects, config.barriers, config.sample_every) == (5, 100, 10)
    assert (config.torch_barriers, config.torch_sample_every) == (50, 5)
    assert config.implementations() == ["ours"]
    assert config.only == "store" and config.protocol == "native"
    parsed = build_parser().parse_args(["bench-memory"])
    defaults = memory.memory_config_from_args(parsed)
    assert defaults == memory.MemoryConfig()
    assert defaults.objects == 200 and defaults.barriers == 100_000


# --- import time --------------------------------------------------------------


IMPORTTIME_STDERR = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |     torch._C
import time:      5000 |    900000 | torch
import time:       700 |        700 |   tcpstore_barrier._C
import time:       300 |       1500 | tcpstore_barrier
"""


def test_parse_import_timings():
    assert importtime.parse_timing("1.25 0.0031\n") == (1.25, 0.0031)
    with pytest.raises(ValueError):
        importtime.parse_timing("oops")
    assert importtime.parse_importtime(IMPORTTIME_STDERR) == [
        ("tcpstore_barrier._C", 700, 700),
        ("tcpstore_barrier", 300, 1500),
    ]
    timing = importtime.ImportTiming(
        [1.0, 1.2, 1.1], [0.003, 0.005, 0.004], [("tcpstore_barrier", 300, 1500)]
    )
    assert timing.package_median_ms == pytest.approx(4.0)
    text = importtime.format_timing(timing)
    assert "median 4.0 ms of 3 fresh runs" in text
    assert "import torch alone: median 1100.0 ms" in text


# --- the new modes, small and for real ----------------------------------------


def test_bench_threads_over_processes_end_to_end(tmp_path):
    out, marker = tmp_path / "out.json", uuid.uuid4().hex
    result = run_cli(
        "bench", "--ranks", "threads", "--processes", "2", "--world-size", "4",
        "--iters", "10", "--rounds", "1", "--json", str(out), marker=marker,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "at most 2 process(es)" in result.stdout
    assert "where the time goes" in result.stdout
    document = json.loads(out.read_text())
    (world,) = document["worlds"]
    # One rank of each process reads its process's CPU time: ranks 0 and 2.
    first_block = world["blocks"][0]["ranks"]
    assert [("process_cpu_ns" in r) for r in first_block] == [True, False, True, False]
    assert world["summary"]["ours_cost"]["server_us"] > 0
    assert world["summary"]["torch_cost"]["server_us"] > 0
    assert world["summary"]["ours"]["samples"] == 4 * 10
    assert_no_process_left(marker)


def test_bench_split_phase_end_to_end(tmp_path):
    out, marker = tmp_path / "out.json", uuid.uuid4().hex
    result = run_cli(
        "bench", "--split-phase", "--busy-thread", "--work-us", "50",
        "--world-size", "2", "--iters", "10", "--rounds", "1", "--warmup", "2",
        "--json", str(out), marker=marker,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "split med" in result.stdout
    (world,) = json.loads(out.read_text())["worlds"]
    summary = world["summary"]
    for part in ("work", "split", "serial", "torch_serial"):
        assert summary[part]["samples"] == 2 * 10, part
        assert summary[part]["median_us"] > 0, part
    assert 0 <= summary["released_at_wait"] <= 1
    assert summary["arrive_median_us"] > 0 and summary["wait_median_us"] > 0
    assert_no_process_left(marker)


def test_bench_memory_end_to_end(tmp_path):
    out, marker = tmp_path / "out.json", uuid.uuid4().hex
    result = run_cli(
        "bench-memory", "--objects", "4", "--barriers", "60", "--sample-every",
        "20", "--torch-barriers", "30", "--torch-sample-every", "10",
        "--json", str(out), marker=marker,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "RSS per object" in result.stdout
    document = json.loads(out.read_text())
    ours, torch_objects = document["objects"]
    # Ours opens its watcher (a thread and a second connection) when it is
    # constructed; torch's class has one connection and no thread.
    assert ours["fds_per_object"] == 2 and torch_objects["fds_per_object"] == 1
    assert ours["threads_per_object_after_round"] == 1
    assert ours["fds_per_object_after_round"] == 2
    ours_store, torch_store = document["stores"]
    assert [s["barriers"] for s in ours_store["samples"]] == [1, 20, 40, 60]
    ours_keys = [s["keys"] for s in ours_store["samples"]]
    assert max(ours_keys) < 30
    torch_keys = [s["keys"] for s in torch_store["samples"]]
    # torch's class keeps 2 keys a round (give or take the peer's next round).
    assert abs(torch_keys[-1] - torch_keys[0] - 2 * (30 - 1)) <= 2
    assert_no_process_left(marker)


def test_bench_import_end_to_end(tmp_path):
    out = tmp_path / "out.json"
    result = run_cli("bench-import", "--runs", "1", "--json", str(out), marker="x")
    assert result.returncode == 0, result.stderr
    assert "import tcpstore_barrier after import torch: median" in result.stdout
    document = json.loads(out.read_text())
    assert len(document["package_secs"]) == 1
    assert 0 < document["package_median_ms"] < 10_000
    assert any(m[0] == "tcpstore_barrier" for m in document["slowest"])
