"""What the installed package offers beyond the barrier: version guard, C++ package."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tcpstore_barrier
from tcpstore_barrier._compat import check_torch_version


def test_a_torch_of_another_minor_version_is_a_clear_import_error():
    with pytest.raises(ImportError, match=r"built against torch 2\.13\.0 but torch 2\.14\.0"):
        check_torch_version("2.13.0", "2.14.0+cpu")


def test_a_torch_of_the_same_minor_version_is_accepted():
    check_torch_version("2.13.0", "2.13.1+cpu")


def test_the_running_torch_is_the_one_we_were_built_with():
    assert tcpstore_barrier.built_with_torch.split(".")[:2] == torch.__version__.split(".")[:2]


def test_cmake_prefix_path_holds_the_cmake_package():
    config_dir = Path(tcpstore_barrier.cmake_prefix_path) / "tcpstore_barrier"
    assert (config_dir / "tcpstore_barrierConfig.cmake").is_file()
    assert (config_dir / "tcpstore_barrierConfigVersion.cmake").is_file()
