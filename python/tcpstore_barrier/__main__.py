"""``python -m tcpstore_barrier`` (or ``tcpstore-barrier``): bench and info."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

import tcpstore_barrier

from . import bench
from ._bench import importtime, memory


def _info(args: argparse.Namespace) -> int:
    print(f"tcpstore_barrier {tcpstore_barrier.__version__}")
    print(f"built with torch {tcpstore_barrier.built_with_torch}")
    print(f"running torch {torch.__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="tcpstore-barrier",
        description="A native TCPStore barrier for PyTorch distributed checkpointing.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {tcpstore_barrier.__version__}",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench_parser = commands.add_parser(
        "bench", help="measure barrier latency against torch's TCPStoreBarrier"
    )
    bench.add_bench_arguments(bench_parser)
    bench_parser.set_defaults(run=bench.main)
    memory_parser = commands.add_parser(
        "bench-memory",
        help="measure memory per barrier object and the store's over many barriers",
    )
    memory.add_memory_arguments(memory_parser)
    memory_parser.set_defaults(run=memory.main)
    import_parser = commands.add_parser(
        "bench-import", help="measure `import tcpstore_barrier` after `import torch`"
    )
    importtime.add_import_arguments(import_parser)
    import_parser.set_defaults(run=importtime.main)
    info_parser = commands.add_parser(
        "info", help="print our version and the torch versions built with and running"
    )
    info_parser.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), run the subcommand."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
