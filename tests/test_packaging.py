"""What the installed package offers beyond the barrier: version guard, C++ package."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tcpstore_barrier
from tcpstore_barrier._compat import check_torch_version

PACKAGE_DIR = Path(tcpstore_barrier.__file__).resolve().parent
TORCH_MINOR = ".".join(torch.__version__.split(".")[:2])


def test_a_torch_of_another_minor_version_is_a_clear_import_error():
    with pytest.raises(
        ImportError, match=r"built against torch 2\.13\.0 but torch 2\.14\.0"
    ) as caught:
        check_torch_version("2.13.0", "2.14.0+cpu")
    assert "wheel built for torch 2.14 (from the wheels' torch-2.14 folder" in str(
        caught.value
    )


@pytest.fixture
def package_copy(tmp_path):
    """A copy of the installed package in a directory of its own, to break."""
    if not list(PACKAGE_DIR.glob("_C*.so")):
        pytest.skip(f"{PACKAGE_DIR} holds no extension (an editable install?)")
    site = tmp_path / "site"
    shutil.copytree(PACKAGE_DIR, site / "tcpstore_barrier", symlinks=True)
    return site


def import_from(site):
    """`import tcpstore_barrier` from `site` in a new interpreter."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import tcpstore_barrier; print(tcpstore_barrier.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=site,
        env={**os.environ, "PYTHONPATH": str(site)},
    )


def import_error(site):
    proc = import_from(site)
    assert proc.returncode != 0, proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: "), proc.stderr
    return last.removeprefix("ImportError: ")


def assert_names_torches_and_fix(message, built_with):
    assert f"built against torch {built_with}" in message, message
    assert f"torch found is {torch.__version__} at " in message, message
    assert (
        f"install the tcpstore-barrier wheel built for torch {TORCH_MINOR} (from "
        f"the wheels' torch-{TORCH_MINOR} folder: `pip install --force-reinstall "
        f"--no-deps --find-links <torch-{TORCH_MINOR} folder> tcpstore-barrier`), "
        "or build it from source against this torch"
    ) in message, message


def test_an_intact_copy_imports_from_where_it_is(package_copy):
    proc = import_from(package_copy)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).parent == package_copy / "tcpstore_barrier"


def test_a_package_built_against_another_torch_minor_says_so_on_import(
    package_copy,
):
    build_info = package_copy / "tcpstore_barrier" / "_build_info.py"
    text = build_info.read_text()
    assert f'built_with_torch = "{tcpstore_barrier.built_with_torch}"' in text
    build_info.write_text(text.replace(tcpstore_barrier.built_with_torch, "2.12.0"))
    message = import_error(package_copy)
    assert message.startswith(
        f"tcpstore_barrier was built against torch 2.12.0 but torch "
        f"{torch.__version__} is installed; install the tcpstore-barrier wheel "
        f"built for torch {TORCH_MINOR}"
    ), message


def undefined_symbols(elf):
    """(name, offset of the name in the file) of each undefined dynamic
    symbol of a 64-bit little-endian ELF file's bytes."""
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize)
        for i in range(shnum)
    ]
    SHT_DYNSYM = 11
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != SHT_DYNSYM:
            continue
        strtab = sections[link][4]
        for entry in range(offset, offset + size, entsize):
            name, _, _, shndx = struct.unpack_from("<IBBH", elf, entry)
            if name and shndx == 0:  # SHN_UNDEF
                start = strtab + name
                yield elf[start : elf.index(b"\0", start)].decode(), start


def test_an_undefined_symbol_is_named_with_both_torches_and_the_fix(package_copy):
    # What a torch of another build or release does to an extension: a
    # symbol it needs from torch is not there. Here one of c10's, renamed.
    (extension,) = (package_copy / "tcpstore_barrier").glob("_C*.so")
    elf = bytearray(extension.read_bytes())
    name, start = next(
        (name, start)
        for name, start in undefined_symbols(elf)
        # Not the tail of a longer name (the linker shares tails).
        if "3c10" in name and "tcpstore_barrier" not in name and elf[start - 1] == 0
    )
    elf[start] = ord("X")
    extension.write_bytes(elf)
    message = import_error(package_copy)
    assert message.startswith("tcpstore_barrier's C++ extension failed to load ("), (
        message
    )
    assert f"undefined symbol: X{name[1:]}" in message, message
    assert_names_torches_and_fix(message, tcpstore_barrier.built_with_torch)


def test_a_missing_library_is_named_with_both_torches_and_the_fix(package_copy):
    for library in (package_copy / "tcpstore_barrier" / "lib").glob(
        "libtcpstore_barrier.so*"
    ):
        library.unlink()
    message = import_error(package_copy)
    assert re.search(
        r"libtcpstore_barrier\.so\.\d+: cannot open shared object file", message
    ), message
    assert_names_torches_and_fix(message, tcpstore_barrier.built_with_torch)


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
        f"but {other_torch} holds torch 2.99; install the tcpstore-barrier wheel "
        "built for torch 2.99 (from the wheels' torch-2.99 folder)"
    ) in message
