"""Bad input: rejected before any socket is opened, with messages that name
the argument and the value; unreachable stores: clear errors, in bounded time.

Host names that do not resolve, and the property-based test (arbitrary
values for every argument), run in a worker process alone in a network
namespace of its own, so that no lookup or connection leaves it.
"""

from __future__ import annotations

import math
import socket
import threading
import time

import pytest
import torch.distributed as dist
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import LOOPBACK, free_port, netns
from support.barriers import barrier_arguments
from torch.distributed import DistNetworkError

from tcpstore_barrier import TCPStoreBarrier

ARGUMENTS = (
    "global_rank",
    "global_world_size",
    "barrier_prefix",
    "timeout_barrier_init_secs",
    "use_checkpoint_barrier_tcpstore_libuv",
    "tcpstore_port",
    "master_address",
    "timeout_secs",
)
# Rejected arguments must be rejected without touching the network.
REJECTED_WITHIN = 0.5


def host_arguments(port, **overrides):
    """Valid arguments of a one-rank barrier that hosts its store on `port`:
    whatever is wrong with a call comes from `overrides` alone."""
    return {**barrier_arguments(0, 1, port, init=5, timeout=5), **overrides}


def listens(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((LOOPBACK, port)) == 0


def renderings(value):
    """Ways a message may spell `value`."""
    forms = {repr(value), str(value)}
    if isinstance(value, float):
        forms.add(f"{value:g}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        forms.add(f"{float(value):g}")
    return forms


def assert_rejected(error_type, port, name, value, expected_text=None):
    start = time.monotonic()
    with pytest.raises(error_type) as caught:
        TCPStoreBarrier(**host_arguments(port, **{name: value}))
    elapsed = time.monotonic() - start
    message = str(caught.value)
    assert name in message, message
    if expected_text is None:
        assert any(form in message for form in renderings(value)), message
    else:
        assert expected_text in message, message
    assert elapsed < REJECTED_WITHIN
    assert not listens(port), "a rejected call left a socket listening"


# --- values out of range: ValueError -----------------------------------------

OUT_OF_RANGE = [
    ("global_rank", -1),
    ("global_rank", 1),  # world size 1
    ("global_rank", 7),
    ("global_rank", 2**70),
    ("global_world_size", 0),
    ("global_world_size", -3),
    ("tcpstore_port", 0),
    ("tcpstore_port", -1),
    ("tcpstore_port", 65536),
    ("tcpstore_port", 70000),
    ("tcpstore_port", 2**64),
]
BAD_SECONDS = [-1, -0.5, math.nan, math.inf, -math.inf, 1e300, 10**12]


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE)
def test_out_of_range_value_is_rejected_naming_argument_and_value(port, name, value):
    assert_rejected(ValueError, port, name, value)


@pytest.mark.parametrize("name", ["timeout_secs", "timeout_barrier_init_secs"])
@pytest.mark.parametrize("value", BAD_SECONDS, ids=repr)
def test_bad_timeout_is_rejected_naming_argument_and_value(port, name, value):
    assert_rejected(ValueError, port, name, value)


def test_empty_master_address_is_rejected(port):
    assert_rejected(ValueError, port, "master_address", "", expected_text="empty")


# --- wrong types: TypeError --------------------------------------------------

WRONG_TYPES = [
    ("global_rank", "1"),
    ("global_rank", 1.5),
    ("global_rank", 0.0),
    ("global_rank", None),
    ("global_world_size", "2"),
    ("global_world_size", 2.0),
    ("global_world_size", None),
    ("barrier_prefix", 5),
    ("barrier_prefix", None),
    ("barrier_prefix", b"ckpt"),
    ("barrier_prefix", ["ckpt"]),
    ("timeout_barrier_init_secs", "5"),
    ("timeout_barrier_init_secs", None),
    ("use_checkpoint_barrier_tcpstore_libuv", None),
    ("use_checkpoint_barrier_tcpstore_libuv", "yes"),
    ("tcpstore_port", "29500"),
    ("tcpstore_port", 29500.0),
    ("tcpstore_port", None),
    ("master_address", None),
    ("master_address", b"127.0.0.1"),
    ("master_address", 127),
    ("timeout_secs", "5"),
    ("timeout_secs", None),
    ("timeout_secs", [5]),
]


@pytest.mark.parametrize(("name", "value"), WRONG_TYPES, ids=repr)
def test_wrong_type_is_rejected_naming_argument_and_value(port, name, value):
    assert_rejected(TypeError, port, name, value)


@pytest.mark.parametrize("name", ["barrier_prefix", "master_address"])
def test_unencodable_string_is_rejected_naming_the_argument(port, name):
    assert_rejected((ValueError, TypeError), port, name, "ckpt\ud800")


# --- unreachable stores ------------------------------------------------------


@pytest.mark.parametrize(
    "occupier", [LOOPBACK, "0.0.0.0"], ids=["same-address", "wildcard"]
)
def test_taken_port_on_rank0_is_a_clear_error_naming_the_port(port, occupier):
    with socket.socket() as taken:
        taken.bind((occupier, port))
        taken.listen()
        start = time.monotonic()
        with pytest.raises(DistNetworkError) as caught:
            TCPStoreBarrier(**host_arguments(port))
        elapsed = time.monotonic() - start
    message = str(caught.value)
    assert str(port) in message
    assert "in use" in message
    assert elapsed < REJECTED_WITHIN


def joining_arguments(port, init, master_address=LOOPBACK):
    """Rank 1 of 2, joining a store at `master_address:port`."""
    return dict(
        host_arguments(port, global_rank=1, global_world_size=2),
        timeout_barrier_init_secs=init,
        master_address=master_address,
    )


def test_refused_connection_is_a_clear_error_naming_host_and_port(port):
    init = 2
    start = time.monotonic()
    with pytest.raises(DistNetworkError) as caught:
        TCPStoreBarrier(**joining_arguments(port, init))
    elapsed = time.monotonic() - start
    assert f"{LOOPBACK}:{port}" in str(caught.value)
    assert "timeout_barrier_init_secs" in str(caught.value)
    # Gives up: never sooner than asked, never without bound (the tight bound
    # is the next test's).
    assert init - 0.05 <= elapsed <= 3 * init + 1


def test_refused_connection_gives_up_within_half_a_second_of_init_timeout():
    init, attempts = 1.0, 6
    elapsed = []

    def attempt():
        start = time.monotonic()
        try:
            TCPStoreBarrier(**joining_arguments(free_port(), init))
        except DistNetworkError:
            elapsed.append(time.monotonic() - start)

    threads = [threading.Thread(target=attempt) for _ in range(attempts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(elapsed) == attempts
    assert max(elapsed) <= init + 0.5, sorted(elapsed)


# --- in a namespace of its own: names that do not resolve, arbitrary values ---


@pytest.fixture(scope="module")
def isolated():
    reason = netns.isolation_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    worker = netns.IsolatedWorker()
    worker.start()
    yield worker
    worker.close()


UNRESOLVABLE = "no-such-host.invalid"


def test_unresolvable_master_address_on_rank0_fails_at_once(isolated):
    outcome = isolated.call(
        host_arguments(free_port(), master_address=UNRESOLVABLE), timeout=10
    )
    assert outcome["outcome"] == "raised"
    assert outcome["type"] == "DistNetworkError"
    assert UNRESOLVABLE in outcome["message"]
    assert "resolve" in outcome["message"]
    assert outcome["elapsed"] < REJECTED_WITHIN


def test_unresolvable_master_address_on_joining_rank_fails_in_bounded_time(isolated):
    init = 1.0
    outcome = isolated.call(
        joining_arguments(free_port(), init, UNRESOLVABLE), timeout=15
    )
    assert outcome["outcome"] == "raised"
    assert outcome["dist_error"], outcome
    assert UNRESOLVABLE in outcome["message"]
    assert outcome["elapsed"] <= 3 * init + 1


def test_unresolvable_master_address_on_joining_rank_says_so_within_init_timeout(
    isolated,
):
    init = 1.0
    outcome = isolated.call(
        joining_arguments(free_port(), init, UNRESOLVABLE), timeout=15
    )
    assert "resolve" in outcome["message"], outcome["message"]
    assert outcome["elapsed"] <= init + 0.5


# Arbitrary values. Strings are valid UTF-8 here: lone surrogates are the
# known failure above.
ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=24),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.sampled_from(["", "0", "-1", "nan", "127.0.0.1", "\x00", " ", "x" * 300]),
)
NUMBERS = (int, float)


def _short_wait(value):
    """A valid init timeout longer than 0.5 s may legitimately be waited out
    against an unreachable store; the property is about everything else, so
    such values are scaled down into (0, 0.5]."""
    if (
        isinstance(value, NUMBERS)
        and not isinstance(value, bool)
        and 0.5 < value <= 365 * 24 * 3600
    ):
        return value / (2 * 365 * 24 * 3600)
    return value


# Values of the right type for each argument, in and out of range.
IN_DOMAIN = {
    "global_rank": st.integers(-2, 4),
    "global_world_size": st.integers(-2, 4),
    "barrier_prefix": st.text(max_size=40),
    "timeout_barrier_init_secs": st.one_of(
        st.floats(-1, 0.5), st.sampled_from([math.nan, math.inf, 1e300, 10**9])
    ),
    "use_checkpoint_barrier_tcpstore_libuv": st.booleans(),
    "tcpstore_port": st.one_of(st.integers(-2, 70000), st.just("LIVE")),
    "master_address": st.sampled_from(
        ["127.0.0.1", "localhost", "::1", "0.0.0.0", "10.9.8.7", UNRESOLVABLE, ""]
    ),
    "timeout_secs": st.one_of(
        st.floats(-1, 5), st.sampled_from([math.nan, -math.inf, 1e300, 10**9])
    ),
}


# An unreachable store may take init timeout (<= 0.5 s here) plus c10d's
# overshoot (see above); a rank 0 waits whole seconds for its peers.
NEVER_HANGS = 6.0


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_arbitrary_arguments_construct_or_raise_a_documented_error_quickly(
    isolated, data
):
    """Rank 1 of 2 joining the worker's live store, with one to three of the
    arguments replaced by arbitrary values: it never crashes or hangs, and
    either constructs or raises ValueError/TypeError (naming an argument it
    was given) or a DistError."""
    count = data.draw(st.integers(1, 3), label="how many replaced")
    names = data.draw(st.permutations(ARGUMENTS), label="replaced")[:count]
    overrides = {}
    for name in names:
        anything = data.draw(st.integers(0, 2), label=f"{name} is arbitrary") == 0
        value = data.draw(ANYTHING if anything else IN_DOMAIN[name], label=name)
        if name == "timeout_barrier_init_secs":
            value = _short_wait(value)
        overrides[name] = value
    arguments = dict(
        host_arguments(isolated.live_port, global_rank=1, global_world_size=2),
        timeout_barrier_init_secs=0.2,
        timeout_secs=1,
    )
    arguments.update(overrides)
    if arguments["tcpstore_port"] == "LIVE":
        arguments["tcpstore_port"] = isolated.live_port
    try:
        outcome = isolated.call(arguments, timeout=NEVER_HANGS)
    except netns.WorkerHung:
        pytest.fail(f"the constructor hung (> {NEVER_HANGS} s) on {arguments!r}")
    except netns.WorkerDied as e:
        pytest.fail(
            f"the constructor crashed the process on {arguments!r}: {e}\n"
            f"{isolated.stderr_tail()}"
        )
    event(outcome["outcome"] + " " + outcome.get("type", ""))
    if outcome["outcome"] == "constructed":
        return
    if outcome["value_or_type_error"]:
        assert outcome["elapsed"] < REJECTED_WITHIN
        assert any(name in outcome["message"] for name in overrides), outcome
    else:
        assert outcome["dist_error"], outcome


# --- a tree's arguments: topology, host, tree_fan_in --------------------------

TREE_OUT_OF_RANGE = [
    ("topology", "ring"),
    ("topology", ""),
    ("topology", "Tree"),
    ("tree_fan_in", 1),
    ("tree_fan_in", 0),
    ("tree_fan_in", -4),
    ("tree_fan_in", 2**70),
]


@pytest.mark.parametrize(("name", "value"), TREE_OUT_OF_RANGE, ids=repr)
def test_bad_tree_argument_is_rejected_naming_argument_and_value(port, name, value):
    assert_rejected(ValueError, port, name, value)


def test_empty_host_is_rejected(port):
    assert_rejected(ValueError, port, "host", "", expected_text="empty")


TREE_WRONG_TYPES = [
    ("tree_fan_in", "16"),
    ("tree_fan_in", 16.0),
    ("tree_fan_in", None),
    ("host", 5),
    ("host", b"node0"),
    ("host", ["node0"]),
]


@pytest.mark.parametrize(("name", "value"), TREE_WRONG_TYPES, ids=repr)
def test_wrong_type_of_tree_argument_is_rejected_naming_argument_and_value(
    port, name, value
):
    assert_rejected(TypeError, port, name, value)


@pytest.mark.parametrize("topology", ["flat", "tree"])
def test_bad_tree_arguments_are_rejected_whatever_the_topology(port, topology):
    # A world of 1 never builds a tree: the arguments are still checked.
    start = time.monotonic()
    with pytest.raises(ValueError, match="tree_fan_in"):
        TCPStoreBarrier(**host_arguments(port, topology=topology, tree_fan_in=1))
    assert time.monotonic() - start < REJECTED_WITHIN
    assert not listens(port), "a rejected call left a socket listening"


@pytest.mark.parametrize("kind", ["HashStore", "FileStore"])
def test_a_tree_over_a_store_that_is_not_a_tcp_store_is_refused(kind, tmp_path):
    if kind == "FileStore":
        path = tmp_path / "store"
        store, contents = dist.FileStore(str(path), 1), path.read_bytes
    else:
        store = dist.HashStore()
        contents = store.num_keys
    before = contents()
    with pytest.raises(ValueError) as refused:
        TCPStoreBarrier.from_store(store, 0, 1, "ckpt", 30, topology="tree")
    message = str(refused.value)
    assert "topology" in message and "tree" in message, message
    assert "TCPStore" in message, message
    # Refused before anything reached the store.
    assert contents() == before


@pytest.mark.parametrize("value", [1, None, b"tree"], ids=repr)
def test_wrong_type_of_topology_is_rejected_naming_only_topology(port, value):
    assert_rejected(TypeError, port, "topology", value)
    with pytest.raises(TypeError) as caught:
        TCPStoreBarrier(**host_arguments(port, topology=value))
    # Said of topology alone, as for every other argument.
    assert "global_rank" not in str(caught.value), str(caught.value)
