"""Start N local ranks: on 127.0.0.1 with free ports, or (as root) inside network namespaces.

- `free_ports(n)`: n TCP ports free on 127.0.0.1 right now.
- `spawn_local(fn, world_size, args=(), timeout=..., netns=None)`: runs
  `fn(rank, world_size, addrs, *args)` in N real processes (multiprocessing "spawn", or
  "forkserver" with MACFLEET_START_METHOD=forkserver), returns their return values by rank; a rank that raises or exits non-zero, or a run past `timeout`,
  raises `RankFailedError` (with the survivors' results) after every straggler is killed.
- `Netns(n, rate=None)`: context manager making n network namespaces with addresses
  10.0.0.1..n: a veth pair for 2, and for more a bridge inside a namespace of its own (never in
  the host namespace); optional `tc tbf` shaping; `run()` a command inside; removed on exit.
  `spawn_local(..., netns=ns)` puts rank i in namespace i (the child joins it with setns before
  it opens any socket), so tensors cross a real interface.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import pickle
import queue
import random
import re
import socket
import subprocess
import time
import traceback
from pathlib import Path

from macfleet.errors import MacFleetError

CLONE_NEWNET = 0x40000000


class RankFailedError(MacFleetError):
    """One or more spawned ranks raised, exited non-zero or ran past the deadline."""

    def __init__(self, message: str, results: dict, failures: dict):
        super().__init__(message)
        self.results = results
        self.failures = failures


LOW_PORT = 20000
"""free_ports draws from LOW_PORT up to just below the OS's range for outgoing connections."""


def _ephemeral_floor() -> int:
    """The lowest port the OS gives outgoing connections as their source port (Linux:
    ip_local_port_range; elsewhere IANA's dynamic range, which macOS uses, from 49152)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free a moment ago (all bound at once, so they differ).

    Drawn below the range the OS takes outgoing connections' source ports from: a port that
    bind(0) returns lies in that range, so any connection opened before the port is used may
    take it ("Address already in use"; seen in CI, with tests opening connections side by side)."""
    rng = random.SystemRandom()
    top = _ephemeral_floor() - 1
    socks: list[socket.socket] = []
    try:
        for _ in range(50 * n if top > LOW_PORT + 10 * n else 0):
            if len(socks) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, rng.randint(LOW_PORT, top)))
            except OSError:  # taken, or still in TIME_WAIT: try another
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:  # no room below the range: what the OS picks
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def enter_netns(name: str) -> None:
    """Move the calling thread (and threads it starts later) into network namespace `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise MacFleetError(f"cannot enter network namespace {name}: {os.strerror(err)} (run as root)")
    finally:
        os.close(fd)


def _context() -> mp.context.BaseContext:
    """Where ranks start: "spawn", a fresh interpreter per rank. MACFLEET_START_METHOD=forkserver
    forks each rank from one server process that imported torch (and torch._dynamo, which the first
    optimizer imports) once: the test suite sets it, since every spawned rank otherwise pays those
    imports again (seconds each on 2 cores). The server keeps the environment it started with."""
    method = os.environ.get("MACFLEET_START_METHOD", "spawn")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch._dynamo", "macfleet.comm.group"])
    return ctx


def _child(fn, rank, world_size, addrs, args, results, netns_name):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        if netns_name:
            enter_netns(netns_name)
        import torch

        # Ranks share the machine's cores; one intra-op thread each keeps them from thrashing.
        torch.set_num_threads(1)
        value = fn(rank, world_size, addrs, *args)
        # Plain pickle (local IPC only, never the wire) copies tensors by value: torch's
        # shared-memory reducers would hand the parent fds that die with this process.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent with its traceback
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def spawn_local(fn, world_size: int, args: tuple = (), timeout: float = 120.0, *, netns: "Netns | None" = None,
                port: int | None = None, grace: float = 15.0) -> list:
    """Run fn(rank, world_size, addrs, *args) in world_size processes; return values by rank.

    Once a rank fails, the others get `grace` seconds to finish or report (they may be blocked
    on the lost rank), then they are killed.
    """
    if netns is not None:
        if netns.n < world_size:
            raise MacFleetError(f"{world_size} ranks need {world_size} namespaces, the Netns has {netns.n}")
        addrs = netns.addrs(port or 29500)
        names = netns.names
    else:
        addrs = [f"127.0.0.1:{p}" for p in free_ports(world_size)]
        names = [None] * world_size
    ctx = _context()
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, addrs, args, results, names[r]),
                         name=f"macfleet-rank{r}", daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, object] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    first_failure = None
    try:
        while len(got) + len(failures) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.2)
                (got if ok else failures)[rank] = pickle.loads(value) if ok else value
                continue
            except queue.Empty:
                pass
            for r, p in enumerate(procs):
                # A rank that died without reporting (killed, segfault) is a failure too.
                if r not in got and r not in failures and p.exitcode is not None:
                    with contextlib.suppress(queue.Empty):
                        while True:
                            rank, ok, value = results.get(timeout=0.2)
                            (got if ok else failures)[rank] = pickle.loads(value) if ok else value
                    if r not in got and r not in failures:
                        failures[r] = f"exited with code {p.exitcode} without reporting"
            if failures and first_failure is None:
                first_failure = time.monotonic()
            late = first_failure is not None and time.monotonic() > first_failure + grace
            if time.monotonic() > deadline or late:
                why = f"still running {grace:.0f} s after another rank failed" if late else f"still running after {timeout:.0f} s"
                for r in range(world_size):
                    if r not in got and r not in failures:
                        failures[r] = f"{why}: killed"
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not failures else 0.5)
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
    if failures:
        lines = "\n".join(f"  rank {r}: {why}" for r, why in sorted(failures.items()))
        raise RankFailedError(f"{len(failures)} of {world_size} ranks failed:\n{lines}", got, failures)
    return [got[r] for r in range(world_size)]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


_RATE_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "tbit": 1e12 / 8,
               "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}
BURST_S = 0.01
"""tbf's bucket holds this much time at the shaped rate: a fixed 1 MB let a 0.6 MB exchange
cross a 100 Mbit link at the veth's full speed after any idle moment, so small messages looked
as fast as on an unshaped link."""
MIN_BURST_BYTES = 16 * 1024


def rate_bytes_per_s(rate: str) -> float:
    """tc's rate syntax ("1gbit", "250mbit", "500kbit", "10mbps" = bytes) in bytes per second."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*", str(rate).lower())
    if not m or m.group(2) not in _RATE_UNITS or float(m.group(1)) <= 0:
        raise MacFleetError(f"rate {rate!r}: give a link rate as tc writes it, e.g. 1gbit, 250mbit or 500kbit")
    return float(m.group(1)) * _RATE_UNITS[m.group(2)]


