"""What the installed package offers beyond the barrier: version guard, C++ package."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import tcpstore_barrier
from tcpstore_barrier._compat import check_torch_version


def test_a_torch_of_another_minor_version_is_a_clear_import_error():
    with pytest.raises(
        ImportError, match=r"built against torch 2\.13\.0 but torch 2\.14\.0"
    ):
        check_torch_version("2.13.0", "2.14.0+cpu")


def test_a_torch_of_the_same_minor_version_is_accepted():
    check_torch_version("2.13.0", "2.13.1+cpu")


def test_the_running_torch_is_the_one_we_were_built_with():
    assert (
        tcpstore_barrier.built_with_torch.split(".")[:2]
        == torch.__version__.split(".")[:2]
    )


def test_cmake_prefix_path_holds_the_cmake_package():
    config_dir = Path(tcpstore_barrier.cmake_prefix_path) / "tcpstore_barrier"
    assert (config_dir / "tcpstore_barrierConfig.cmake").is_file()
    assert (config_dir / "tcpstore_barrierConfigVersion.cmake").is_file()


def test_the_cmake_package_refuses_a_torch_of_another_minor_version(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed (pip install cmake)")
    other_torch = tmp_path / "torch"
    other_torch.mkdir()
    (other_torch / "version.py").write_text("__version__ = '2.99.0+cpu'\n")
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    (consumer / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\n"
        "project(consumer LANGUAGES NONE)\n"
        "find_package(tcpstore_barrier CONFIG REQUIRED)\n"
    )
    proc = subprocess.run(
        [
            cmake,
            "-S",
            consumer,
            "-B",
            tmp_path / "build",
            f"-DCMAKE_PREFIX_PATH={tcpstore_barrier.cmake_prefix_path}",
            f"-DTCPSTORE_BARRIER_TORCH_PREFIX={other_torch}",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    message = " ".join(proc.stderr.split())
    assert (
        f"built against torch {tcpstore_barrier.built_with_torch} "
        f"but {other_torch} holds torch 2.99"
    ) in message
