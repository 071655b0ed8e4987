"""The C++ side: the trainer example as a user builds it, and the ctest suite.

The example is configured against the installed package exactly as the
README says, so a broken CMake package fails here; it then shares barriers
with Python ranks of this library and of torch. The core's own C++ tests
(tests/cpp) are built from this source tree and run by ctest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import LOOPBACK
from support.barriers import assert_no_early_release, our_barrier, torch_barrier
from support.launch import run_ranks

ROOT = Path(__file__).resolve().parents[1]
JOBS = "2"


STEP_LINE = re.compile(r"^step (\d+) entered ([\d.]+) left ([\d.]+)$", re.MULTILINE)


def trainer_command(
    trainer, rank, world_size, port, iterations, checkpoint_dir, timeout=30
):
    return [
        str(trainer),
        "--rank", str(rank),
        "--world-size", str(world_size),
        "--port", str(port),
        "--iterations", str(iterations),
        "--master-address", LOOPBACK,
        "--timeout", str(timeout),
        "--init-timeout", "30",
        "--checkpoint-dir", str(checkpoint_dir),
    ]  # fmt: skip


def trainer_stamps(stdout):
    """The trainer's (entered, left) wall-clock times, one pair per step."""
    steps = [(int(s), float(e), float(x)) for s, e, x in STEP_LINE.findall(stdout)]
    assert [s for s, _, _ in steps] == list(range(len(steps))), stdout
    return [(e, left) for _, e, left in steps]


def run_checked(command, timeout, **kwargs):
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, command))} exited with {proc.returncode}\n"
        f"{proc.stdout[-20000:]}\n{proc.stderr[-20000:]}"
    )
    return proc


@pytest.fixture(scope="session")
def cmake():
    exe = shutil.which("cmake")
    if exe is None:
        pytest.skip("cmake is not installed (pip install cmake)")
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler (c++, g++ or $CXX) is installed")
    return exe


def cmake_build(cmake, source, build_dir, *options):
    run_checked([cmake, "-S", source, "-B", build_dir, *options], timeout=300)
    run_checked([cmake, "--build", build_dir, "-j", JOBS], timeout=900)


@pytest.fixture(scope="session")
def trainer(cmake, tmp_path_factory):
    """examples/cpp_trainer, built against the installed package."""
    import tcpstore_barrier

    build_dir = tmp_path_factory.mktemp("cpp_trainer")
    # What the README tells a user to pass: our prefix only. torch's own
    # CMake package is not consulted (with a CUDA build of torch it would
    # require a CUDA toolkit, which this machine does not have).
    cmake_build(
        cmake,
        ROOT / "examples" / "cpp_trainer",
        build_dir,
        f"-DCMAKE_PREFIX_PATH={tcpstore_barrier.cmake_prefix_path}",
    )
    return build_dir / "trainer"


@pytest.fixture(scope="session")
def ctest_build(cmake, tmp_path_factory):
    """This tree's core and tests/cpp, built with -DTCPSTORE_BARRIER_BUILD_TESTS=ON.
    A unity build: each source file parsing torch's headers again is most of
    the time, and the wheel's build still compiles every file on its own."""
    build_dir = tmp_path_factory.mktemp("ctest")
    cmake_build(
        cmake,
        ROOT,
        build_dir,
        "-DCMAKE_UNITY_BUILD=ON",
        "-DTCPSTORE_BARRIER_BUILD_TESTS=ON",
        "-DTCPSTORE_BARRIER_BUILD_PYTHON=OFF",
        f"-DPython_EXECUTABLE={sys.executable}",
    )
    return build_dir


