"""Addresses as deployments have them (issue 23), on real (virtual) hosts.

Each host is a network namespace with its own /etc/hosts (``ip netns exec``
mounts /etc/netns/NAME/hosts over /etc/hosts): the master is named by a
hostname that is 127.0.1.1 on rank 0's host, as Debian and Ubuntu map a
host's own name, and every host's own name is 127.0.1.1 there too. Rank 0's
host also has an address the others cannot reach. Then: IPv6 (a ULA address
in the namespaces, and ::1), and "auto" where a tree cannot be built (rank 0
running torch's class, a member cut off from its leader), with the
threshold lowered by TCPSTORE_BARRIER_TREE_FROM_WORLD_SIZE.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
from support import free_port, netns
from support.barriers import assert_no_early_release
from support.netns import HostRanks

ROUNDS = 20
TIMEOUT = 30.0
FALLBACK_LINE = "topology='auto' uses one flat store instead of a tree"
WILDCARD_LINE = "listens on every address of this host"
KNOB = {"TCPSTORE_BARRIER_TREE_FROM_WORLD_SIZE": "2"}


def skip_without_netns():
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def debian_hosts():
    """3 hosts; "tsb-master-..." is 127.0.1.1 on host 0 and host 0's
    address elsewhere; host 0 also has 10.213.99.1, which no other host
    can route to."""
    skip_without_netns()
    made = netns.Hosts(3, subnet="10.213.9")
    made.master = f"tsb-master-{netns.unique_token()}"
    machine = socket.gethostname()
    try:
        made.create()
        made.add_address(0, "10.213.99.1/24")
        for i in range(3):
            lines = ["127.0.0.1 localhost"]
            if i == 0:
                lines.append(f"127.0.1.1 {made.master} {machine}")
            else:
                lines += [f"127.0.1.1 {machine}", f"{made.addresses[0]} {made.master}"]
            made.write_hosts_file(i, "\n".join(lines) + "\n")
        yield made
    finally:
        made.destroy()


def run_rounds(hosts, ranks_per_host, options, master_address=None, **kwargs):
    world_size = len(hosts.names) * ranks_per_host
    with HostRanks(
        hosts, free_port(), ROUNDS, TIMEOUT, 5.0, ranks_per_host, options,
        master_address=master_address, **kwargs,
    ) as ranks:  # fmt: skip
        reports = ranks.collect("rounds", range(world_size), timeout=90)
        listening = [hosts.listening_addresses(i) for i in range(len(hosts.names))]
        stderr = "".join(ranks.stderr(r) for r in range(world_size))
    return reports, listening, stderr


def assert_rounds(reports, topology):
    ranks = sorted(reports)
    for rank in ranks:
        assert reports[rank]["error"] is None, (rank, reports[rank]["error"])
        assert reports[rank]["sequence"] == ROUNDS
        assert reports[rank]["topology"] == topology, (rank, reports[rank])
    assert_no_early_release([reports[r]["stamps"] for r in ranks])


WILDCARDS = {"*", "0.0.0.0", "[::]"}


@pytest.mark.parametrize(
    "options",
    [
        {"topology": "flat"},
        {"topology": "tree", "tree_fan_in": 2},
        {"topology": "tree", "tree_fan_in": 2, "from_store": True},
    ],
    ids=["flat", "tree", "tree-from-torch-store"],
)
def test_a_master_named_by_a_hostname_that_is_loopback_on_its_host(
    debian_hosts, options
):
    # Fan-in 2: host stores at ranks 0, 2, 4; ranks 0 and 2 meet at a group
    # store rank 0 hosts, which host 1 must reach.
    reports, listening, stderr = run_rounds(
        debian_hosts, 2, options, master_address=debian_hosts.master
    )
    assert_rounds(reports, options["topology"])
    if options["topology"] == "tree":
        assert reports[2]["tree_levels"] == 2 and reports[0]["tree_levels"] == 3
    # Rank 0's host listens on the wildcard (its store, or torch's, and the
    # group store); the other hosts' stores on their own address only.
    assert WILDCARDS & set(listening[0]), listening
    assert not {"127.0.0.1", "127.0.1.1"} & set(listening[0]), listening
    for host in (1, 2):
        expected_there = (
            [debian_hosts.addresses[host]] if options["topology"] == "tree" else []
        )
        assert listening[host] == expected_there, listening
    expected = 0 if options.get("from_store") else 1
    assert stderr.count(WILDCARD_LINE) == expected, stderr


def test_localhost_and_loopback_literals_listen_on_loopback_only(port):
    from tcpstore_barrier import TCPStoreBarrier

    for address in ("localhost", "127.0.0.1", "::1"):
        with TCPStoreBarrier(0, 1, "lo", 10, True, port, address, 10) as barrier:
            barrier.execute_barrier()
            out = subprocess.run(
                ["ss", "-tlnH", f"sport = :{port}"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
        local = {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines()}
        assert local and local <= {"127.0.0.1", "[::1]"}, (address, out)


@pytest.fixture
def ula_hosts():
    skip_without_netns()
    made = netns.Hosts(3, subnet="10.213.11", ipv6="fd00:213:11:")
    try:
        made.create()
        yield made
    finally:
        made.destroy()


def test_a_tree_over_ipv6_ula_addresses(ula_hosts):
    reports, listening, _ = run_rounds(
        ula_hosts, 2, {"topology": "tree", "tree_fan_in": 2},
        master_address=ula_hosts.addresses6[0],
    )  # fmt: skip
    assert_rounds(reports, "tree")
    for host in range(3):
        assert listening[host] == [f"[{ula_hosts.addresses6[host]}]"], listening


LOCAL_JOB = textwrap.dedent(
    """
    import threading, traceback
    from torch.distributed.checkpoint._experimental.barriers import (
        TCPStoreBarrier as TorchBarrier)
    from tcpstore_barrier import TCPStoreBarrier

    PORT, WORLD, ADDRESS = {port}, 4, {address!r}
    OPTIONS, TORCH_RANK0 = {options!r}, {torch_rank0!r}
    results = {{}}

    def rank(r):
        try:
            args = (r, WORLD, "ckpt", 8, True, PORT, ADDRESS, 20)
            if r == 0 and TORCH_RANK0:
                barrier = TorchBarrier(*args)
            else:
                barrier = TCPStoreBarrier(
                    *args, host=f"h{{r // 2}}", **OPTIONS)
            for _ in range({rounds}):
                barrier.execute_barrier()
            results[r] = getattr(barrier, "topology", "torch")
        except Exception as e:
            results[r] = f"{{type(e).__name__}}: {{e}}"

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(WORLD)]
    for t in threads: t.start()
    for t in threads: t.join()
    for r in sorted(results): print(r, results[r])
    """
)


def run_local_job(port, options, *, address="127.0.0.1", torch_rank0=False):
    code = LOCAL_JOB.format(
        port=port, address=address, options=options, torch_rank0=torch_rank0,
        rounds=ROUNDS,
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, **KNOB}, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    return {int(r): v for r, v in results.items()}, proc.stderr


def test_a_tree_over_ipv6_loopback(port):
    results, _ = run_local_job(
        port, {"topology": "tree", "tree_fan_in": 2}, address="::1"
    )
    assert results == {r: "tree" for r in range(4)}, results


def test_auto_with_rank_0_running_torchs_class_is_flat_with_one_line(port):
    results, stderr = run_local_job(port, {}, torch_rank0=True)
    assert results == {0: "torch", 1: "flat", 2: "flat", 3: "flat"}, results
    assert stderr.count(FALLBACK_LINE) == 1, stderr
    assert "not a rank of this library" in stderr, stderr


def test_tree_with_rank_0_running_torchs_class_names_rank_0(port):
    results, _ = run_local_job(port, {"topology": "tree"}, torch_rank0=True)
    for rank in (1, 2, 3):
        assert results[rank].startswith("DistNetworkError"), results
        assert "topology='tree' cannot be built" in results[rank], results
        assert "heard nothing from rank 0" in results[rank], results


@pytest.fixture
def partitioned_hosts():
    """4 hosts, one rank each; host 3 cannot reach host 2 (both reach host
    0). Fan-in 2: rank 2 hosts the group store of ranks 2 and 3."""
    skip_without_netns()
    made = netns.Hosts(4, subnet="10.213.12")
    try:
        made.create()
        made.route(3, "unreachable", f"{made.addresses[2]}/32")
        yield made
    finally:
        made.destroy()


UNREACHABLE = "rank 3 cannot reach the store of rank 2 (tree store"


def test_auto_with_a_member_cut_off_from_its_leader_is_flat_with_one_line(
    partitioned_hosts,
):
    reports, _, stderr = run_rounds(partitioned_hosts, 1, {"tree_fan_in": 2}, env=KNOB)
    assert_rounds(reports, "flat")
    assert stderr.count(FALLBACK_LINE) == 1, stderr
    assert UNREACHABLE in stderr, stderr


def test_tree_with_a_member_cut_off_from_its_leader_names_both(partitioned_hosts):
    with HostRanks(
        partitioned_hosts, free_port(), ROUNDS, TIMEOUT, 5.0, 1,
        {"topology": "tree", "tree_fan_in": 2},
    ) as ranks:  # fmt: skip
        reports = ranks.collect("rounds", range(4), timeout=60)
    for rank in range(4):
        error = reports[rank]["error"]
        assert error is not None and error["type"] == "DistNetworkError", error
        assert "topology='tree' cannot be built" in error["message"], error
        assert UNREACHABLE in error["message"], error
