"""Three hosts on a real (virtual) network, with faults.

Each rank runs in a network namespace of its own, linked to a bridge in a
fourth namespace; the 10.x addresses exist only inside these namespaces,
which the test creates under unique names and always deletes. Links get
netem delay and loss where the kernel has netem; then one host is cut off
and the others must name it.
"""

from __future__ import annotations

import time

import pytest
from support import free_port, netns
from support.barriers import assert_no_early_release
from support.netns import HostRanks

WORLD_SIZE = 3
ROUNDS = 500
# Per-round limit of the ranks (also how long the cut-off round waits).
TIMEOUT = 3.0


@pytest.fixture
def hosts():
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    made = netns.Hosts(WORLD_SIZE)
    try:
        made.create()
        yield made
    finally:
        made.destroy()


def run_rounds_then_cut_one_host(hosts):
    # Any port is free in fresh namespaces; take one free here as well.
    with HostRanks(hosts, free_port(), ROUNDS, TIMEOUT) as ranks:
        reports = ranks.collect("rounds", range(WORLD_SIZE), timeout=120)
        assert [reports[r]["sequence"] for r in range(WORLD_SIZE)] == [ROUNDS] * 3
        assert_no_early_release([reports[r]["stamps"] for r in range(WORLD_SIZE)])

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


def test_three_hosts_run_500_barriers_then_name_the_host_cut_off(hosts):
    run_rounds_then_cut_one_host(hosts)


PEER_TIMEOUT = 1.0


def cut_after_rounds(hosts, cut):
    """Runs a few rounds, takes host `cut` off the network (its connections
    stay open: nothing is closed, packets just stop), then one more round
    with a timeout far above the peer timeout; returns the survivors'."""
    with HostRanks(hosts, free_port(), 20, 60.0, PEER_TIMEOUT) as ranks:
        ranks.collect("rounds", range(WORLD_SIZE), timeout=120)
        hosts.cut(cut)
        ranks.tell(range(WORLD_SIZE), "go")
        survivors = [r for r in range(WORLD_SIZE) if r != cut]
        last = ranks.collect("last", survivors, timeout=30)
        return {r: last[r] for r in survivors}


def test_a_partitioned_peer_is_named_lost_within_the_peer_timeout(hosts):
    cut = WORLD_SIZE - 1
    last = cut_after_rounds(hosts, cut)
    for outcome in last.values():
        error = outcome["error"]
        assert error is not None and error["type"] == "PeerLostError", outcome
        assert error["lost_ranks"] == [cut]
        assert outcome["elapsed"] <= PEER_TIMEOUT + 2.0
    print(
        f"FIGURE netns_partitioned_peer_named_after_s: "
        f"{max(o['elapsed'] for o in last.values()):.3f}"
    )


def test_a_partitioned_store_host_is_reported_within_the_peer_timeout(hosts):
    last = cut_after_rounds(hosts, 0)
    for outcome in last.values():
        error = outcome["error"]
        assert error is not None and error["type"] == "StoreUnreachableError", outcome
        assert f"{hosts.addresses[0]}:" in error["message"]
        assert outcome["elapsed"] <= PEER_TIMEOUT + 2.0
    print(
        f"FIGURE netns_partitioned_store_host_reported_after_s: "
        f"{max(o['elapsed'] for o in last.values()):.3f}"
    )


# 500 rounds of a few 4 ms round trips, plus retransmissions after losses.
@pytest.mark.slow
def test_three_hosts_with_delay_and_loss_run_500_barriers_then_name_the_host_cut_off(
    hosts,
):
    reason = netns.netem_unavailable_reason(hosts.names[0], "eth0")
    if reason is not None:
        pytest.skip(reason)
    hosts.impair("delay", "2ms", "loss", "1%")
    run_rounds_then_cut_one_host(hosts)


# A host whose link goes down for STALL seconds, well inside the round's
# limit, with liveness off: nothing but timeout_secs bounds the round, so
# the stall must not break it. The stalled host enters the round while its
# link is down, so its arrival stays unacknowledged for the whole stall and
# the kernel retransmits it: a connection whose TCP_USER_TIMEOUT is shorter
# than the stall is killed under the round.
STALL = 15.0
STALL_TIMEOUT = 60.0
STALL_ROUNDS = 5


@pytest.mark.slow
def test_a_network_stall_within_timeout_secs_does_not_break_a_round_without_liveness(
    hosts,
):
    stalled = WORLD_SIZE - 1
    port = free_port()
    store = (hosts.addresses[0], port)
    # HostRanks' peer timeout defaults to "off": no heartbeats, so the
    # arrival is the only thing the stalled host sends.
    with HostRanks(hosts, port, STALL_ROUNDS, STALL_TIMEOUT) as ranks:
        ranks.collect("rounds", range(WORLD_SIZE), timeout=120)
        hosts.cut(stalled)
        # The others enter at once; whether before or during the stall does
        # not matter, they wait for the stalled host either way.
        ranks.tell(range(WORLD_SIZE), "go")
        in_flight_at = hosts.await_unacknowledged(stalled, *store, timeout=10)
        time.sleep(max(0.0, in_flight_at + STALL - time.monotonic()))
        # What the kernel still holds for the store at the end of the stall
        # (None: it dropped the connection).
        held_at_restore = hosts.unacknowledged_bytes(stalled, *store)
        hosts.restore(stalled)
        restored_at = time.monotonic()
        # The stalled host first: if its connection died, it knows at once.
        last = ranks.collect("last", [stalled], timeout=STALL_TIMEOUT + 15)
        outcome = last[stalled]
        assert outcome["error"] is None, (
            f"host {stalled} failed {outcome['ended_at'] - in_flight_at:.1f} s "
            f"into a {STALL:g} s stall (unacknowledged bytes at the restore: "
            f"{held_at_restore}): {outcome['error']}"
        )
        # collect() keeps every rank's report it met on the way.
        others = [r for r in range(WORLD_SIZE) if r not in last]
        last.update(ranks.collect("last", others, timeout=STALL_TIMEOUT + 15))
    for rank, outcome in sorted(last.items()):
        assert outcome["error"] is None, f"rank {rank}: {outcome['error']}"
        assert outcome["elapsed"] < STALL_TIMEOUT
    print(
        f"FIGURE netns_stall_unacked_bytes_at_restore: {held_at_restore}\n"
        f"FIGURE netns_round_done_after_restore_s: "
        f"{max(o['ended_at'] for o in last.values()) - restored_at:.3f}\n"
        f"FIGURE netns_stalled_round_s: {last[stalled]['elapsed']:.3f}"
    )
