"""The store measurement: rank 0's RSS and its store's key count over many
barriers of a world of 2, one process a rank."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

from .launch import pick_free_ports
from .memory_config import MemoryConfig
from .memory_processes import (
    barrier_class,
    make_barrier,
    run_and_report,
    run_processes,
)
from .memory_readings import rss_bytes
from .rank import EventSink


def store_rank_main(
    implementation: str,
    rank: int,
    port: int,
    barriers: int,
    sample_every: int,
    config: MemoryConfig,
    events: EventSink,
    done: Any = None,
) -> None:
    """One of the 2 ranks of the store measurement; rank 0 samples.

    Rank 0 (given ``done``) keeps its store up until ``done`` is set, once
    rank 1 has reported: torch's class has no close() that waits for peers.
    """

    def body() -> dict[str, Any] | None:
        barrier_class(implementation)
        barrier = make_barrier(implementation, rank, 2, port, config, "flat/")
        store = barrier.store if implementation == "ours" else barrier._tcp_store
        samples = []
        start = time.perf_counter()

        def sample(count: int) -> None:
            if rank == 0:
                gc.collect()
                samples.append(
                    {
                        "barriers": count,
                        "rss": rss_bytes(),
                        "keys": store.num_keys(),
                        "secs": time.perf_counter() - start,
                    }
                )

        barrier.execute_barrier()
        sample(1)
        count = 1
        while count < barriers:
            step = min(sample_every - count % sample_every, barriers - count)
            for _ in range(step):
                barrier.execute_barrier()
            count += step
            if count % sample_every == 0 or count == barriers:
                sample(count)
        if implementation == "ours":
            barrier.close()
        elif done is not None:
            events.put(("result", f"rank{rank}", {"samples": samples}))
            done.wait(config.timeout_secs)
            return None
        return {"samples": samples}

    run_and_report(f"rank{rank}", events, body)


def measure_store(
    implementation: str, barriers: int, sample_every: int, config: MemoryConfig,
    deadline: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """Rank 0's samples over ``barriers`` barriers of a world of 2."""
    (port,) = pick_free_ports(1)
    results = run_processes(
        [
            (f"rank{rank}", store_rank_main,
             (implementation, rank, port, barriers, sample_every, config))
            for rank in (0, 1)
        ],  # fmt: skip
        {"rank0", "rank1"},
        deadline,
        done_when="rank1",
        host="rank0",
    )
    return results["rank0"]["samples"]


@dataclass(frozen=True)
class StoreSummary:
    """Rank 0's RSS and the store's key count over a run of barriers."""

    implementation: str
    barriers: int
    samples: list[dict[str, Any]]

    def _values(self, key: str) -> list[float]:
        return [s[key] for s in self.samples]

    @property
    def first_rss(self) -> int:
        return self.samples[0]["rss"]

    @property
    def last_rss(self) -> int:
        return self.samples[-1]["rss"]

    @property
    def max_rss(self) -> int:
        return max(s["rss"] for s in self.samples)

    @property
    def first_keys(self) -> int:
        return self.samples[0]["keys"]

    @property
    def last_keys(self) -> int:
        return self.samples[-1]["keys"]

    @property
    def max_keys(self) -> int:
        return max(s["keys"] for s in self.samples)

    @property
    def keys_per_barrier(self) -> float:
        """Key growth per barrier between the first and last sample."""
        done = self.samples[-1]["barriers"] - self.samples[0]["barriers"]
        return (self.last_keys - self.first_keys) / done if done else 0.0

    @property
    def barrier_us(self) -> float | None:
        """Mean time per barrier between the first and last sample."""
        done = self.samples[-1]["barriers"] - self.samples[0]["barriers"]
        secs = self.samples[-1]["secs"] - self.samples[0]["secs"]
        return secs / done * 1e6 if done else None
