"""``bench-import``: how long ``import tcpstore_barrier`` takes after torch.

Each of --runs fresh interpreters imports torch, then times ``import
tcpstore_barrier``: what a program that uses torch pays for this package.
The median is reported, with ``import torch`` alone for scale; one more run
under ``python -X importtime`` lists the modules slowest by themselves.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from statistics import median

from .cli import _positive_int, describe
from .launch import BenchError, run_command, write_json

# Prints the two durations in seconds, torch's first.
_TIMING_SCRIPT = """\
import time
start = time.perf_counter()
import torch
middle = time.perf_counter()
import tcpstore_barrier
print(middle - start, time.perf_counter() - middle)
"""


def parse_importtime(stderr: str, after: str = "torch") -> list[tuple[str, int, int]]:
    """``(module, self_us, cumulative_us)`` of every module ``-X importtime``
    reports after the top-level import of ``after`` has finished."""
    modules, seen_after = [], False
    for line in stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # not a timing, or the header
        if seen_after:
            modules.append((parts[2].strip(), int(parts[0]), int(parts[1])))
        # Top-level imports have no indentation beyond the one space.
        seen_after = seen_after or parts[2] == " " + after
    return modules


def _run(*argv: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                              timeout=300, check=True)  # fmt: skip
    except subprocess.SubprocessError as e:
        detail = getattr(e, "stderr", "") or ""
        raise BenchError(f"timing the import failed: {e}\n{detail}") from None


def print_imports(runs: int, json_path: str | None) -> None:
    """Time ``runs`` fresh imports of torch and of this package after it, and
    list the slowest modules of one ``-X importtime`` run; print, write JSON."""
    timings = [_run("-c", _TIMING_SCRIPT).stdout.split() for _ in range(runs)]
    torch_secs, package_secs = ([float(t[i]) for t in timings] for i in (0, 1))
    breakdown = _run("-X", "importtime", "-c", "import torch; import tcpstore_barrier")
    modules = parse_importtime(breakdown.stderr)
    slowest = sorted(modules, key=lambda m: m[1], reverse=True)[:8]
    ms, torch_ms = [s * 1000 for s in package_secs], median(torch_secs) * 1000
    package_ms = median(ms)
    print(
        f"import tcpstore_barrier after import torch: median {package_ms:.1f} ms of "
        f"{runs} fresh runs (min {min(ms):.1f}, max {max(ms):.1f})\n"
        f"import torch alone: median {torch_ms:.1f} ms\n\n"
        "slowest modules of one -X importtime run after torch (self us, cumulative us):"
    )
    for module, self_us, cumulative_us in slowest:
        print(f"  {self_us:>8}  {cumulative_us:>8}  {module}")
    timing = {
        "torch_secs": torch_secs,
        "package_secs": package_secs,
        "slowest": slowest,
        "package_median_ms": package_ms,
        "torch_median_ms": torch_ms,
    }
    write_json(json_path, timing)


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench-import`` options and description."""
    describe(parser, __doc__.split("\n", 1)[1].strip())
    parser.add_argument("--runs", type=_positive_int, default=5,
                        help="fresh interpreters to time (default: 5)")  # fmt: skip
    parser.add_argument(
        "--json", dest="json_path", metavar="FILE", help="write every timing here"
    )


def main(args: argparse.Namespace) -> int:
    """Run ``bench-import``; return the exit code."""
    return run_command(lambda: print_imports(args.runs, args.json_path))
