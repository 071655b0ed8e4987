"""Exceptions raised by the native barrier."""

from __future__ import annotations

from torch.distributed import DistNetworkError, DistStoreError


class BarrierTimeoutError(DistStoreError):
    """A barrier round did not complete within ``timeout_secs``.

    A subclass of :class:`torch.distributed.DistStoreError`, so code written
    for torch's class keeps catching it. The rank stays entered in the round:
    calling ``execute_barrier()`` again resumes waiting for the same round.

    Attributes:
        missing_ranks: sorted ranks that had not entered this round.
        barrier_key: the store key the round is released by.
        sequence: the round's sequence number.
        timeout_secs: the time limit that ran out.
    """

    def __init__(
        self,
        message: str,
        missing_ranks: list[int],
        barrier_key: str,
        sequence: int,
        timeout_secs: float,
    ) -> None:
        super().__init__(message)
        self.missing_ranks = sorted(missing_ranks)
        self.barrier_key = barrier_key
        self.sequence = sequence
        self.timeout_secs = timeout_secs

    def __reduce__(self):
        return (
            type(self),
            (
                self.args[0],
                self.missing_ranks,
                self.barrier_key,
                self.sequence,
                self.timeout_secs,
            ),
        )


class PeerLostError(BarrierTimeoutError):
    """Ranks of this library stopped showing that they are alive.

    Raised in a waiting rank once a peer's heartbeat (sent from C++ by every
    rank of this library) has been silent for ``peer_timeout_secs``: the
    round can never complete, so there is no point waiting out
    ``timeout_secs``. Every surviving rank names the same ``lost_ranks``.
    A subclass of :class:`BarrierTimeoutError`, so existing handlers catch
    it; unlike a timeout, every later call raises it again.

    Attributes:
        lost_ranks: sorted ranks declared lost.
        timeout_secs: the peer timeout that ran out.
    """

    def __init__(
        self,
        message: str,
        missing_ranks: list[int],
        barrier_key: str,
        sequence: int,
        timeout_secs: float,
        lost_ranks: list[int],
    ) -> None:
        super().__init__(message, missing_ranks, barrier_key, sequence, timeout_secs)
        self.lost_ranks = sorted(lost_ranks)

    def __reduce__(self):
        return (
            type(self),
            (
                self.args[0],
                self.missing_ranks,
                self.barrier_key,
                self.sequence,
                self.timeout_secs,
                self.lost_ranks,
            ),
        )


class StoreUnreachableError(DistNetworkError):
    """The store host is gone or stopped answering.

    A :class:`torch.distributed.DistNetworkError`, as torch raises for a
    store that went away, and not a :class:`BarrierTimeoutError`: no round
    timed out, and there is no time limit or key to report. The same type
    and hierarchy as the C++ ``tcpstore_barrier::StoreUnreachableError``. The
    message says which store, the rank, prefix and sequence, and what this
    rank knew of the round. The barrier is then over: every later call
    raises this error again. Catch :class:`torch.distributed.DistError` to
    handle it together with :class:`BarrierTimeoutError` and
    :class:`PeerLostError`.

    Attributes:
        sequence: the round the barrier was in.
        lost_ranks: ``[0]`` when the barrier created the store (rank 0 hosts
            it), else ``[]`` (a store given to ``from_store``).
    """

    def __init__(self, message: str, sequence: int, lost_ranks: list[int]) -> None:
        super().__init__(message)
        self.sequence = sequence
        self.lost_ranks = sorted(lost_ranks)

    def __reduce__(self):
        return (type(self), (self.args[0], self.sequence, self.lost_ranks))
