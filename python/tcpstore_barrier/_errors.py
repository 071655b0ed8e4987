"""Exceptions raised by the native barrier."""

from __future__ import annotations

from torch.distributed import DistStoreError


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
