"""A tree of stores across four hosts on a real (virtual) network, with
faults: a killed leader, a frozen host, a host cut off.

Each host is a network namespace with two rank processes; no `host` is
given, so the tree groups ranks by the address they reach rank 0's store
from. With a fan-in of 2 the tree has three levels: host stores (hosted by
ranks 0, 2, 4, 6), group stores (0 for hosts 0-1, 4 for hosts 2-3) and the
root, rank 0's store, where ranks 0 and 4 meet.
"""

from __future__ import annotations

import signal

import pytest
from support import free_port, netns
from support.barriers import assert_no_early_release
from support.netns import HostRanks

HOSTS = 4
RANKS_PER_HOST = 2
WORLD_SIZE = HOSTS * RANKS_PER_HOST
ROUNDS = 30
PEER_TIMEOUT = 1.0
# Far above the peer timeout: only liveness may end the faulty round.
TIMEOUT = 60.0
TREE = {"topology": "tree", "tree_fan_in": 2}


@pytest.fixture
def hosts():
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    made = netns.Hosts(HOSTS, subnet="10.213.8")
    try:
        made.create()
        yield made
    finally:
        made.destroy()


def ranks_of_host(host):
    return list(range(host * RANKS_PER_HOST, (host + 1) * RANKS_PER_HOST))


def run_then_fault(hosts, fault, faulty):
    """Runs ROUNDS rounds over the tree, does `fault(ranks)`, then one more
    round on every rank not in `faulty`; returns the reports of the rounds
    and of that last round."""
    with HostRanks(
        hosts, free_port(), ROUNDS, TIMEOUT, PEER_TIMEOUT, RANKS_PER_HOST, TREE
    ) as ranks:
        rounds = ranks.collect("rounds", range(WORLD_SIZE), timeout=180)
        fault(ranks)
        others = [r for r in range(WORLD_SIZE) if r not in faulty]
        ranks.tell(others, "go")
        last = ranks.collect("last", others, timeout=30)
        return rounds, last


def test_a_tree_across_hosts_groups_ranks_by_address_and_listens_only_there(hosts):
    listening = {}

    def look(ranks):
        for host in range(HOSTS):
            listening[host] = hosts.listening_addresses(host)

    rounds, last = run_then_fault(hosts, look, ())
    assert all(rounds[r]["topology"] == "tree" for r in range(WORLD_SIZE))
    # Ranks 0 and 4 meet at their host's store, their group's and the root;
    # the other leaders at two; every other rank at its host's only.
    levels = {r: rounds[r]["tree_levels"] for r in range(WORLD_SIZE)}
    assert levels == {r: {0: 3, 4: 3, 2: 2, 6: 2}.get(r, 1) for r in range(WORLD_SIZE)}
    assert [rounds[r]["sequence"] for r in range(WORLD_SIZE)] == [ROUNDS] * WORLD_SIZE
    assert_no_early_release([rounds[r]["stamps"] for r in range(WORLD_SIZE)])
    assert all(last[r]["error"] is None for r in range(WORLD_SIZE))
    # Every store, rank 0's included, on its host's address only.
    for host in range(HOSTS):
        assert listening[host] == [hosts.addresses[host]], listening


def assert_all_name(last, lost):
    for rank, outcome in sorted(last.items()):
        error = outcome["error"]
        assert error is not None, f"rank {rank} passed a round without {lost}"
        assert error["type"] == "PeerLostError", (rank, error)
        assert error["lost_ranks"] == lost, (rank, error)
        assert outcome["elapsed"] <= PEER_TIMEOUT + 2.0, (rank, outcome)


def test_a_killed_leader_and_its_host_are_named_by_every_survivor(hosts):
    # Rank 2 hosts host 1's store and is a member of rank 0's group store:
    # its host's other rank loses its way to the root with it.
    leader = ranks_of_host(1)[0]
    _, last = run_then_fault(
        hosts, lambda ranks: ranks.signal([leader], signal.SIGKILL), [leader]
    )
    assert_all_name(last, ranks_of_host(1))
    print(
        "FIGURE netns_tree_killed_leader_named_after_s: "
        f"{max(o['elapsed'] for o in last.values()):.3f}"
    )


def test_a_frozen_host_is_named_by_every_survivor(hosts):
    frozen = ranks_of_host(3)
    _, last = run_then_fault(
        hosts, lambda ranks: ranks.signal(frozen, signal.SIGSTOP), frozen
    )
    assert_all_name(last, frozen)
    print(
        "FIGURE netns_tree_frozen_host_named_after_s: "
        f"{max(o['elapsed'] for o in last.values()):.3f}"
    )


def test_a_host_cut_off_is_named_by_the_rest_and_its_ranks_do_not_hang(hosts):
    cut = ranks_of_host(3)
    _, last = run_then_fault(hosts, lambda ranks: hosts.cut(3), ())
    assert_all_name({r: o for r, o in last.items() if r not in cut}, cut)
    # Cut off, its ranks can reach neither their group's store nor the
    # root: they learn it from the silence, and never wait out the round.
    for rank in cut:
        error = last[rank]["error"]
        assert error is not None and error["type"] in (
            "StoreUnreachableError",
            "PeerLostError",
        ), (rank, error)
        assert last[rank]["elapsed"] <= PEER_TIMEOUT + 3.0, (rank, last[rank])