def tbf_burst(rate: str) -> int:
    """tbf's burst in bytes for `rate`: BURST_S of traffic, at least MIN_BURST_BYTES."""
    return max(MIN_BURST_BYTES, int(rate_bytes_per_s(rate) * BURST_S))


class Netns:
    """n network namespaces with 10.0.0.1..n on one link (veth, or a bridge in its own namespace)."""

    def __init__(self, n: int, *, rate: str | None = None, prefix: str = "mf-comm"):
        if os.geteuid() != 0:
            raise MacFleetError("network namespaces need root; run as root or drop --netns")
        if not 2 <= n <= 250:
            raise MacFleetError(f"Netns needs 2..250 namespaces, got {n}")
        self.n = n
        if rate is not None:
            tbf_burst(rate)  # a malformed rate is a clear error before any namespace exists
        self.rate = rate
        tag = f"{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self.names = [f"{prefix}-{tag}-{i + 1}" for i in range(n)]
        self.bridge_ns = f"{prefix}-{tag}-br" if n > 2 else None
        self._short = f"{os.getpid() % 100000}{int(time.time()) % 100}"
        # Namespace i's link to the others (GLOO_SOCKET_IFNAME): a veth pair, or a veth to the bridge.
        self.devs = [f"mfa{self._short}", f"mfb{self._short}"] if n == 2 else \
            [f"mfi{self._short}{i}" for i in range(n)]

    def addrs(self, port: int) -> list[str]:
        return [f"10.0.0.{i + 1}:{port}" for i in range(self.n)]

    def __enter__(self) -> "Netns":
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        for name in self.names + ([self.bridge_ns] if self.bridge_ns else []):
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        if self.bridge_ns is None:
            a, b = self.devs
            _ip("link", "add", a, "netns", self.names[0], "type", "veth", "peer", "name", b, "netns", self.names[1])
            self._up(0, a)
            self._up(1, b)
            return
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            inner, outer = self.devs[i], f"mfo{self._short}{i}"
            _ip("link", "add", inner, "netns", name, "type", "veth", "peer", "name", outer, "netns", self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "set", outer, "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", outer, "up")
            self._up(i, inner)

    def _up(self, i: int, dev: str) -> None:
        ns = self.names[i]
        _ip("-n", ns, "addr", "add", f"10.0.0.{i + 1}/24", "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")
        if self.rate:
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                            self.rate, "burst", str(tbf_burst(self.rate)), "latency", "50ms"], check=True,
                           capture_output=True, text=True)

    def run(self, i: int, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run a command inside namespace i (0-based)."""
        return subprocess.run(["ip", "netns", "exec", self.names[i], *cmd], **kwargs)

    def close(self) -> None:
        # Deleting a namespace deletes the veth ends inside it, and with them their peers.
        for name in self.names + ([self.bridge_ns] if self.bridge_ns else []):
            _ip("netns", "del", name, check=False)
