"""The Python face of the native barrier: torch's constructor, logging, docs."""

from __future__ import annotations

import logging
from datetime import timedelta

import torch.distributed as dist

from . import _C

logger = logging.getLogger(__package__)

_execute_barrier = _C.TCPStoreBarrier.execute_barrier


class TCPStoreBarrier(_C.TCPStoreBarrier):
    """A barrier over a ``TCPStore``, run in C++ without the GIL.

    A drop-in for
    ``torch.distributed.checkpoint._experimental.barriers.TCPStoreBarrier``:
    same arguments in the same order, same store keys, so that its ranks and
    ours can share one barrier. Unlike torch's class it honours
    ``use_checkpoint_barrier_tcpstore_libuv`` and ``timeout_secs``, raises
    :class:`~tcpstore_barrier.BarrierTimeoutError` naming the missing ranks,
    and lets Ctrl-C through while it waits.

    Rank 0 hosts the store on ``master_address:tcpstore_port`` (listening on
    that address only) and waits in the constructor, up to
    ``timeout_barrier_init_secs``, for every rank to connect.

    Args:
        global_rank: this rank, in ``[0, global_world_size)``.
        global_world_size: the number of ranks in the barrier.
        barrier_prefix: prefix of the store keys of each round.
        timeout_barrier_init_secs: seconds to wait for the store and the ranks.
        use_checkpoint_barrier_tcpstore_libuv: libuv (True) or the legacy
            server backend (False) for the store rank 0 hosts.
        tcpstore_port: the store's port, 1..65535.
        master_address: the host of rank 0.
        timeout_secs: seconds a round may take; an int or a float.
        protocol: ``"torch"`` (default) speaks torch's keys, so torch's ranks
            can join; ``"native"`` uses the store's server-side barrier, one
            round trip per rank, for fleets made only of this library's ranks.
        peer_timeout_secs: how long a peer of this library, or the store
            host, may stay silent before a waiting rank raises
            :class:`~tcpstore_barrier.PeerLostError` (default 5 s, as torch
            elastic's heartbeat); ``None`` turns liveness off.
        topology: ``"flat"``: every rank counts itself in at rank 0's store;
            ``"tree"``: ranks meet at a store on their host, hosts' leaders in
            groups of at most ``tree_fan_in`` at a store one of them hosts, up
            to rank 0's store, so that no store's load grows with the world;
            ``"auto"`` (default): flat below 1,024 ranks, a tree from there on.
        host: which ranks share a host store in a tree; by default the
            host's name and the address it reaches rank 0's store from.
        tree_fan_in: the most members a tree's group store has (default 8).
    """

    #: The name under which torch's ``create_barrier_from_config`` finds it.
    barrier_type = "tcp_store_native"

    def __init__(
        self,
        global_rank: int,
        global_world_size: int,
        barrier_prefix: str,
        timeout_barrier_init_secs: float,
        use_checkpoint_barrier_tcpstore_libuv: bool,
        tcpstore_port: int,
        master_address: str,
        timeout_secs: float,
        *,
        protocol: str = "torch",
        peer_timeout_secs: float | None = 5.0,
        topology: str = "auto",
        host: str | None = None,
        tree_fan_in: int = 8,
    ) -> None:
        logger.info(
            "Initializing TCPStoreBarrier master_address=%s tcpstore_port=%s "
            "rank=%s world_size=%s barrier_prefix=%s timeout_barrier_init_secs=%s "
            "use_checkpoint_barrier_tcpstore_libuv=%s timeout_secs=%s protocol=%s "
            "peer_timeout_secs=%s topology=%s host=%s",
            master_address,
            tcpstore_port,
            global_rank,
            global_world_size,
            barrier_prefix,
            timeout_barrier_init_secs,
            use_checkpoint_barrier_tcpstore_libuv,
            timeout_secs,
            protocol,
            peer_timeout_secs,
            topology,
            host,
        )
        super().__init__(
            global_rank,
            global_world_size,
            barrier_prefix,
            _seconds(timeout_barrier_init_secs),
            use_checkpoint_barrier_tcpstore_libuv,
            tcpstore_port,
            master_address,
            _seconds(timeout_secs),
            protocol=protocol,
            peer_timeout_secs=_seconds(peer_timeout_secs),
            topology=topology,
            host=host,
            tree_fan_in=tree_fan_in,
        )

    @classmethod
    def from_store(
        cls,
        store: dist.Store,
        global_rank: int,
        global_world_size: int,
        barrier_prefix: str,
        timeout_secs: float = 300,
        *,
        protocol: str = "torch",
        peer_timeout_secs: float | None = 5.0,
        topology: str = "auto",
        host: str | None = None,
        tree_fan_in: int = 8,
    ) -> TCPStoreBarrier:
        """Joins barriers over a store the program already has.

        Any ``torch.distributed.Store`` will do (the default process group's,
        a ``PrefixStore``, a ``TCPStore``): no second port is opened and the
        store is left open by :meth:`close`. A tree (``topology``) needs a
        ``TCPStore`` whose every rank is of this library.
        """
        logger.info(
            "Initializing TCPStoreBarrier from %s rank=%s world_size=%s "
            "barrier_prefix=%s timeout_secs=%s protocol=%s peer_timeout_secs=%s",
            type(store).__name__,
            global_rank,
            global_world_size,
            barrier_prefix,
            timeout_secs,
            protocol,
            peer_timeout_secs,
        )
        barrier = cls.__new__(cls)
        _C.TCPStoreBarrier.__init__(
            barrier,
            store,
            global_rank,
            global_world_size,
            barrier_prefix,
            _seconds(timeout_secs),
            protocol=protocol,
            peer_timeout_secs=_seconds(peer_timeout_secs),
            topology=topology,
            host=host,
            tree_fan_in=tree_fan_in,
        )
        return barrier

    def execute_barrier(self) -> None:
        """Returns once every rank has entered this round.

        Raises :class:`~tcpstore_barrier.BarrierTimeoutError` after
        ``timeout_secs``; the rank then stays entered, and the next call
        resumes waiting for the same round.
        """
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "Executing barrier barrier_prefix=%s sequence=%s timeout_secs=%s",
                self.barrier_prefix,
                self.sequence,
                self.timeout_secs,
            )
        _execute_barrier(self)


def _seconds(value):
    # torch's APIs take timedelta timeouts elsewhere; accept those too.
    return value.total_seconds() if isinstance(value, timedelta) else value
