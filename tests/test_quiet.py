"""Quiet by default: slow rounds, timeouts we handle, shutdown and the main
job print nothing from c10d, no C++ backtrace, no warning.

Each test runs a real program in a subprocess and reads everything it wrote.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

# What c10d's logging, a C++ backtrace or a Python warning look like.
NOISE = re.compile(
    r"^\[?[WE]\d{4}|warning|Traceback|frame #\d|Exception raised from|"
    r"waitForInput|Failed to recv",
    re.IGNORECASE | re.MULTILINE,
)

SLOW_ROUNDS = textwrap.dedent(
    """
    import threading, time
    from tcpstore_barrier import BarrierTimeoutError, TCPStoreBarrier

    PORT, WORLD = {port}, 3
    errors = []

    def rank(r):
        try:
            barrier = TCPStoreBarrier(r, WORLD, "quiet", 30, {libuv}, PORT,
                                      "127.0.0.1", 0.4, peer_timeout_secs=1.0)
            with barrier:
                for step in range(30):
                    if r == 2 and step in (5, 6):
                        time.sleep(0.7)   # slower than the others' timeout
                    elif r == 2 and step == 10:
                        time.sleep(0.3)   # a slow round that still releases
                    while True:
                        try:
                            barrier.execute_barrier()
                            break
                        except BarrierTimeoutError:
                            pass          # handled: resume the same round
        except BaseException as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(WORLD)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors, errors
    """
)


def run_program(code, timeout=120):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_slow_rounds_handled_timeouts_and_close_print_nothing(port):
    for libuv in (True, False):
        proc = run_program(SLOW_ROUNDS.format(port=port, libuv=libuv))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "" and proc.stderr == "", (proc.stdout, proc.stderr)


def test_main_job_output_is_clean():
    # The README's main job: a local 4-rank bench, ours against torch's.
    proc = subprocess.run(
        [sys.executable, "-m", "tcpstore_barrier", "bench", "--world-size", "4"],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "ours" in output
    noise = NOISE.findall(output)
    assert not noise, output
