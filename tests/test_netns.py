"""Three hosts on a real (virtual) network, with faults.

Each rank runs in a network namespace of its own, linked to a bridge in a
fourth namespace; the 10.x addresses exist only inside these namespaces,
which the test creates under unique names and always deletes. Links get
netem delay and loss where the kernel has netem; then one host is cut off
and the others must name it.
"""

from __future__ import annotations

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
