"""The bench commands as users run them: the command line, the JSON document,
fair interleaving of the contenders, exit codes and the plot. Real ranks and
real stores wherever a test runs a bench."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest

from tcpstore_barrier.__main__ import build_parser, main
from tcpstore_barrier._bench.cli import BenchConfig, config_from_args
from tcpstore_barrier._bench.importtime import parse_importtime
from tcpstore_barrier._bench.results import (
    requests_per_round,
    schedule,
    tree_root_members,
    tree_stores,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def parse_bench(*argv: str) -> BenchConfig:
    return config_from_args(build_parser().parse_args(["bench", *argv]))


def run_cli(*argv: str, marker: str = "", timeout: float = 120, **popen):
    env = {**os.environ, "TCPSTORE_BENCH_TEST_MARKER": marker or uuid.uuid4().hex}
    return subprocess.run([sys.executable, "-m", "tcpstore_barrier", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip


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


# --- the command line ------------------------------------------------------------


def test_bench_defaults_measure_ours_the_reference_torch_and_native():
    config = parse_bench()
    assert config == BenchConfig()
    assert config.world_sizes == (4,) and config.ranks == "processes"
    assert config.contenders == ("ours", "reference", "torch", "native")
    assert config.peer_timeout is None


def test_bench_options():
    config = parse_bench(
        "--world-size", "2", "4", "8", "--iters", "20", "--rounds", "3", "--warmup", "0",
        "--ranks", "threads", "--processes", "2", "--busy-thread", "--backend", "legacy",
        "--protocol", "native", "--no-torch", "--timeout", "30", "--json", "out.json",
    )  # fmt: skip
    assert config.world_sizes == (2, 4, 8)
    assert (config.iters, config.rounds, config.warmup) == (20, 3, 0)
    assert (config.ranks, config.processes, config.busy_thread) == ("threads", 2, True)
    assert (config.backend, config.protocol) == ("legacy", "native")
    # native is ours with --protocol native, torch's class is left out.
    assert config.contenders == ("ours", "reference")
    assert (config.timeout_secs, config.json_path) == (30, "out.json")
    assert parse_bench("--contenders", "ours", "torch").contenders == ("ours", "torch")


@pytest.mark.parametrize("argv", [
    ["--world-size", "0"], ["--iters", "-3"], ["--rounds", "0"], ["--timeout", "0"],
    ["--ranks", "fibers"], ["--backend", "epoll"], ["--protocol", "mpi"],
    ["--world-size"], ["--contenders", "mpi"], ["--peer-timeout", "-1"],
    ["--fan-in", "1"], ["--ranks-per-host", "0"],
])  # fmt: skip
def test_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--processes", "2"], "--ranks threads"),
    (["--contenders", "torch", "reference"], "must include ours"),
    (["--split-phase", "--plot", "x.png"], "--plot"),
])  # fmt: skip
def test_options_that_clash_exit_2_before_starting_ranks(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_tree_options():
    config = parse_bench("--contenders", "ours", "tree", "native-tree",
                         "--ranks-per-host", "4", "--fan-in", "3")  # fmt: skip
    assert config.contenders == ("ours", "tree", "native-tree")
    assert (config.ranks_per_host, config.fan_in) == (4, 3)
    # By default 8 ranks a host and the constructor's fan-in.
    assert (BenchConfig().ranks_per_host, BenchConfig().fan_in) == (8, None)


def test_tree_plan_counts_follow_the_native_plan():
    # 128 hosts of 8 in groups of 16: 8 group stores, 8 top leaders at the root.
    assert tree_root_members(1024, 8, 16) == 8
    assert sorted(set(tree_stores(1024, 8, 16))) == [8, 16]
    assert len(tree_stores(1024, 8, 16)) == 128 + 8
    # 100 hosts in groups of 16: 6 full groups and one of 4; a lone rank's
    # host and a lone node have no store.
    assert tree_stores(801, 8, 16) == [8] * 100 + [16] * 6 + [5]
    assert tree_root_members(801, 8, 16) == 7
    assert tree_root_members(8, 8, 16) == 1


def test_requests_per_round_are_counted_from_each_protocol():
    def count(contender, n=1024, protocol="torch"):
        return requests_per_round(contender, n, protocol, 8, 16)

    # torch's keys: set rank{r} and add per rank, a wait per rank but the
    # last, whose set releases; torch's class also waits after its set.
    assert count("ours") == count("reference") == {"root": 3072, "all": 3072}
    assert count("torch") == {"root": 3073, "all": 3073}
    assert (
        count("native")
        == count("ours", protocol="native")
        == {"root": 1024, "all": 1024}
    )
    # A tree: its 8 top leaders at the root; below it, a relay round at each
    # host store (8 members) and group store (16 members): each member's `in`
    # and wait, the leader's worker's wait for the `in` keys and its `out`, and
    # at a group store the worker's `in` for the leader (whose caller meets at
    # its host store).
    below = 128 * (2 * 8 + 2) + 8 * (2 * 16 + 1)
    assert count("tree") == {"root": 24, "all": 24 + below}
    assert count("native-tree") == {"root": 8, "all": 8 + below}


def test_liveness_options():
    assert parse_bench("--peer-timeout", "off").peer_timeout == "off"
    assert parse_bench("--peer-timeout", "2.5").peer_timeout == 2.5
    assert (
        "ours-noliveness"
        in parse_bench("--contenders", "ours", "ours-noliveness").contenders
    )


def test_help_says_what_is_measured(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for phrase in (
        "perf_counter_ns",
        "always uses the libuv",
        "reference",
        "--peer-timeout",
    ):
        assert phrase in text


# --- fair interleaving -------------------------------------------------------------


@pytest.mark.parametrize(
    "contenders", [("ours", "torch"), ("ours", "reference", "torch", "native")]
)
def test_each_contender_runs_once_in_each_position(contenders):
    rounds = 2 * len(contenders)
    blocks = schedule(contenders, rounds, last="floor")
    assert [b.index for b in blocks] == list(range(len(blocks)))
    per_round = [[b.kind for b in blocks if b.round == r] for r in range(rounds)]
    for kinds in per_round:
        assert sorted(kinds[:-1]) == sorted(contenders) and kinds[-1] == "floor"
    positions = Counter(
        (kind, kinds.index(kind)) for kinds in per_round for kind in kinds[:-1]
    )
    assert set(positions.values()) == {2}
    # Two contenders alternate: ours, torch, then torch, ours.
    assert schedule(["ours", "torch"], 2)[2].kind == "torch"


# --- the real bench, small ------------------------------------------------------------


@pytest.mark.parametrize("ranks", ["processes", "threads"])
def test_bench_end_to_end_json_and_plot(ranks, tmp_path):
    out, png, marker = tmp_path / "out.json", tmp_path / "out.png", uuid.uuid4().hex
    iters, rounds = 10, 4
    result = run_cli("bench", "--world-size", "2", "3", "--iters", str(iters), "--rounds",
                     str(rounds), "--warmup", "1", "--ranks", ranks, "--json", str(out),
                     "--plot", str(png), marker=marker)  # fmt: skip
    assert result.returncode == 0, result.stderr
    import torch

    assert f"torch {torch.__version__}" in result.stdout.splitlines()[0]
    for header in (
        "ours med",
        "ref p99",
        "ours/ref",
        "torch/ours",
        "where the time goes",
    ):
        assert header in result.stdout
    document = json.loads(out.read_text())
    assert document["versions"]["torch"] == torch.__version__
    assert document["config"]["ranks"] == ranks
    assert [w["world_size"] for w in document["worlds"]] == [2, 3]
    world = document["worlds"][1]
    summary = world["summary"]
    for name in ("ours", "reference", "torch", "native", "floor", "host_floor"):
        assert 0 < summary[name]["median_us"] <= summary[name]["p99_us"], name
    for name in ("ours", "reference", "torch", "native"):
        assert summary[name]["samples"] == 3 * iters * rounds, name
        assert summary[f"{name}_cost"]["server_us"] > 0, name
    assert summary["ours_over_reference"] == pytest.approx(
        summary["ours"]["median_us"] / summary["reference"]["median_us"]
    )
    assert summary["torch_over_ours"] > 0 and summary["ours_over_floor"] > 0
    assert [r["ours_uses_libuv"] for r in world["ranks"]] == [True] * 3
    # Every rank's raw samples of every block are kept, in schedule order.
    kinds = [b["kind"] for b in world["blocks"]]
    assert Counter(kinds) == {"ours": rounds, "reference": rounds, "torch": rounds,
                              "native": rounds, "floor": rounds}  # fmt: skip
    assert all(len(r["samples_ns"]) == iters for b in world["blocks"] if b["kind"] != "floor"
               for r in b["ranks"])  # fmt: skip
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert_no_process_left(marker)


def test_bench_threads_over_processes(tmp_path):
    out = tmp_path / "out.json"
    result = run_cli("bench", "--ranks", "threads", "--processes", "2", "--world-size", "4",
                     "--iters", "5", "--rounds", "1", "--contenders", "ours", "reference",
                     "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "at most 2 process(es)" in result.stdout
    (world,) = json.loads(out.read_text())["worlds"]
    # One rank of each process reads its process's CPU time: ranks 0 and 2.
    first_block = world["blocks"][0]["ranks"]
    assert [r["process_cpu_ns"] is not None for r in first_block] == [
        True,
        False,
        True,
        False,
    ]


def test_bench_tree_contenders_tell_the_root_store_apart(tmp_path):
    out = tmp_path / "out.json"
    result = run_cli("bench", "--ranks", "threads", "--processes", "2", "--world-size", "4",
                     "--iters", "3", "--rounds", "1", "--warmup", "1", "--ranks-per-host", "2",
                     "--fan-in", "2", "--contenders", "ours", "tree", "native-tree",
                     "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "trees: 2 ranks a host, fan-in 2" in result.stdout
    assert "root req" in result.stdout
    (world,) = json.loads(out.read_text())["worlds"]
    summary = world["summary"]
    # Two hosts of two: a store each (ranks 0 and 2 host them), and the root.
    levels = {c: summary[f"{c}_levels"] for c in ("ours", "tree", "native-tree")}
    assert levels == {"ours": 1, "tree": 2, "native-tree": 2}
    for name, stores in (("ours", 1), ("tree", 3), ("native-tree", 3)):
        cost = summary[f"{name}_cost"]
        assert cost["stores"] == stores, name
        # Found by its port: the root's thread, not all of rank 0's stores.
        assert cost["root_by_port"] is True, name
        assert 0 < cost["server_us"], name
        assert 0 < cost["stores_max_us"] <= cost["stores_sum_us"], name
    # Each host store: both members' barrier and wait, the leader's worker's
    # barrier and its `out`.
    below = 2 * (2 * 2 + 2)
    assert summary["tree_requests"] == {"root": 6, "all": 6 + below}
    assert summary["native-tree_requests"] == {"root": 2, "all": 2 + below}
    assert summary["ours_requests"] == {"root": 12, "all": 12}


def test_bench_split_phase(tmp_path):
    out = tmp_path / "out.json"
    result = run_cli("bench", "--split-phase", "--busy-thread", "--work-us", "50",
                     "--world-size", "2", "--iters", "5", "--rounds", "1", "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "split med" in result.stdout
    summary = json.loads(out.read_text())["worlds"][0]["summary"]
    for part in ("work", "split", "serial", "torch_serial"):
        assert summary[part]["samples"] == 2 * 5, part
    assert 0 <= summary["released_at_wait"] <= 1 and summary["arrive_median_us"] > 0


def test_bench_overrunning_its_timeout_exits_1_and_kills_every_rank():
    marker = uuid.uuid4().hex
    result = run_cli("bench", "--world-size", "3", "--iters", "1000000", "--rounds", "1",
                     "--contenders", "ours", "--timeout", "5", marker=marker)  # fmt: skip
    assert result.returncode == 1
    assert "overran --timeout" in result.stderr
    assert_no_process_left(marker)


# While starting: its forkserver is up, importing torch, and no rank has a pid.
@pytest.mark.parametrize("running_processes", [2, 4], ids=["starting", "running"])
def test_bench_ctrl_c_exits_130_and_kills_every_rank(running_processes):
    marker = uuid.uuid4().hex
    env = {**os.environ, "TCPSTORE_BENCH_TEST_MARKER": marker}
    # SIGINT handled as in a terminal's foreground job, even if these tests run
    # in a background one (which ignores it, and so would the bench).
    process = subprocess.Popen(
        [sys.executable, "-m", "tcpstore_barrier", "bench", "--world-size", "2", "--iters",
         "1000000", "--contenders", "ours"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    # Running: the bench, its forkserver and two ranks, for a second.
    deadline = time.monotonic() + 120
    try:
        while len(processes_with(marker)) < running_processes:
            assert time.monotonic() < deadline, "the bench never started its processes"
            time.sleep(0.05)
        time.sleep(1 if running_processes == 4 else 0)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()  # a no-op once it has exited
    assert process.returncode == 130, err
    assert err == "interrupted\n"
    assert_no_process_left(marker)


def test_bench_memory_end_to_end(tmp_path):
    out, marker = tmp_path / "out.json", uuid.uuid4().hex
    result = run_cli("bench-memory", "--objects", "4", "--barriers", "60", "--sample-every",
                     "20", "--torch-barriers", "30", "--torch-sample-every", "10",
                     "--json", str(out), marker=marker)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "RSS per object" in result.stdout
    document = json.loads(out.read_text())
    ours, torch_objects = document["objects"]
    # Two connections (the caller's and the worker's) and the liveness alarm.
    assert ours["fds_per_object"] == 3 and torch_objects["fds_per_object"] == 1
    assert ours["threads_per_object_after_round"] == 1
    assert torch_objects["rss_per_object_after_round"] is None
    ours_store, torch_store = document["stores"]
    assert [s["barriers"] for s in ours_store["samples"]] == [1, 20, 40, 60]
    # Finished rounds wait for a quiet moment (or 1024 rounds) to be deleted.
    assert max(s["keys"] for s in ours_store["samples"]) <= 2 * 60 + 30
    torch_keys = [s["keys"] for s in torch_store["samples"]]
    # torch's class keeps 2 keys a round (give or take the peer's next round).
    assert abs(torch_keys[-1] - torch_keys[0] - 2 * (30 - 1)) <= 2
    assert_no_process_left(marker)


def test_bench_import_end_to_end(tmp_path):
    out = tmp_path / "out.json"
    result = run_cli("bench-import", "--runs", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "import tcpstore_barrier after import torch: median" in result.stdout
    document = json.loads(out.read_text())
    assert len(document["package_secs"]) == 1
    assert 0 < document["package_median_ms"] < 10_000
    assert any(m[0] == "tcpstore_barrier" for m in document["slowest"])


def test_importtime_breakdown_keeps_what_comes_after_torch():
    stderr = ("import time: self [us] | cumulative | imported package\n"
              "import time:      5000 |     900000 | torch\n"
              "import time:       700 |        700 |   tcpstore_barrier._C\n"
              "import time:       300 |       1500 | tcpstore_barrier\n")  # fmt: skip
    assert parse_importtime(stderr) == [("tcpstore_barrier._C", 700, 700),
                                        ("tcpstore_barrier", 300, 1500)]  # fmt: skip


def test_version_and_info(capsys):
    import torch

    import tcpstore_barrier

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"built with torch {tcpstore_barrier.built_with_torch}" in out
    assert f"running torch {torch.__version__}" in out
