"""Checks a repaired wheel before anyone installs it: ``./dev wheel`` runs it.

    python tools/check_wheel.py [--quiet] WHEEL

Run with the interpreter of the environment the wheel was built in (its
torch is the one checked against). It fails, naming the file and what is
wrong, unless:

* the wheel holds no torch or CUDA library, nor any library auditwheel
  grafted: the extension and the C++ library need only torch's CPU
  libraries (libc10, libtorch_cpu, and for the extensions libtorch_python)
  and the C/C++ runtime, so one wheel serves torch's CPU and CUDA builds of
  one version;
* every RUNPATH is relative to the file ($ORIGIN) and finds every library
  the file needs that is not the C/C++ runtime, in the wheel or, with the
  wheel installed beside torch in site-packages, in torch's lib/;
* its metadata requires the torch minor it was built against
  (tools/torch_pin.py) and its version has no local label (which would sort
  one torch minor's wheel above another's).

It prints the wheel's size, platform tag and the highest GLIBC, GLIBCXX and
CXXABI symbol versions it needs (nothing with --quiet).
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import importlib.util
import io
import posixpath
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection
from packaging.requirements import Requirement
from packaging.utils import parse_wheel_filename
from packaging.version import Version
from torch_pin import torch_requirement

# The C and C++ runtime: what every manylinux policy lets a wheel take from
# the system.
RUNTIME = {
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "librt.so.1",
    "libpthread.so.0",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libgcc_s.so.1",
    "libstdc++.so.6",
}
# torch's CPU libraries, the only ones of torch's a file may need: the C++
# library links c10 and torch_cpu, the extensions also torch_python.
TORCH_CPU = {"libc10.so", "libtorch_cpu.so"}
TORCH_PYTHON = {"libtorch_python.so"}
# What must never be inside the wheel (auditwheel --exclude keeps the first
# four out; CUDA's must not be needed at all).
FORBIDDEN = [
    "libtorch*",
    "libc10*",
    "libgomp*",
    "libshm*",
    "libcaffe2*",
    "libcuda*",
    "libcudart*",
    "libcublas*",
    "libcudnn*",
    "libcufft*",
    "libcurand*",
    "libcusolver*",
    "libcusparse*",
    "libnccl*",
    "libnv*",
]


class CheckFailed(Exception):
    pass


def elf_facts(data: bytes) -> tuple[list[str], list[str], dict[str, set[str]]]:
    """NEEDED, RUNPATH (or RPATH) entries, and symbol versions needed by library."""
    elf = ELFFile(io.BytesIO(data))
    needed: list[str] = []
    runpath: list[str] = []
    versions: dict[str, set[str]] = {}
    for section in elf.iter_sections():
        if isinstance(section, DynamicSection):
            for tag in section.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    needed.append(tag.needed)
                elif tag.entry.d_tag == "DT_RUNPATH":
                    runpath += tag.runpath.split(":")
                elif tag.entry.d_tag == "DT_RPATH":
                    runpath += tag.rpath.split(":")
        elif isinstance(section, GNUVerNeedSection):
            for verneed, auxiliaries in section.iter_versions():
                versions.setdefault(verneed.name, set()).update(
                    aux.name for aux in auxiliaries
                )
    return needed, [entry for entry in runpath if entry], versions


def torch_lib_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise CheckFailed("no torch in this environment to check the wheel against")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def highest(versions: set[str], prefix: str) -> str | None:
    found = [v for v in versions if v.startswith(prefix + "_")]
    if not found:
        return None
    return max(found, key=lambda v: Version(v.split("_", 1)[1]))


def check(wheel: Path) -> list[str]:
    """Checks `wheel`; returns the report's lines, raises CheckFailed."""
    problems: list[str] = []
    name, version, _, tags = parse_wheel_filename(wheel.name)
    if version.local is not None:
        problems.append(
            f"version {version} has a local label: pip would sort one torch "
            "minor's wheel above another's; the torch minor goes in the "
            "requirement and the wheel's folder instead"
        )
    torch_version = importlib.metadata.version("torch")
    expected_pin = Requirement(torch_requirement(torch_version))
    torch_lib = torch_lib_dir()

    with zipfile.ZipFile(wheel) as archive:
        members = archive.namelist()
        metadata_name = next(m for m in members if m.endswith(".dist-info/METADATA"))
        metadata = HeaderParser().parsestr(archive.read(metadata_name).decode())
        torch_requirements = [
            Requirement(r)
            for r in metadata.get_all("Requires-Dist", [])
            if Requirement(r).name == "torch"
        ]
        if [(r.specifier, r.marker) for r in torch_requirements] != [
            (expected_pin.specifier, None)
        ]:
            problems.append(
                f"the metadata requires {[str(r) for r in torch_requirements]}, "
                f"built against torch {torch_version} it must require exactly "
                f"{expected_pin}"
            )

        for member in members:
            base = posixpath.basename(member)
            if any(fnmatch.fnmatch(base, pattern) for pattern in FORBIDDEN):
                problems.append(f"{member}: a torch or CUDA library inside the wheel")
            elif ".libs/" in member:
                problems.append(f"{member}: grafted by auditwheel; nothing should be")

        elf_lines: list[str] = []
        all_versions: set[str] = set()
        for member in members:
            data = archive.read(member)
            if not data.startswith(b"\x7fELF"):
                continue
            needed, runpath, versions = elf_facts(data)
            for names in versions.values():
                all_versions |= names
            is_extension = "/" not in member.removeprefix(name.replace("-", "_") + "/")
            allowed = RUNTIME | TORCH_CPU
            if is_extension:
                allowed |= TORCH_PYTHON
            here = posixpath.dirname(member)
            directories = []
            for entry in runpath:
                if not entry.startswith("$ORIGIN"):
                    problems.append(
                        f"{member}: RUNPATH entry {entry} is not relative to the "
                        "file ($ORIGIN): it names a directory of the build machine"
                    )
                    continue
                directories.append(
                    posixpath.normpath(
                        posixpath.join(here, entry.replace("$ORIGIN", ".", 1))
                    )
                )
            for library in needed:
                if library in RUNTIME:
                    continue
                in_wheel = any(
                    posixpath.join(d, library) in members for d in directories
                )
                in_torch = library in allowed and any(
                    d == "torch/lib" and (torch_lib / library).is_file()
                    for d in directories
                )
                if not in_wheel and library not in allowed:
                    problems.append(
                        f"{member} needs {library}, which is neither torch's CPU "
                        "libraries nor the C/C++ runtime nor in the wheel"
                    )
                elif not (in_wheel or in_torch):
                    problems.append(
                        f"{member} needs {library}, and its RUNPATH "
                        f"{':'.join(runpath) or '(none)'} finds it neither in the "
                        f"wheel nor in torch's {torch_lib}"
                    )
            elf_lines.append(
                f"  {member}: needs {' '.join(n for n in needed if n not in RUNTIME)}"
                f" + C/C++ runtime; RUNPATH {':'.join(runpath) or '(none)'}"
            )

    if problems:
        raise CheckFailed(
            f"{wheel.name} fails its checks:\n" + "\n".join(f"  {p}" for p in problems)
        )
    wanted = [
        v
        for v in (highest(all_versions, p) for p in ("GLIBC", "GLIBCXX", "CXXABI"))
        if v
    ]
    return [
        f"{wheel} ({wheel.stat().st_size / 1e6:.2f} MB), built against torch "
        f"{torch_version}",
        f"  platform tag: {', '.join(sorted(str(t.platform) for t in tags))}; "
        f"highest symbol versions needed: {', '.join(wanted)}",
        f"  requires {expected_pin}; version {version} (no local label)",
        *elf_lines,
        "  no torch or CUDA library inside, nothing grafted; RUNPATHs find "
        f"torch's libraries in {torch_lib}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--quiet", action="store_true", help="print only failures")
    args = parser.parse_args(argv)
    try:
        report = check(args.wheel)
    except CheckFailed as e:
        print(e, file=sys.stderr)
        return 1
    if not args.quiet:
        print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
