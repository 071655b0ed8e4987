"""Every call has a deadline that holds (docs/deadlines-and-shutdown.md): construction
by timeout_barrier_init_secs, close() by timeout_secs, each plus about a
second at most.

Real stores on 127.0.0.1; ranks are processes (support/launch.py) or, for
a lone constructor, the test process itself. Measured figures print as
``FIGURE name: value`` lines (``pytest -s``).
"""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist
from support import LOOPBACK, report_figure
from support.barriers import our_barrier
from support.launch import CONTEXT, run_ranks

# Loaded now, so that no measured call includes its import.
import tcpstore_barrier  # noqa: F401

# How late past its limit a call may return: "its deadline plus about a second".
SLACK = 1.0


# --- construction ------------------------------------------------------------------

INIT = 2.0


@pytest.mark.parametrize("libuv", [True, False], ids=["libuv", "classic"])
def test_host_constructor_gives_up_by_the_init_timeout_when_a_peer_never_joins(
    port, libuv
):
    # World size 2, and rank 1 never comes: rank 0 hosts the store and waits
    # for it as TCPStore does, but no longer than timeout_barrier_init_secs.
    start = time.monotonic()
    with pytest.raises(dist.DistError) as caught:
        our_barrier(0, 2, port, init=INIT, libuv=libuv)
    elapsed = time.monotonic() - start
    report_figure(f"host constructor gave up after (s) [libuv={libuv}]", elapsed)
    # A DistStoreError, as TCPStore raises when its workers do not come.
    assert isinstance(caught.value, dist.DistStoreError), repr(caught.value)
    message = str(caught.value)
    assert "timeout_barrier_init_secs" in message, message
    assert f"{LOOPBACK}:{port}" in message, message
    # It waited for the peer, since one may start late, but not past the
    # limit plus a second (c10d's own wait for workers compares whole
    # seconds, elapsed > timeout, so left to itself it ends a second late).
    assert INIT - 0.05 <= elapsed <= INIT + SLACK, f"{elapsed:.2f} s: {message}"


# --- close() ------------------------------------------------------------------------

CLOSE_TIMEOUT = 2.0


def peer_never_closes(rank, world_size, port, peer_timeout, host_closed):
    """Both ranks run a round. Rank 1 then stays alive (heartbeating, if
    liveness is on) and never calls close(); rank 0 closes and reports how
    long that took."""
    barrier = our_barrier(
        rank, world_size, port, init=20, timeout=CLOSE_TIMEOUT,
        options={"peer_timeout_secs": peer_timeout},
    )  # fmt: skip
    barrier.execute_barrier()
    if rank == 1:
        # Alive until the host has closed: it must not be taken for dead.
        assert host_closed.wait(30), "rank 0's close() never returned"
        return None
    start = time.monotonic()
    barrier.close()
    elapsed = time.monotonic() - start
    host_closed.set()
    return {"close_elapsed": elapsed, "closed": barrier.closed}


@pytest.mark.parametrize(
    "peer_timeout", [1.0, None], ids=["heartbeating", "no-liveness"]
)
def test_host_close_waits_for_a_live_peer_only_until_timeout_secs(port, peer_timeout):
    host_closed = CONTEXT.Event()
    host, _ = run_ranks(
        peer_never_closes, 2, port, peer_timeout, host_closed, timeout=60
    )
    elapsed = host["close_elapsed"]
    report_figure(
        f"host close() with a live peer that never closes (s) [{peer_timeout}]", elapsed
    )
    assert host["closed"]
    # A live peer may still need the store (README, "Shutting down"): rank 0
    # keeps it up for the whole timeout, and not past it.
    assert CLOSE_TIMEOUT - 0.1 <= elapsed <= CLOSE_TIMEOUT + SLACK, f"{elapsed:.2f} s"


# --- the host's process after Ctrl-C -------------------------------------------------


def host_interrupted(rank, world_size, port, done):
    """Rank 0 waits in a round rank 1 never enters and is interrupted by
    SIGINT; the KeyboardInterrupt ends its process (the launcher reports
    it), which destroys its barrier without close(). Rank 1 stays alive,
    heartbeating, until the test is done."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    barrier = our_barrier(rank, world_size, port, init=20, timeout=120)
    if rank == 1:
        done.wait(60)
        return None
    barrier.execute_barrier()
    return "released?!"


def test_ctrl_c_on_the_store_host_ends_its_process_promptly(port):
    # A host destroyed after a timeout or a lost peer keeps its store up for
    # the survivors' verdict; after Ctrl-C there is no verdict to share, and
    # the user waits for the process to end.
    import os
    import signal

    from support.barriers import await_arrivals
    from support.launch import start_ranks

    done = CONTEXT.Event()
    with start_ranks(host_interrupted, 2, port, done) as ranks:
        store = dist.TCPStore(LOOPBACK, port, is_master=False, wait_for_workers=False)
        await_arrivals(store, "ckpt", 0, 1)
        os.kill(ranks.workers[0].pid, signal.SIGINT)
        sent = time.monotonic()
        ranks.workers[0].join(30)
        ended = time.monotonic() - sent
        done.set()
    report_figure("host process ended after Ctrl-C (s)", ended)
    assert ranks.workers[0].exitcode == 0, ranks.exit_codes()
    assert ended < 1.0, f"{ended:.2f} s"