def mixed_rank(rank, world_size, port, rounds, trainer, checkpoint_dir, keep_alive):
    """Rank 0: tcpstore_barrier, hosting the store; rank 1: the C++ trainer;
    other ranks: torch's TCPStoreBarrier. Returns (entered, left) per round."""
    if rank == 1:
        proc = subprocess.run(
            trainer_command(trainer, rank, world_size, port, rounds, checkpoint_dir),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, (
            f"trainer exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
        return trainer_stamps(proc.stdout)
    barrier = (our_barrier if rank == 0 else torch_barrier)(rank, world_size, port)
    # The host's store must outlive the trainer's last round and its
    # close(), and torch's ranks never close: the test drops it at the end.
    keep_alive.append(barrier)
    stamps = []
    for _ in range(rounds):
        entered = time.time()
        barrier.execute_barrier()
        stamps.append((entered, time.time()))
    return stamps


def test_cpp_trainer_shares_barriers_with_python_ranks(trainer, port, tmp_path):
    world_size, rounds, keep_alive = 3, 30, []
    stamps = run_ranks(
        mixed_rank, world_size, port, rounds, trainer, tmp_path, keep_alive,
        threads=True, timeout=120,
    )  # fmt: skip
    keep_alive.clear()
    assert [len(s) for s in stamps] == [rounds] * world_size
    # The trainer prints microseconds; allow for that rounding only.
    assert_no_early_release(stamps, resolution=1e-6)
    # Only the last step's shard is kept once every rank has written it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step{rounds - 1}-rank1.bin"]


def test_cpp_trainers_alone_checkpoint_and_close(trainer, port, tmp_path):
    world_size, rounds = 3, 20
    procs = [
        subprocess.Popen(
            trainer_command(trainer, rank, world_size, port, rounds, tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world_size)
    ]
    try:
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}\n{out}\n{err}"
        assert len(trainer_stamps(out)) == rounds
        assert f"rank {rank} of {world_size}: {rounds} checkpoint barriers" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"step{rounds - 1}-rank{r}.bin" for r in range(world_size)
    ]


def test_cpp_trainer_timeout_names_the_rank_that_never_came(trainer, port, tmp_path):
    proc = subprocess.Popen(
        trainer_command(trainer, 0, 2, port, 3, tmp_path, timeout=2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Rank 1 joins the store but never enters a barrier.
        absent = torch_barrier(1, 2, port)
        out, err = proc.communicate(timeout=60)
        del absent
    finally:
        proc.kill()
    assert proc.returncode == 1, f"{out}\n{err}"
    assert "checkpoint barrier of step 0 timed out; missing ranks: [1]" in err
    assert "step 0 entered" not in out


def test_cpp_trainer_rejects_a_rank_outside_the_world(trainer, port, tmp_path):
    proc = subprocess.run(
        trainer_command(trainer, 3, 3, port, 1, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "global_rank must be in [0, global_world_size=3), got 3" in proc.stderr


def test_python_example_keeps_only_the_last_complete_checkpoint(tmp_path):
    run_checked(
        [
            sys.executable,
            ROOT / "examples" / "python_trainer.py",
            "--world-size",
            "3",
            "--iterations",
            "3",
            "--checkpoint-dir",
            tmp_path,
        ],  # fmt: skip
        timeout=120,
    )
    shards = sorted(p.name for p in tmp_path.iterdir())
    assert shards == [f"step2-rank{r}.pt" for r in range(3)]


def test_ctest_cases_pass(cmake, ctest_build):
    ctest = Path(cmake).with_name("ctest")
    proc = run_checked(
        [ctest, "--test-dir", ctest_build, "--output-on-failure", "--no-tests=error"],
        timeout=900,
    )
    assert "100% tests passed" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sanitizers", ["address,undefined", "thread"])
def test_ctest_cases_pass_under_sanitizers(cmake, sanitizers, tmp_path):
    """Runs tests/cpp/run_sanitizers.sh, as CI may call it directly."""
    proc = run_checked(
        ["bash", ROOT / "tests" / "cpp" / "run_sanitizers.sh", sanitizers],
        timeout=1200,
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "SANITIZE_BUILD_ROOT": str(tmp_path),
        },
    )
    assert "100% tests passed" in proc.stdout
