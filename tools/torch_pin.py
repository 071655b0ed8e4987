"""The wheel's torch requirement, generated from the torch it is built against.

A scikit-build-core metadata provider (pyproject.toml's
``[tool.scikit-build.metadata.dependencies]``): the extension and the C++
library use torch's C++ ABI, which changes between minor releases, so a
wheel built against torch 2.13.x requires ``torch>=2.13.0,<2.14``. It is
never written by hand: the build reads the torch installed in the build's
environment (hence ``--no-build-isolation``), the same one CMake compiles
against.

Also a script: ``python tools/torch_pin.py [VERSION]`` prints the pin for
VERSION (default: the installed torch).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Mapping
from typing import Any

_RELEASE = re.compile(r"^(\d+)\.(\d+)(?:\.\d+)*(?P<pre>(?:a|b|rc|\.dev)\d*)?")


def torch_requirement(torch_version: str) -> str:
    """``torch>=X.Y.0,<X.(Y+1)`` for a torch X.Y.*: its minor release.

    A local label (``+cpu``, ``+cu128``) is dropped: one wheel serves torch's
    CPU and CUDA builds of a version. A pre-release or nightly of X.Y is
    admitted by ``>=X.Y.0.dev0``.
    """
    match = _RELEASE.match(torch_version.split("+")[0])
    if match is None:
        raise ValueError(f"cannot read torch's version {torch_version!r}")
    major, minor = int(match[1]), int(match[2])
    lower = f"{major}.{minor}.0" + (".dev0" if match["pre"] else "")
    return f"torch>={lower},<{major}.{minor + 1}"


def installed_torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "tcpstore-barrier is built against the torch installed in the build's "
            "environment, and there is none: install torch first, then build with "
            "`pip install --no-build-isolation .` (or `./dev wheel`) so that the "
            "build sees it"
        ) from None


def dynamic_metadata(
    field: str,
    settings: Mapping[str, Any] | None = None,
    project: Mapping[str, Any] | None = None,
) -> list[str]:
    if field != "dependencies":
        raise RuntimeError(f"tools/torch_pin.py provides 'dependencies', not {field!r}")
    if settings:
        raise RuntimeError(
            f"tools/torch_pin.py takes no settings, got {dict(settings)}"
        )
    return [torch_requirement(installed_torch_version())]


if __name__ == "__main__":
    print(
        torch_requirement(
            sys.argv[1] if len(sys.argv) > 1 else installed_torch_version()
        )
    )
