"""Rank bodies for test_reliability.py (imported by name in rank processes).

Every body is ``body(rank, world_size, port, ...)`` and returns plain data
(times from ``time.monotonic()``, which is one clock for every process of the
machine) for the test to judge. Ranks coordinate through the barrier's own
store with keys outside the barrier's key space.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from datetime import timedelta

from conftest_shared import LOOPBACK

PREFIX = "ckpt"
# How long a rank waits for a coordination key before giving up: far beyond
# anything a passing test needs, short enough that a broken one ends.
COORDINATION = timedelta(seconds=20)


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def make(rank, world_size, port, *, timeout=10.0, init=10.0, prefix=PREFIX):
    from tcpstore_barrier import TCPStoreBarrier

    return TCPStoreBarrier(
        global_rank=rank,
        global_world_size=world_size,
        barrier_prefix=prefix,
        timeout_barrier_init_secs=init,
        use_checkpoint_barrier_tcpstore_libuv=True,
        tcpstore_port=port,
        master_address=LOOPBACK,
        timeout_secs=timeout,
    )


def _describe(error):
    """What the test needs to know about an exception, picklable."""
    from torch.distributed import DistError, DistNetworkError, DistStoreError

    from tcpstore_barrier import BarrierTimeoutError

    return {
        "type": type(error).__name__,
        "message": str(error),
        "is_barrier_timeout": isinstance(error, BarrierTimeoutError),
        "is_dist_store_error": isinstance(error, DistStoreError),
        "is_dist_network_error": isinstance(error, DistNetworkError),
        "is_dist_error": isinstance(error, DistError),
        "missing_ranks": getattr(error, "missing_ranks", None),
        "barrier_key": getattr(error, "barrier_key", None),
        "sequence": getattr(error, "sequence", None),
        "timeout_secs": getattr(error, "timeout_secs", None),
    }


def _kill_self_after(delay):
    """SIGKILL this process from a helper thread `delay` seconds from now."""
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()


# --- 1. timeout --------------------------------------------------------------


def timeout_round(rank, world_size, port, arriving, rounds_before, timeout):
    """Complete `rounds_before` rounds with everyone, then only `arriving`
    ranks enter the next one; they report how their wait ended."""
    barrier = make(rank, world_size, port, timeout=timeout)
    store = barrier.store
    for _ in range(rounds_before):
        barrier.execute_barrier()
    result = None
    if rank in arriving:
        start = time.monotonic()
        try:
            barrier.execute_barrier()
        except Exception as e:  # noqa: BLE001 - judged by the test
            elapsed = time.monotonic() - start
            result = {"elapsed": elapsed, "error": _describe(e), "exception": e}
        else:
            result = {"elapsed": time.monotonic() - start, "error": None}
        result["sequence_after"] = barrier.sequence
        store.set(f"test/done{rank}", "1")
    store.wait([f"test/done{r}" for r in arriving], COORDINATION)
    barrier.close()
    return result


# --- 2. resume after a timeout -----------------------------------------------


def resume_after_timeouts(rank, world_size, port, short_timeout, timeouts_before_late):
    """Rank 1 times out `timeouts_before_late` times and retries; only then
    does rank 2 enter. Everyone reports (entered, left) and what it saw."""
    barrier = make(rank, world_size, port, timeout=short_timeout if rank == 1 else 15.0)
    store = barrier.store
    result = {"timeouts": [], "sequence_after_timeouts": None}
    if rank == 2:
        store.wait(["test/rank1_timed_out"], COORDINATION)
    entered = time.monotonic()
    if rank == 1:
        for attempt in range(50):
            try:
                barrier.execute_barrier()
                break
            except Exception as e:  # noqa: BLE001
                result["timeouts"].append(_describe(e))
                result["sequence_after_timeouts"] = barrier.sequence
                if len(result["timeouts"]) == timeouts_before_late:
                    store.set("test/rank1_timed_out", "1")
        else:
            raise AssertionError("rank 1 never got through the round")
    else:
        barrier.execute_barrier()
    left = time.monotonic()
    result.update(entered=entered, left=left, sequence=barrier.sequence)
    if rank == 0:
        # Round 0's keys live until round 1 has released.
        result["num_members"] = store.add(f"{PREFIX}0/num_members", 0)
        store.set("test/counted", "1")
    store.wait(["test/counted"], COORDINATION)
    # The barrier keeps working after the retries.
    barrier.execute_barrier()
    result["sequence_final"] = barrier.sequence
    barrier.close()
    return result


# --- 3. Ctrl-C ---------------------------------------------------------------


def interrupted_rank(rank, world_size, port, timeout, usr1_after, int_after):
    """Rank 1 blocks in a round rank 0 has not entered; rank 0 sends it
    SIGUSR1 and SIGINT `usr1_after` and `int_after` seconds after it
    entered, then enters once rank 1 has resumed."""
    barrier = make(rank, world_size, port, timeout=timeout)
    store = barrier.store
    if rank == 0:
        store.wait(["test/pid1"], COORDINATION)
        entered1 = float(store.get("test/entering1"))
        pid = int(store.get("test/pid1"))
        time.sleep(max(0.0, entered1 + usr1_after - time.monotonic()))
        usr1_sent = time.monotonic()
        os.kill(pid, signal.SIGUSR1)
        time.sleep(max(0.0, entered1 + int_after - time.monotonic()))
        int_sent = time.monotonic()
        os.kill(pid, signal.SIGINT)
        store.wait(["test/resumed"], COORDINATION)
        time.sleep(0.3)
        entered = time.monotonic()
        barrier.execute_barrier()
        barrier.close()
        return {
            "usr1_sent": usr1_sent,
            "int_sent": int_sent,
            "entered": entered,
            "usr1_after": usr1_after,
            "int_after": int_after,
        }

    signal.signal(signal.SIGINT, signal.default_int_handler)
    state = {"in_barrier": False}
    handled = []
    signal.signal(
        signal.SIGUSR1,
        lambda signum, frame: handled.append((time.monotonic(), state["in_barrier"])),
    )
    result = {
        "completed_first_call": False,
        "interrupted_at": None,
        "other_error": None,
    }
    store.set("test/entering1", repr(time.monotonic()))
    store.set("test/pid1", str(os.getpid()))
    state["in_barrier"] = True
    try:
        barrier.execute_barrier()
        result["completed_first_call"] = True
    except KeyboardInterrupt:
        result["interrupted_at"] = time.monotonic()
    except BaseException as e:  # noqa: BLE001
        result["other_error"] = _describe(e)
    state["in_barrier"] = False
    result["sequence_after_interrupt"] = barrier.sequence
    result["handled"] = list(handled)
    store.set("test/resumed", "1")
    barrier.execute_barrier()
    result["left"] = time.monotonic()
    result["sequence_after_resume"] = barrier.sequence
    result["num_members"] = store.add(f"{PREFIX}0/num_members", 0)
    barrier.close()
    return result


# --- 4. peer failure ---------------------------------------------------------


def peer_killed(rank, world_size, port, victim, when, timeout):
    """The victim dies by SIGKILL `when` ("before" entering round 1, "while
    others wait" in round 1, or "after entering" round 1); survivors report
    how their rounds ended."""
    barrier = make(rank, world_size, port, timeout=timeout)
    store = barrier.store
    barrier.execute_barrier()  # round 0: everyone is alive
    if rank == victim:
        if when == "before":
            store.set("test/killed_at", repr(time.monotonic()))
            os.kill(os.getpid(), signal.SIGKILL)
        elif when == "while others wait":
            store.wait(["test/others_waiting"], COORDINATION)
            time.sleep(0.2)
            store.set("test/killed_at", repr(time.monotonic()))
            os.kill(os.getpid(), signal.SIGKILL)
        else:  # "after entering": dies while blocked in round 1
            store.set("test/killed_at", repr(time.monotonic() + 0.3))
            _kill_self_after(0.3)
            barrier.execute_barrier()
        raise AssertionError("the victim outlived its SIGKILL")

    survivors = [r for r in range(world_size) if r != victim]
    rounds = []
    if when == "after entering" and rank == survivors[-1]:
        # Enter round 1 only once the victim, already in it, is dead.
        store.wait(["test/killed_at"], COORDINATION)
        time.sleep(0.6)
    if when == "while others wait" and rank == survivors[0]:
        store.set("test/others_waiting", "1")
    for _ in range(2 if when == "after entering" else 1):
        start = time.monotonic()
        try:
            barrier.execute_barrier()
            rounds.append({"elapsed": time.monotonic() - start, "error": None})
        except Exception as e:  # noqa: BLE001
            rounds.append(
                {
                    "elapsed": time.monotonic() - start,
                    "raised_at": time.monotonic(),
                    "error": _describe(e),
                }
            )
            break
    killed_at = (
        float(store.get("test/killed_at")) if store.check(["test/killed_at"]) else None
    )
    if rank == 0:
        # close() would wait timeout_secs for the dead rank to close too;
        # the store only has to outlive the other survivors' last use.
        store.wait([f"test/done{r}" for r in survivors if r != 0], COORDINATION)
    else:
        barrier.close()
        store.set(f"test/done{rank}", "1")
    return {"rounds": rounds, "killed_at": killed_at}


def store_host_killed(rank, world_size, port, timeout):
    """Rank 0 (the store's host) dies by SIGKILL while the others wait in
    round 1; they report what they raised, and that close() copes."""
    barrier = make(rank, world_size, port, timeout=timeout)
    store = barrier.store
    barrier.execute_barrier()
    if rank == 0:
        store.wait([f"test/waiting{r}" for r in range(1, world_size)], COORDINATION)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("rank 0 outlived its SIGKILL")
    store.set(f"test/waiting{rank}", "1")
    start = time.monotonic()
    result = {"error": None}
    try:
        barrier.execute_barrier()
    except Exception as e:  # noqa: BLE001
        result["error"] = _describe(e)
    result["raised_at"] = time.monotonic()
    result["elapsed"] = result["raised_at"] - start
    close_start = time.monotonic()
    try:
        barrier.close()
        result["close_error"] = None
    except Exception as e:  # noqa: BLE001
        result["close_error"] = _describe(e)
    result["close_elapsed"] = time.monotonic() - close_start
    return result


# --- 4. close ----------------------------------------------------------------


def slow_peer_close(rank, world_size, port, linger):
    """Both ranks use the context manager. Rank 1 enters the last round
    first and finishes it (wait, store use, close) `linger` seconds after rank
    0 has released it and gone straight on to close."""
    from tcpstore_barrier import TCPStoreBarrier

    with make(rank, world_size, port, timeout=10.0) as barrier:
        assert isinstance(barrier, TCPStoreBarrier)
        store = barrier.store
        for _ in range(3):
            barrier.execute_barrier()
        if rank == 1:
            barrier.arrive()
            store.set("test/rank1_arrived", "1")
            time.sleep(linger)
            barrier.wait()
            store.set("test/rank1_after", "still here")
            value = store.get("test/rank1_after")
            close_start = time.monotonic()
        else:
            store.wait(["test/rank1_arrived"], COORDINATION)
            barrier.execute_barrier()  # the last arriver: released at once
            close_start = time.monotonic()
            value = None
    return {
        "close_elapsed": time.monotonic() - close_start,
        "sequence": barrier.sequence,
        "value": value,
        "closed": barrier.closed,
    }


# --- 6. bounded store --------------------------------------------------------


def many_rounds(rank, world_size, port, rounds, sample_every, torch_ranks=()):
    """`rounds` barriers; rank 0 samples the store's key count every
    `sample_every` rounds, then reports it and which rounds still have keys."""
    if rank in torch_ranks:
        from torch.distributed.checkpoint._experimental.barriers import (
            TCPStoreBarrier as TorchBarrier,
        )

        barrier = TorchBarrier(
            global_rank=rank,
            global_world_size=world_size,
            barrier_prefix=PREFIX,
            timeout_barrier_init_secs=30,
            use_checkpoint_barrier_tcpstore_libuv=True,
            tcpstore_port=port,
            master_address=LOOPBACK,
            timeout_secs=30,
        )
        store = barrier._tcp_store
    else:
        barrier = make(rank, world_size, port, timeout=30.0, init=30.0)
        store = barrier.store
    samples = []
    for done in range(1, rounds + 1):
        barrier.execute_barrier()
        if rank == 0 and done % sample_every == 0:
            samples.append((done, store.num_keys()))
    result = None
    if rank == 0:
        busy_num_keys = store.num_keys()
        # Deletes wait for the barrier to be quiet (50 ms on every rank).
        time.sleep(0.5)
        leftover = [
            s
            for s in range(rounds)
            if store.check([f"{PREFIX}{s}/num_members"])
            or store.check([f"{PREFIX}{s}/last_member"])
        ]
        result = {
            "busy_num_keys": busy_num_keys,
            "num_keys": store.num_keys(),
            "samples": samples,
            "rounds_with_keys": leftover,
        }
        store.set("test/counted", "1")
    store.wait(["test/counted"], COORDINATION)
    if rank in torch_ranks:
        pass  # torch's class has no close(), and our ranks do not wait for it
    else:
        barrier.close()
    return result


# --- run as a script: one rank that blocks until interrupted -----------------


def _blocked_rank_main(port, timeout):
    """Rank 1 of 2 enters a round rank 0 never enters, says so on stdout
    and blocks; the test interrupts it. Exits the way Python does."""
    import sys

    barrier = make(1, 2, port, timeout=timeout)
    print("entering", flush=True)
    sys.stdout.flush()
    barrier.execute_barrier()
    print("released?!", flush=True)


if __name__ == "__main__":
    import sys

    _blocked_rank_main(int(sys.argv[1]), float(sys.argv[2]))
