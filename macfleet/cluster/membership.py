"""Who is in the run: the `Membership` a node trains with, and `join` (the worker's way in).

Contract the trainer codes against::

    membership = join(cfg: ClusterConfig, fingerprint: dict, facts: dict, tensor_addr: str,
                      on_wait=None)          # worker; the master gets one from Coordinator
    membership.rank, .world_size, .generation, .addrs ("host:port" per rank), .weights (sum 1),
    membership.run (run_id, seed, ... chosen by the master), membership.nodes (facts per rank)
    membership.on_lost(callback)   # callback(PeerLostError), from the heartbeat thread
    membership.check()             # raises the PeerLostError if one was seen
    membership.report(step, samples_per_s, state="training")   # rides on heartbeats
    membership.log(line)           # forwarded to the master, printed as "[rank N host] line"
    membership.track(progress)     # progress() -> collectives this node has started
    membership.close(reason=None, settled=True)   # leave: the others hear a signed bye with the reason
    membership.peer_id, membership.running         # this node's id; True: it joined a run in progress
    membership.next_world(generation, timeout)     # elastic: the first announced generation after it
    membership.advance(world)                      # take that generation's rank, size, addresses, shares

Elastic runs: the master announces each generation (who is in, in rank order) on the heartbeat
answers. A departure of generation g reported after this node moved on to a later one is old
news and ignored; a gone record naming this node itself means the master dropped it
(NodeDroppedError: it was silent while the others went on).

A peer that leaves is a departure (`PeerLeftError`, "rank 1 left (Ctrl-C) ..."), reported as a
loss is. A peer that left with every collective it started completed (`settled`: the end of its
run, a Ctrl-C stop all ranks agreed on, an error between steps) says after how many, `n`; it
counts as gone here as soon as this node starts collective n+1, which that peer will never join.
So nodes that stop together never abort each other's last exchange, and a node that goes on
stops at its next one. A peer that left in the middle of a collective counts as gone at once.

`join` finds the master (``cfg.master_addr``, or zeroconf when ``cfg.discovery_enabled`` and
``master_addr`` is "" or "auto"), retries with a message until ``cfg.wait_timeout``, runs the
token challenge (protocol.py), sends its protocol version, config fingerprint, facts and data
address, and waits for the master's WELCOME. Its heartbeats are signed with the key both sides
derived from that challenge. ``facts["rank"]`` (optional) asks for a rank, so a
local fleet's ``cluster.weights`` line up with its processes. A ``tensor_addr`` whose host is ""
or 0.0.0.0 is filled with this node's address on the route to the master, so addresses work
across machines and namespaces.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import zmq

from macfleet.cluster.heartbeat import HeartbeatClient
from macfleet.cluster.protocol import (Complaints, client_handshake_keyed, decode, encode, make_socket,
                                       route_address, tcp)
from macfleet.config import PROTOCOL_VERSION, ClusterConfig
from macfleet.errors import FrameError, JoinRefusedError, MacFleetError, NodeDroppedError, PeerLeftError, PeerLostError

WaitCallback = Callable[[int, int, float], None]


def say(line: str) -> None:
    """Progress for a person watching a node wait (stderr, so stdout stays the job's)."""
    print(f"macfleet: {line}", file=sys.stderr, flush=True)


FINISHED = "finished its run"
"""The reason a node gives when it leaves at the normal end of its run."""


def leave_reason(exc: Optional[BaseException]) -> Optional[str]:
    """Why a node leaves, from the exception that ends it (None: it finished its run)."""
    if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
        return None
    if isinstance(exc, KeyboardInterrupt):
        return "Ctrl-C"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"stopped on {type(exc).__name__}{': ' + text if text else ''}"[:300]


@dataclass
class Membership:
    """One generation of the run as seen by one node (see the module docstring)."""

    rank: int
    world_size: int
    generation: int
    addrs: list
    weights: list
    run: dict
    nodes: list
    peer_id: str = "master"
    running: bool = False
    """This node joined a run already in progress (it takes the training state from the others)."""
    _link: Any = field(default=None, repr=False)
    _master_host: str = field(default="", repr=False)
    _worlds: list = field(default_factory=list, repr=False)
    _world_cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _lost_exc: Optional[PeerLostError] = field(default=None, repr=False)
    _callbacks: list = field(default_factory=list, repr=False)
    _progress: Callable[[], int] = field(default=lambda: 0, repr=False)
    _deferred: list = field(default_factory=list, repr=False)
    _closed: threading.Event = field(default_factory=threading.Event, repr=False)
    _watcher: Optional[threading.Thread] = field(default=None, repr=False)

    def on_lost(self, callback: Callable[[PeerLostError], None]) -> None:
        """Call `callback(exc)` from the heartbeat thread when a peer is lost (at once if already)."""
        with self._lock:
            self._callbacks.append(callback)
            exc = self._lost_exc
        if exc is not None:
            callback(exc)

    def check(self) -> None:
        """Raise the PeerLostError seen by the heartbeat thread, if any (non-blocking)."""
        if self._lost_exc is not None:
            raise self._lost_exc

    def report(self, step: int, samples_per_s: float, state: str = "training") -> None:
        """Progress shown by `macfleet status`; sent with the next heartbeat."""
        if self._link is not None:
            self._link.report(step=int(step), samples_per_s=float(samples_per_s), state=str(state))

    def log(self, line: str) -> None:
        """Forward a log or progress line to the master (rank 0 prints its own)."""
        if self._link is not None:
            self._link.log(self.rank, str(line))

    def track(self, progress: Callable[[], int]) -> None:
        """Where this node is: `progress()` counts the collectives it has started (see the module
        docstring); without it, a peer that finished is never a departure here."""
        self._progress = progress

    def close(self, reason: Optional[str] = None, settled: bool = True) -> None:
        """Leave, telling the others why in a signed bye: `reason` (e.g. "Ctrl-C"; None: this node
        finished its run) and, when `settled` (every collective it started has completed), after
        how many collectives (see the module docstring). Idempotent."""
        link, self._link = self._link, None
        self._closed.set()
        if link is not None:
            link.close(reason or FINISHED, self._progress() if settled else None)

    # -- generations (elastic runs) ----------------------------------------------------------
    def _world(self, world: dict) -> None:
        """A generation announced by the master (heartbeat thread)."""
        with self._world_cond:
            self._worlds.append(dict(world))
            self._world_cond.notify_all()

    def next_world(self, generation: int, timeout: float, give_up: Callable[[], Optional[BaseException]] = lambda: None
                   ) -> dict:
        """The newest announced generation after `generation`, waiting up to `timeout` s for one;
        `give_up()` returning an exception ends the wait with it (the master was lost)."""
        deadline = time.monotonic() + timeout
        with self._world_cond:
            while True:
                later = [w for w in self._worlds if w["generation"] > generation]
                if later:
                    return max(later, key=lambda w: w["generation"])
                exc = give_up()
                if exc is not None:
                    raise exc
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MacFleetError(
                        f"the master announced no generation after {generation} within {timeout:g} s after a node "
                        f"left; restart the run with trainer.resume=auto")
                self._world_cond.wait(min(left, 0.05))

    def advance(self, world: dict) -> None:
        """Take generation `world`: this node's new rank, the size, addresses and shares. Departures
        of earlier generations are forgotten (they are why this generation exists)."""
        if self.peer_id not in world["peers"]:
            raise NodeDroppedError(
                f"the master left this node out of generation {world['generation']} ({world.get('why') or 'no reason given'}); "
                f"start it again with the same command to rejoin the run", rank=self.rank)
        with self._lock:
            self.rank = world["peers"].index(self.peer_id)
            self.world_size = len(world["peers"])
            self.generation = int(world["generation"])
            self.addrs = [fill_host(a, self._master_host or "127.0.0.1") for a in world["addrs"]]
            self.weights = [float(w) for w in world["weights"]]
            self.nodes = list(world["nodes"])
            self._lost_exc = None
            self._deferred = []
            self._watcher = None  # a running one sees an empty list and keeps polling until close

    def _gone_record(self, record: dict, lost: PeerLostError, after: Optional[int] = None) -> None:
        """A departure reported by the master (worker side), filtered by generation."""
        generation = record.get("generation")
        if record.get("peer") == self.peer_id:
            self._peer_lost(NodeDroppedError(
                f"the master dropped this node from the run: {record['msg']}", rank=self.rank))
            return
        if generation is not None and generation < self.generation:
            return  # a departure of an earlier generation: the current one is already without it
        if isinstance(lost, PeerLeftError):
            self._peer_left(lost, after)
        else:
            self._peer_lost(lost)

    def _peer_left(self, exc: PeerLeftError, after: Optional[int]) -> None:
        """A peer said bye: a departure now, or once this node starts collective `after` + 1."""
        if after is None or self._progress() > after:
            self._peer_lost(exc)
            return
        with self._lock:
            self._deferred.append((after, exc))
            if self._watcher is not None:
                return
            self._watcher = threading.Thread(target=self._watch, name="macfleet-departures", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        # Polls a counter every 10 ms, only between a peer's last bye and this node's own close.
        while not self._closed.wait(0.01):
            with self._lock:
                due = [exc for after, exc in self._deferred if self._progress() > after]
            if due:
                self._peer_lost(due[0])
                with self._lock:
                    self._deferred = []

    def _peer_lost(self, exc: PeerLostError) -> None:
        with self._lock:
            if self._lost_exc is not None:
                return
            self._lost_exc = exc
            callbacks = list(self._callbacks)
        for cb in callbacks:
            try:
                cb(exc)
            except Exception as cb_exc:  # a broken callback must not kill the heartbeat thread
                say(f"on_lost callback failed: {cb_exc!r}")


class _WorkerLink:
    """A worker's threads after WELCOME: heartbeats, and a log sender owning the control socket."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, hb: HeartbeatClient):
        self._ctx = ctx
        self._hb = hb
        self._lines: queue.Queue = queue.Queue(maxsize=10000)
        # The join socket moves to this thread; a Thread start is the memory barrier zmq asks for.
        self._thread = threading.Thread(target=self._send_logs, args=(sock,), name="macfleet-log", daemon=True)
        self._thread.start()

    def report(self, **fields) -> None:
        self._hb.report(**fields)

    def log(self, rank: int, line: str) -> None:
        try:
            self._lines.put_nowait((rank, line))
        except queue.Full:
            pass  # the master is not keeping up; dropping a log line beats blocking training

    def close(self, reason: str, after: Optional[int]) -> None:
        self._lines.put(None)
        self._thread.join(timeout=5)
        self._hb.stop(reason, after)
        self._ctx.term()

    def _send_logs(self, sock: zmq.Socket) -> None:
        try:
            while True:
                item = self._lines.get()
                if item is None:
                    # Give queued lines a moment to leave; a dead master cannot hold close() longer.
                    sock.setsockopt(zmq.LINGER, 500)
                    return
                rank, line = item
                try:
                    sock.send(encode("log", rank=rank, line=line), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        finally:
            sock.close()


def _discover(cfg: ClusterConfig, timeout: float) -> list[tuple[str, int]]:
    from macfleet.cluster.discovery import browse

    found = []
    for svc in browse(cfg.name, timeout=timeout):
        for addr in svc.get("addresses", []):
            found.append((addr, int(svc["port"])))
    return found


def uses_discovery(cfg: ClusterConfig) -> bool:
    return bool(cfg.discovery_enabled) and str(cfg.master_addr or "").lower() in ("", "auto")


def fill_host(addr: str, host: str) -> str:
    """Put `host` into a "host:port" whose host is empty or a wildcard."""
    h, _, port = str(addr).rpartition(":")
    return f"{host}:{port}" if h in ("", "0.0.0.0", "*") else addr


def join(cfg: ClusterConfig, fingerprint: dict, facts: dict, tensor_addr: str,
         on_wait: Optional[WaitCallback] = None) -> Membership:
    """Join the master's run; see the module docstring. Raises JoinRefusedError or MacFleetError."""
    start = time.monotonic()
    deadline = start + cfg.wait_timeout
    attempt_timeout = max(1.0, min(3.0, 2 * cfg.heartbeat_interval))
    last_said = 0.0
    ctx = zmq.Context()
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                where = "by zeroconf" if uses_discovery(cfg) else f"at {cfg.master_addr}:{cfg.master_port}"
                raise MacFleetError(
                    f"found no MacFleet master {where} within cluster.wait_timeout={cfg.wait_timeout:g} s; "
                    f"start the master first (or check cluster.master_addr, the Thunderbolt link and "
                    f"the firewall), or raise cluster.wait_timeout")
            if uses_discovery(cfg):
                candidates = _discover(cfg, timeout=min(remaining, attempt_timeout))
            else:
                candidates = [(cfg.master_addr, cfg.master_port)]
            for host, port in candidates:
                result = _try_join(ctx, cfg, fingerprint, facts, tensor_addr, host, port,
                                   min(attempt_timeout, max(0.1, deadline - time.monotonic())), deadline,
                                   on_wait, start)
                if result is not None:
                    return result
            elapsed = time.monotonic() - start
            if on_wait is not None:
                on_wait(0, cfg.nodes, elapsed)
            elif time.monotonic() - last_said > 5.0 or last_said == 0.0:
                where = "by zeroconf" if uses_discovery(cfg) else f"at {cfg.master_addr}:{cfg.master_port}"
                say(f"no master {where} yet; retrying for {max(0.0, deadline - time.monotonic()):.0f} s more "
                    f"(cluster.wait_timeout={cfg.wait_timeout:g})")
                last_said = time.monotonic()
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    except BaseException:
        ctx.term()
        raise


def _try_join(ctx, cfg, fingerprint, facts, tensor_addr, host, port, timeout, deadline, on_wait, start):
    """One attempt at one master; None when it did not answer (the caller retries)."""
    sock = make_socket(ctx, zmq.DEALER, cfg.heartbeat_interval)
    sock.connect(tcp(host, port))
    handed_over = False
    try:
        my_addr = fill_host(tensor_addr, route_address(host))
        # A weight may come from the command line as text ("1.0"); the wire takes a number or "auto".
        weight = "auto" if str(cfg.weight) == "auto" else float(cfg.weight)
        payload = {"fingerprint": dict(fingerprint), "facts": dict(facts), "tensor_addr": my_addr,
                   "weight": weight, "proto": PROTOCOL_VERSION}
        try:
            answer, key = client_handshake_keyed(sock, cfg.token, cfg.name, "join", payload, timeout)
        except TimeoutError:
            return None
        if answer["t"] != "accepted":
            raise JoinRefusedError(f"unexpected answer {answer['t']!r} from the master")
        last_said = 0.0
        complain = Complaints("join")
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MacFleetError(
                    f"joined the master at {host}:{port} but the run did not start within "
                    f"cluster.wait_timeout={cfg.wait_timeout:g} s; start the missing nodes or lower "
                    f"the master's cluster.nodes")
            if sock.poll(int(min(remaining, 1.0) * 1000), zmq.POLLIN):
                try:
                    msg = decode(sock.recv(), ("welcome", "refuse", "error", "accepted"))
                except FrameError as exc:
                    complain("malformed message from the master", str(exc))
                    continue
                if msg["t"] in ("refuse", "error"):
                    raise JoinRefusedError(msg["reason"])
                if msg["t"] == "accepted":
                    answer = msg
                    continue
                membership = _welcome(ctx, sock, cfg, host, msg, key)
                handed_over = True
                return membership
            joined, expected = int(answer.get("joined", 0)), int(answer.get("expected", cfg.nodes))
            if on_wait is not None:
                on_wait(joined, expected, time.monotonic() - start)
            elif time.monotonic() - last_said > 5.0:
                say(f"joined the master at {host}:{port}; " + (
                    "the run is in progress: this node joins it at its next step boundary" if answer.get("running")
                    else f"waiting for the run to start ({joined} of {expected} nodes so far)"))
                last_said = time.monotonic()
    finally:
        if not handed_over:
            sock.close(0)


def _welcome(ctx, sock, cfg: ClusterConfig, host: str, msg: dict, key: bytes) -> Membership:
    rank = int(msg["rank"])
    addrs = [fill_host(a, host) for a in msg["addrs"]]
    membership = Membership(rank=rank, world_size=int(msg["world_size"]), generation=int(msg["generation"]),
                            addrs=addrs, weights=[float(w) for w in msg["weights"]], run=dict(msg["run"]),
                            nodes=list(msg["nodes"]), peer_id=str(msg["peer_id"]), running=bool(msg.get("running")),
                            _master_host=host)

    def lost(text: str) -> None:
        membership._peer_lost(PeerLostError(text, rank=0, address=f"{host}:{cfg.master_port}"))

    def gone(record: dict) -> None:
        peer = record.get("rank")
        addr = addrs[peer] if peer is not None and peer < len(addrs) else None
        if record["kind"] == "lost":
            membership._gone_record(record, PeerLostError(record["msg"], rank=peer, address=addr))
        else:
            membership._gone_record(record, PeerLeftError(record["msg"], rank=peer, address=addr,
                                                          reason=record.get("reason", "")), record.get("after"))

    hb = HeartbeatClient(ctx, host, int(msg["hb_port"]), str(msg["peer_id"]), cfg.heartbeat_interval, lost,
                         key=key, on_gone=gone, on_world=membership._world)
    hb._world_generation = membership.generation  # the generation it joined is not news
    hb.start()
    membership._link = _WorkerLink(ctx, sock, hb)
    return membership
