"""The ``bench-memory`` command line and the configuration it parses into."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .argtypes import _positive_int, _positive_seconds, describe

DESCRIPTION = """\
Two measurements, each in fresh forkserver processes (torch preloaded):

- objects: the resident memory of one barrier object. One process ("the
  measurer") constructs ``--objects`` barriers as ranks 1..N of one world of
  N+1 ranks whose rank 0 runs in another process ("the host"), which hosts
  the store. Every object is then a real joined rank with its own store
  connection, as in a trainer, without N ports or N servers; the host's
  server is kept out of the measurer's RSS, and the measurer reads the
  host's RSS at the same moments as its own. The per-object figures are
  slopes between a tenth of the objects and all of them, so that one-time
  costs (first connection, lazily loaded code) do not count: of RSS, and of
  the bytes malloc has handed out (glibc's mallinfo2), which sees small C++
  objects that RSS, page by page, may not. Ours is also measured after one
  round, which gives each object its watcher thread and second connection:
  all N arrive(), then all wait(), from one thread. Also counted: open file
  descriptors and threads per object.
- store: rank 0 (which hosts the store) of a world of 2 runs ``--barriers``
  barriers in a tight loop and samples its RSS and ``store.num_keys()``
  every ``--sample-every``; then torch's class the same for
  ``--torch-barriers``, whose keys grow by 2 a round."""


@dataclass(frozen=True)
class MemoryConfig:
    """What one ``bench-memory`` run measures."""

    objects: int = 200
    barriers: int = 100_000
    sample_every: int = 10_000
    torch_barriers: int = 10_000
    torch_sample_every: int = 1_000
    include_torch: bool = True
    only: str | None = None
    backend: str = "libuv"
    protocol: str = "torch"
    timeout_secs: float = 600.0
    json_path: str | None = None

    @property
    def use_libuv(self) -> bool:
        return self.backend == "libuv"

    def implementations(self) -> list[str]:
        return ["ours", "torch"] if self.include_torch else ["ours"]


# fmt: off
def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench-memory`` options, description and epilog."""
    defaults = MemoryConfig()
    describe(
        parser,
        DESCRIPTION,
        "Example: python -m tcpstore_barrier bench-memory --objects 200 "
        "--barriers 100000",
    )
    add = parser.add_argument
    add("--objects", type=_positive_int, default=defaults.objects,
        help=f"barrier objects the measurer constructs (default: {defaults.objects})")
    add("--barriers", type=_positive_int, default=defaults.barriers,
        help=f"barriers of ours in the store run (default: {defaults.barriers})")
    add("--sample-every", type=_positive_int, default=defaults.sample_every,
        help=f"barriers between samples of ours (default: {defaults.sample_every})")
    add("--torch-barriers", type=_positive_int, default=defaults.torch_barriers,
        help=f"barriers of torch's class in the store run "
        f"(default: {defaults.torch_barriers})")
    add("--torch-sample-every", type=_positive_int,
        default=defaults.torch_sample_every,
        help="barriers between samples of torch's class "
        f"(default: {defaults.torch_sample_every})")
    add("--only", choices=["objects", "store"],
        help="run one of the two measurements (default: both)")
    add("--no-torch", dest="include_torch", action="store_false",
        help="measure ours only")
    add("--backend", choices=["libuv", "legacy"], default=defaults.backend,
        help="TCPStore backend of both (default: libuv)")
    add("--protocol", choices=["torch", "native"], default=defaults.protocol,
        help="key protocol of ours (default: torch)")
    add("--timeout", dest="timeout_secs", type=_positive_seconds, metavar="SECS",
        default=defaults.timeout_secs,
        help=f"give up after this long in all (default: {defaults.timeout_secs:g})")
    add("--json", dest="json_path", metavar="FILE",
        help="write the configuration and every reading here")
# fmt: on


def memory_config_from_args(args: argparse.Namespace) -> MemoryConfig:
    """The :class:`MemoryConfig` that parsed ``bench-memory`` options describe."""
    return MemoryConfig(
        objects=args.objects,
        barriers=args.barriers,
        sample_every=args.sample_every,
        torch_barriers=args.torch_barriers,
        torch_sample_every=args.torch_sample_every,
        include_torch=args.include_torch,
        only=args.only,
        backend=args.backend,
        protocol=args.protocol,
        timeout_secs=args.timeout_secs,
        json_path=args.json_path,
    )
