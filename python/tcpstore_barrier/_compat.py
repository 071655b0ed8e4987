"""Fails clearly when the installed torch is not the one we were built with,
and when the extension does not load for any other reason."""

from __future__ import annotations

import importlib
import os


def _minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def _fix(running: str) -> str:
    minor = ".".join(map(str, _minor(running)))
    return (
        f"install the tcpstore-barrier wheel built for torch {minor} (from the "
        f"wheels' torch-{minor} folder: `pip install --force-reinstall --no-deps "
        f"--find-links <torch-{minor} folder> tcpstore-barrier`), or build it from "
        "source against this torch (`pip install --no-build-isolation "
        "--force-reinstall --no-deps <tcpstore-barrier source>`)"
    )


def check_torch_version(built_with: str, running: str) -> None:
    """Raises ImportError unless both versions share major and minor.

    A C++ extension uses torch's C++ ABI, which changes between minor
    releases; importing across them fails with an undefined symbol or, worse,
    crashes later.
    """
    if _minor(built_with) != _minor(running):
        raise ImportError(
            f"tcpstore_barrier was built against torch {built_with} but torch "
            f"{running} is installed; {_fix(running)}"
        )


def load_extension(package: str, built_with: str, running: str, torch_dir: str) -> None:
    """Imports ``package._C``; a loader error (an undefined symbol, a library
    not found) becomes an ImportError that names the torch we were built
    against, the torch found and the fix, with the loader's words kept."""
    try:
        importlib.import_module(f"{package}._C")
    except ImportError as e:
        raise ImportError(
            f"tcpstore_barrier's C++ extension failed to load ({e}). It was built "
            f"against torch {built_with}, and the torch found is {running} at "
            f"{torch_dir}{os.sep}: the extension and its library need exactly the "
            "torch build they were compiled against, and their own files intact. "
            f"To fix it, {_fix(running)}"
        ) from e
