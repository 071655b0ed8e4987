"""Three hosts on a real (virtual) network, with faults.

Each rank runs in a network namespace of its own, linked to a bridge in a
fourth namespace; the 10.x addresses exist only inside these namespaces,
which the test creates under unique names and always deletes. Links get
netem delay and loss where the kernel has netem; then one host is cut off
and the others must name it.
"""

from __future__ import annotations

import json
import queue as queue_module
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import netns_hosts
from reliability_ranks import free_port

WORLD_SIZE = 3
ROUNDS = 500
# Per-round limit of the ranks (also how long the cut-off round waits).
TIMEOUT = 3.0


@pytest.fixture
def hosts():
    reason = netns_hosts.netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    made = netns_hosts.Hosts(WORLD_SIZE)
    try:
        made.create()
        yield made
    finally:
        made.destroy()


class Ranks:
    """One rank process per host, reporting JSON lines."""

    def __init__(self, hosts, rounds, timeout=None, peer_timeout="off"):
        self.events = queue_module.Queue()
        self.logs = []
        self.procs = []
        # Any port is free in fresh namespaces; take one free here as well.
        port = free_port()
        for rank in range(WORLD_SIZE):
            log = tempfile.TemporaryFile()
            self.logs.append(log)
            proc = hosts.popen(
                rank,
                [
                    sys.executable,
                    str(netns_hosts.TESTS / "netns_hosts.py"),
                    "rank",
                    str(rank),
                    str(WORLD_SIZE),
                    hosts.addresses[0],
                    str(port),
                    str(rounds),
                    str(TIMEOUT if timeout is None else timeout),
                    str(peer_timeout),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=netns_hosts.TESTS,
            )
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stdout:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                pass

    def collect(self, event, ranks, timeout):
        got = {}
        deadline = time.monotonic() + timeout
        while set(ranks) - got.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                item = self.events.get(timeout=min(left, 0.5))
            except queue_module.Empty:
                continue
            if item["event"] == event:
                got[item["rank"]] = item
        missing = sorted(set(ranks) - got.keys())
        assert not missing, (
            f"ranks {missing} sent no {event!r} within {timeout} s; "
            f"exit codes {[p.poll() for p in self.procs]}; "
            f"stderr of the first: {self.stderr(missing[0])[-3000:]}"
        )
        return got

    def stderr(self, rank):
        log = self.logs[rank]
        log.seek(0)
        return log.read().decode(errors="replace")

    def tell(self, ranks, line):
        for rank in ranks:
            self.procs[rank].stdin.write(line + "\n")
            self.procs[rank].stdin.flush()

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        for log in self.logs:
            log.close()


def assert_no_early_release(reports):
    for s in range(ROUNDS):
        last_entry = max(reports[r]["stamps"][s][0] for r in range(WORLD_SIZE))
        first_exit = min(reports[r]["stamps"][s][1] for r in range(WORLD_SIZE))
        assert first_exit >= last_entry, f"round {s} released before every rank entered"


def run_rounds_then_cut_one_host(hosts):
    ranks = Ranks(hosts, ROUNDS)
    try:
        reports = ranks.collect("rounds", range(WORLD_SIZE), timeout=120)
        assert [reports[r]["sequence"] for r in range(WORLD_SIZE)] == [ROUNDS] * 3
        assert_no_early_release(reports)

        cut = WORLD_SIZE - 1
        hosts.cut(cut)
        ranks.tell(range(WORLD_SIZE), "go")
        survivors = [r for r in range(WORLD_SIZE) if r != cut]
        last = ranks.collect("last", survivors, timeout=TIMEOUT + 15)
        for rank in survivors:
            outcome = last[rank]
            assert outcome["error"] is not None, (
                f"rank {rank} passed a round without host {cut}"
            )
            assert outcome["error"]["type"] == "BarrierTimeoutError", outcome
            assert outcome["error"]["missing_ranks"] == [cut]
            assert outcome["error"]["sequence"] == ROUNDS
            assert outcome["elapsed"] <= TIMEOUT + 1.0
        first = reports[0]["stamps"]
        print(
            f"FIGURE netns_{ROUNDS}_rounds_s: {first[-1][1] - first[0][0]:.3f}\n"
            f"FIGURE netns_cut_host_named_after_s: "
            f"{max(last[r]['elapsed'] for r in survivors):.3f}"
        )
    finally:
        ranks.stop()


def test_three_hosts_run_500_barriers_then_name_the_host_cut_off(hosts):
    run_rounds_then_cut_one_host(hosts)


PEER_TIMEOUT = 1.0


def cut_after_rounds(hosts, cut):
    """Runs a few rounds, takes host `cut` off the network (its connections
    stay open: nothing is closed, packets just stop), then one more round
    with a timeout far above the peer timeout; returns the survivors'."""
    ranks = Ranks(hosts, 20, timeout=60.0, peer_timeout=PEER_TIMEOUT)
    try:
        ranks.collect("rounds", range(WORLD_SIZE), timeout=120)
        hosts.cut(cut)
        ranks.tell(range(WORLD_SIZE), "go")
        survivors = [r for r in range(WORLD_SIZE) if r != cut]
        last = ranks.collect("last", survivors, timeout=30)
        return {r: last[r] for r in survivors}
    finally:
        ranks.stop()


def test_a_partitioned_peer_is_named_lost_within_the_peer_timeout(hosts):
    cut = WORLD_SIZE - 1
    last = cut_after_rounds(hosts, cut)
    for outcome in last.values():
        error = outcome["error"]
        assert error is not None and error["type"] == "PeerLostError", outcome
        assert error["lost_ranks"] == [cut]
        assert outcome["elapsed"] <= PEER_TIMEOUT + 2.0
    print(f"FIGURE netns_partitioned_peer_named_after_s: "
          f"{max(o['elapsed'] for o in last.values()):.3f}")


def test_a_partitioned_store_host_is_reported_within_the_peer_timeout(hosts):
    last = cut_after_rounds(hosts, 0)
    for outcome in last.values():
        error = outcome["error"]
        assert error is not None and error["type"] == "StoreUnreachableError", outcome
        assert f"{hosts.addresses[0]}:" in error["message"]
        assert outcome["elapsed"] <= PEER_TIMEOUT + 2.0
    print(f"FIGURE netns_partitioned_store_host_reported_after_s: "
          f"{max(o['elapsed'] for o in last.values()):.3f}")


# 500 rounds of a few 4 ms round trips, plus retransmissions after losses.
@pytest.mark.slow
def test_three_hosts_with_delay_and_loss_run_500_barriers_then_name_the_host_cut_off(
    hosts,
):
    reason = netns_hosts.netem_unavailable_reason(hosts.names[0], "eth0")
    if reason is not None:
        pytest.skip(reason)
    hosts.impair("delay", "2ms", "loss", "1%")
    run_rounds_then_cut_one_host(hosts)
