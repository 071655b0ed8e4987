"""The bench's reference barrier (benchmarks/reference_barrier.cpp)."""

import torch.distributed

class ReferenceBarrier:
    def __init__(
        self,
        store: torch.distributed.Store,
        rank: int,
        world_size: int,
        prefix: str,
    ) -> None: ...
    def execute_barrier(self) -> None: ...
