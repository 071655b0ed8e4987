"""Private network namespaces for the tests, and the programs run inside them.

* ``Hosts``: N hosts, each a network namespace with one veth link to a
  bridge in a switch namespace of its own (10.x addresses exist only inside
  these namespaces). Links can be impaired (netem) or cut. ``HostRanks``
  runs one rank per host, each reporting JSON lines.
* ``IsolatedWorker``: a process in an anonymous namespace of its own
  (``unshare --net``, only its own loopback) that runs constructor calls on
  request, so that arbitrary host names and ports reach nothing outside it.
  It hosts a store of its own that valid arguments can join.

As a script, run from tests/: ``python -m support.netns rank ...`` (one rank
of a HostRanks) or ``python -m support.netns worker`` (the isolated
worker's loop).
"""

from __future__ import annotations

import json
import os
import pickle
import queue as queue_module
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from support.barriers import our_barrier, timed_round

TESTS = Path(__file__).resolve().parents[1]


def _run(*argv, check=True):
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def _why_not(*argv):
    """None if the command runs, else what it said."""
    if shutil.which(argv[0]) is None:
        return f"{argv[0]} is not installed"
    try:
        done = _run(*argv, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if done.returncode != 0:
        return (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"
    return None


def unique_token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(3)}"


def netns_unavailable_reason():
    """None if this process may create network namespaces with veth links
    and a bridge; otherwise why not."""
    probe = f"tsb-probe-{unique_token()}"
    reason = _why_not("ip", "netns", "add", probe)
    if reason is not None:
        return f"`ip netns add` is not permitted here: {reason}"
    try:
        for argv in (
            ("ip", "-n", probe, "link", "add", "br0", "type", "bridge"),
            (
                "ip",
                "-n",
                probe,
                "link",
                "add",
                "v0",
                "type",
                "veth",
                "peer",
                "name",
                "v1",
            ),
        ):
            reason = _why_not(*argv)
            if reason is not None:
                return f"`{' '.join(argv)}` failed: {reason}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def netem_unavailable_reason(namespace, device):
    reason = _why_not(
        "tc",
        "-n",
        namespace,
        "qdisc",
        "add",
        "dev",
        device,
        "root",
        "netem",
        "delay",
        "1ms",
    )
    if reason is not None:
        return f"the kernel has no netem qdisc (sch_netem): {reason}"
    _run("tc", "-n", namespace, "qdisc", "del", "dev", device, "root", check=False)
    return None


class Hosts:
    """`count` hosts on one bridged subnet, each in its own namespace."""

    def __init__(self, count, subnet="10.213.7", ipv6=None):
        token = unique_token()
        self.switch = f"tsb-sw-{token}"
        self.names = [f"tsb-h{i}-{token}" for i in range(count)]
        self.addresses = [f"{subnet}.{i + 1}" for i in range(count)]
        # `ipv6`: a ULA /64 prefix such as "fd00:213:7:": each host gets ::i+1.
        self.addresses6 = [f"{ipv6}:{i + 1}" for i in range(count)] if ipv6 else []
        self._created = []
        self._etc = []

    def write_hosts_file(self, i, text):
        """Host i's /etc/hosts: `ip netns exec` mounts /etc/netns/NAME/hosts
        over /etc/hosts (the namespaces share this machine's hostname)."""
        etc = Path("/etc/netns") / self.names[i]
        etc.mkdir(parents=True, exist_ok=True)
        self._etc.append(etc)
        (etc / "hosts").write_text(text)

    def add_address(self, i, address, device="eth0"):
        """One more address on host i (`address` with its prefix length)."""
        _run("ip", "-n", self.names[i], "addr", "add", address, "dev", device)

    def route(self, i, *route):
        """`ip route add ROUTE...` on host i."""
        _run("ip", "-n", self.names[i], "route", "add", *route)

    def create(self):
        sw = self.switch
        self._add(sw)
        _run("ip", "-n", sw, "link", "set", "lo", "up")
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        for i, (ns, address) in enumerate(zip(self.names, self.addresses, strict=True)):
            self._add(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run(
                "ip",
                "-n",
                sw,
                "link",
                "add",
                f"p{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            _run("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0")
            _run("ip", "-n", sw, "link", "set", f"p{i}", "up")
            _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            if self.addresses6:
                _run(
                    "ip", "-n", ns, "addr", "add", f"{self.addresses6[i]}/64",
                    "dev", "eth0", "nodad",
                )  # fmt: skip
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
        return self

    def _add(self, ns):
        _run("ip", "netns", "add", ns)
        self._created.append(ns)

    def impair(self, *netem):
        """Adds `netem` (e.g. "delay", "2ms", "loss", "1%") to every host's link."""
        for ns in self.names:
            _run("tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "netem", *netem)

    def cut(self, i):
        """Takes host i off the network: its switch port goes down."""
        _run("ip", "-n", self.switch, "link", "set", f"p{i}", "down")

    def restore(self, i):
        """Puts host i back on the network: its switch port comes up again.
        Its connections were never closed, so TCP resumes them, if they
        outlived the stall."""
        _run("ip", "-n", self.switch, "link", "set", f"p{i}", "up")

    def listening_addresses(self, i):
        """The local addresses of host i's listening TCP sockets."""
        out = _run("ip", "netns", "exec", self.names[i], "ss", "-tlnH").stdout
        # Each line: State Recv-Q Send-Q Local-Address:Port Peer-Address:Port
        return sorted({line.split()[3].rsplit(":", 1)[0] for line in out.splitlines()})

    def unacknowledged_bytes(self, i, address, port):
        """What host i has sent (or queued) to address:port and not had
        acknowledged: the Send-Q of its established TCP connections there.
        None when it has no such connection left."""
        out = _run(
            "ip", "netns", "exec", self.names[i],
            "ss", "-tnH", "state", "established", "dst", f"{address}:{port}",
        ).stdout  # fmt: skip
        # Each line: Recv-Q Send-Q Local-Address:Port Peer-Address:Port
        queues = [int(line.split()[1]) for line in out.splitlines() if line.strip()]
        return sum(queues) if queues else None

    def await_unacknowledged(self, i, address, port, timeout):
        """Polls until host i has unacknowledged data in flight to
        address:port; returns when it was first seen."""
        deadline = time.monotonic() + timeout
        while not self.unacknowledged_bytes(i, address, port):
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"host {i} had nothing unacknowledged to {address}:{port} "
                    f"within {timeout} s"
                )
            time.sleep(0.02)
        return time.monotonic()

    def popen(self, i, argv, **kwargs):
        return subprocess.Popen(["ip", "netns", "exec", self.names[i], *argv], **kwargs)

    def destroy(self):
        for ns in reversed(self._created):
            _run("ip", "netns", "del", ns, check=False)
        self._created.clear()
        for etc in self._etc:
            shutil.rmtree(etc, ignore_errors=True)
        self._etc.clear()


# --- one rank per host --------------------------------------------------------


class HostRanks:
    """`ranks_per_host` rank processes per host (``rank_main`` below), ranks
    numbered host by host, reporting JSON lines; rank 0's host hosts the
    store. `options`: more keyword arguments of the barrier."""

    def __init__(
        self, hosts, port, rounds, timeout, peer_timeout="off",
        ranks_per_host=1, options=None, master_address=None, env=None,
        rank_options=None,
    ):  # fmt: skip
        self.events = queue_module.Queue()
        self.logs = []
        self.procs = []
        world_size = len(hosts.names) * ranks_per_host
        for rank in range(world_size):
            log = tempfile.TemporaryFile()
            self.logs.append(log)
            argv = [
                sys.executable, "-m", "support.netns", "rank", rank, world_size,
                master_address or hosts.addresses[0], port, rounds, timeout,
                peer_timeout,
                json.dumps({**(options or {}), **(rank_options or {}).get(rank, {})}),
            ]  # fmt: skip
            proc = hosts.popen(
                rank // ranks_per_host,
                [str(a) for a in argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=TESTS,
                env={**os.environ, **(env or {})},
            )
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _read(self, proc):
        for line in proc.stdout:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                pass

    def collect(self, event, ranks, timeout):
        """The `event` report of each of `ranks`, by rank."""
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

    def signal(self, ranks, signum):
        """Sends `signum` to the processes of `ranks`, all at once."""
        for rank in ranks:
            os.kill(self.procs[rank].pid, signum)

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


def _emit(**event):
    print(json.dumps(event), flush=True)


def rank_main(
    rank, world_size, master_address, port, rounds, timeout, peer_timeout, options
):
    """Constructs, runs `rounds` timestamped barriers, reports them; then on
    "go" from stdin one more barrier, reporting how it ended.

    Options of the tests, not of the barrier: "torch_class" (run torch's
    Python TCPStoreBarrier), "from_store" (our barrier over a torch TCPStore
    that rank 0 hosts, listening on every address as torchrun's does),
    "init" (timeout_barrier_init_secs). A constructor that raises is
    reported as the rounds' event with an "error"."""
    options = dict(options)
    init = options.pop("init", 60)
    try:
        if options.pop("torch_class", False):
            from support.barriers import torch_barrier

            barrier = torch_barrier(
                rank, world_size, port, init=init, timeout=timeout,
                master_address=master_address,
            )  # fmt: skip
        elif options.pop("from_store", False):
            from datetime import timedelta

            import torch.distributed as dist

            from tcpstore_barrier import TCPStoreBarrier

            store = dist.TCPStore(
                master_address, port, world_size, is_master=rank == 0,
                timeout=timedelta(seconds=init), wait_for_workers=False,
            )  # fmt: skip
            barrier = TCPStoreBarrier.from_store(
                store, rank, world_size, "ckpt", init,
                peer_timeout_secs=peer_timeout, **options,
            )  # fmt: skip
        else:
            barrier = our_barrier(
                rank, world_size, port, init=init, timeout=timeout,
                master_address=master_address,
                options={"peer_timeout_secs": peer_timeout, **options},
            )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - reported to the test
        from support.barriers import describe

        _emit(event="rounds", rank=rank, error=describe(e))
        return
    stamps = []
    for _ in range(rounds):
        entered = time.monotonic()
        barrier.execute_barrier()
        stamps.append((entered, time.monotonic()))
    _emit(
        event="rounds", rank=rank, stamps=stamps, sequence=barrier.sequence,
        topology=getattr(barrier, "topology", "torch"),
        tree_levels=getattr(barrier, "tree_levels", 1), error=None,
    )  # fmt: skip

    if sys.stdin.readline().strip() != "go":
        return
    _emit(event="last", rank=rank, **timed_round(barrier))
    # The shutdown rule: rank 0 keeps the store up until the others have
    # closed (or timeout_secs), so that a survivor still naming the missing
    # ranks does not lose the store under it.
    barrier.close()


# --- the isolated constructor worker -----------------------------------------


class WorkerDied(Exception):
    pass


class WorkerHung(Exception):
    pass


def _write_frame(stream, obj):
    data = pickle.dumps(obj)
    stream.write(struct.pack("!I", len(data)) + data)
    stream.flush()


def _read_exact(fd, size, deadline):
    chunks, got = [], 0
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WorkerHung
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            raise WorkerHung
        chunk = os.read(fd, size - got)
        if not chunk:
            raise WorkerDied
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_frame(fd, deadline):
    (size,) = struct.unpack("!I", _read_exact(fd, 4, deadline))
    return pickle.loads(_read_exact(fd, size, deadline))


def isolation_unavailable_reason():
    reason = _why_not("unshare", "--net", "true")
    if reason is not None:
        return f"cannot make a private network namespace (unshare --net): {reason}"
    return None


class IsolatedWorker:
    """Runs TCPStoreBarrier(**kwargs) in a process alone in its own network
    namespace; restarts it after a crash or hang."""

    def __init__(self, start_timeout=60.0):
        self._start_timeout = start_timeout
        self._proc = None
        self.live_port = None
        # What the worker printed, for a failing test to show.
        self.stderr = None

    def start(self):
        if self.stderr is None:
            self.stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [
                "unshare",
                "--net",
                "--",
                "sh",
                "-c",
                'ip link set lo up && exec "$0" -m support.netns worker',
                sys.executable,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            cwd=TESTS,
            start_new_session=True,
        )
        try:
            hello = _read_frame(
                self._proc.stdout.fileno(), time.monotonic() + self._start_timeout
            )
        except (WorkerHung, WorkerDied):
            self.stop()
            message = f"the worker did not start:\n{self.stderr_tail()}"
            raise WorkerDied(message) from None
        self.live_port = hello["live_port"]

    def stderr_tail(self, size=3000):
        if self.stderr is None:
            return ""
        self.stderr.seek(0, os.SEEK_END)
        self.stderr.seek(max(0, self.stderr.tell() - size))
        return self.stderr.read().decode(errors="replace")

    def call(self, kwargs, timeout):
        """The outcome dict of one constructor call; WorkerHung after
        `timeout` s, WorkerDied (with the exit status) if the process died."""
        if self._proc is None:
            self.start()
        try:
            _write_frame(self._proc.stdin, kwargs)
            return _read_frame(self._proc.stdout.fileno(), time.monotonic() + timeout)
        except WorkerHung:
            self.stop()
            raise
        except (WorkerDied, BrokenPipeError):
            code = self._proc.wait(timeout=10)
            self._close_pipes()
            self._proc = None
            raise WorkerDied(f"the worker died with exit status {code}") from None

    def _close_pipes(self):
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def stop(self):
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=10)
        self._close_pipes()
        self._proc = None

    def close(self):
        self.stop()
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None


def worker_main():
    # Frames go out on the original stdout; anything else printed goes to
    # stderr so it cannot corrupt them.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = os.fdopen(0, "rb")

    import socket
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed import DistError

    import tcpstore_barrier

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        live_port = s.getsockname()[1]
    live = dist.TCPStore(
        "127.0.0.1",
        live_port,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=30),
    )
    _write_frame(out, {"live_port": live_port})

    while True:
        header = requests.read(4)
        if len(header) < 4:
            break
        (size,) = struct.unpack("!I", header)
        kwargs = pickle.loads(requests.read(size))
        start = time.monotonic()
        try:
            barrier = tcpstore_barrier.TCPStoreBarrier(**kwargs)
        except BaseException as e:  # noqa: BLE001 - reported
            elapsed = time.monotonic() - start
            reply = {
                "outcome": "raised",
                "type": type(e).__name__,
                "value_or_type_error": isinstance(e, (ValueError, TypeError)),
                "dist_error": isinstance(e, DistError),
                "message": str(e)[:4000],
            }
        else:
            elapsed = time.monotonic() - start
            reply = {"outcome": "constructed", "sequence": barrier.sequence}
            barrier.close()
        reply["elapsed"] = elapsed
        _write_frame(out, reply)
    del live


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker_main()
    elif sys.argv[1] == "rank":
        rank, world_size, master_address, port, rounds, timeout, peer = sys.argv[2:9]
        options = json.loads(sys.argv[9])
        rank_main(
            int(rank),
            int(world_size),
            master_address,
            int(port),
            int(rounds),
            float(timeout),
            None if peer == "off" else float(peer),
            options,
        )
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
