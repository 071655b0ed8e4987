"""``bench-import``: how long ``import tcpstore_barrier`` takes after torch.

Each run is a fresh interpreter that imports torch, then times
``import tcpstore_barrier`` with ``time.perf_counter``: what a program that
already uses torch pays for this package (the extension, torch.distributed,
registering with torch's barrier registry). The median over ``--runs`` is
reported, with ``import torch`` alone for scale. One more run under
``python -X importtime`` lists the modules that took longest themselves.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass

from .argtypes import _positive_int, describe
from .stats import median

DESCRIPTION = __doc__.split("\n", 1)[1].strip() if __doc__ else ""

# Prints the two durations in seconds, torch's first.
_TIMING_SCRIPT = """\
import time
start = time.perf_counter()
import torch
middle = time.perf_counter()
import tcpstore_barrier
end = time.perf_counter()
print(middle - start, end - middle)
"""

_IMPORTTIME_SCRIPT = "import torch; import tcpstore_barrier"


@dataclass(frozen=True)
class ImportTiming:
    """Seconds of each run, and the modules that took longest (us, self)."""

    torch_secs: list[float]
    package_secs: list[float]
    slowest: list[tuple[str, int, int]]

    @property
    def package_median_ms(self) -> float:
        return median(self.package_secs) * 1000

    @property
    def torch_median_ms(self) -> float:
        return median(self.torch_secs) * 1000


def parse_timing(stdout: str) -> tuple[float, float]:
    """``(torch_secs, package_secs)`` from the timing script's output."""
    fields = stdout.split()
    if len(fields) != 2:
        raise ValueError(f"unexpected timing output: {stdout!r}")
    return float(fields[0]), float(fields[1])


def parse_importtime(stderr: str, after: str = "torch") -> list[tuple[str, int, int]]:
    """``(module, self_us, cumulative_us)`` of every module ``-X importtime``
    reports after the top-level import of ``after`` has finished."""
    modules: list[tuple[str, int, int]] = []
    seen_after = False
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3:
            continue
        self_text, cumulative_text, name = parts
        try:
            self_us, cumulative_us = int(self_text), int(cumulative_text)
        except ValueError:
            continue  # the header line
        # Top-level imports have no indentation beyond the one space.
        module = name.strip()
        if seen_after:
            modules.append((module, self_us, cumulative_us))
        elif module == after and name == " " + after:
            seen_after = True
    return modules


def time_imports(runs: int, python: str = sys.executable) -> ImportTiming:
    """Time ``runs`` fresh imports, plus one ``-X importtime`` breakdown."""
    torch_secs, package_secs = [], []
    for _ in range(runs):
        result = subprocess.run(
            [python, "-c", _TIMING_SCRIPT],
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        torch_s, package_s = parse_timing(result.stdout)
        torch_secs.append(torch_s)
        package_secs.append(package_s)
    breakdown = subprocess.run(
        [python, "-X", "importtime", "-c", _IMPORTTIME_SCRIPT],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    modules = parse_importtime(breakdown.stderr)
    slowest = sorted(modules, key=lambda m: m[1], reverse=True)[:8]
    return ImportTiming(torch_secs, package_secs, slowest)


def format_timing(timing: ImportTiming) -> str:
    runs = len(timing.package_secs)
    lines = [
        f"import tcpstore_barrier after import torch: median "
        f"{timing.package_median_ms:.1f} ms of {runs} fresh runs "
        f"(min {min(timing.package_secs) * 1000:.1f}, max "
        f"{max(timing.package_secs) * 1000:.1f})",
        f"import torch alone: median {timing.torch_median_ms:.1f} ms",
        "",
        "slowest modules of one -X importtime run after torch (self us, "
        "cumulative us):",
    ]
    for module, self_us, cumulative_us in timing.slowest:
        lines.append(f"  {self_us:>8}  {cumulative_us:>8}  {module}")
    return "\n".join(lines)


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench-import`` options and description."""
    describe(parser, DESCRIPTION)
    parser.add_argument(
        "--runs", type=_positive_int, default=5,
        help="fresh interpreters to time (default: 5)",
    )  # fmt: skip
    parser.add_argument(
        "--json", dest="json_path", metavar="FILE", help="write every timing here"
    )


def main(args: argparse.Namespace) -> int:
    """Run ``bench-import``; return the exit code."""
    try:
        timing = time_imports(args.runs)
    except (subprocess.SubprocessError, ValueError) as e:
        detail = getattr(e, "stderr", "") or ""
        print(f"error: timing the import failed: {e}\n{detail}", file=sys.stderr)
        return 1
    print(format_timing(timing))
    if args.json_path is not None:
        document = {
            **asdict(timing),
            "package_median_ms": timing.package_median_ms,
            "torch_median_ms": timing.torch_median_ms,
        }
        with open(args.json_path, "w") as f:
            json.dump(document, f)
        print(f"\nwrote {args.json_path}")
    return 0

