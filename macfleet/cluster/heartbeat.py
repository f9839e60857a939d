"""Liveness and departures: application heartbeats on their own sockets and threads.

ZeroMQ hides a killed peer (it quietly reconnects) and a stopped (SIGSTOP) process or a downed
link gives no socket event at all, so liveness is decided here by heartbeats with a deadline,
never by socket state. Heartbeats have their own sockets and threads so that a long transfer or
a long backward pass on the data plane never looks like a dead node.

Timing, with ``interval = cluster.heartbeat_interval``: a node sends a heartbeat every
``interval / 2`` and the master answers each one; a side that hears nothing for
``LOST_AFTER * interval`` (1.75x) declares the other lost. The deadline is checked every
``interval / 20``, so a killed or stopped node is reported within 2x the interval while still
tolerating three missed heartbeats in a row.

A node that leaves on purpose says "bye" with its reason (Ctrl-C, an error, the end of its run)
and is a departure at once, not a silence: the master hears it and tells every other node.
A bye that ends a run normally carries ``after``, the number of collectives its sender
completed; the others treat it as a departure only once they need a collective past that one
(membership.py), so nodes that finish together never abort each other's last exchange.

`HeartbeatServer` (master): a ROUTER thread that tracks every expected peer, answers heartbeats
(answers carry the peers already gone, lost or left, so every worker stops too), calls
``on_lost(peer_id, message)`` once per lost peer and ``on_left(peer_id, record)`` once per peer
that said bye (record: rank, kind "left", msg, reason, after), and says bye itself when stopped. `HeartbeatClient` (node): a DEALER thread
that sends heartbeats with the node's progress (`report`) and its thermal pressure level (read
at every heartbeat, never waiting on a command: macos.thermal_level), reports the master's
silence, its bye and the peers it reports gone, and says bye when stopped. The server keeps each
peer's last level for `macfleet status` and logs one line when a peer enters or leaves heavy
thermal pressure or worse (macos.thermal_change).

Elastic runs (coordinator.py): the master's answers also carry the run's current generation
(`set_world`: who is in, in rank order, their data addresses and shares); a node hears each new
one through ``on_world(world)``. Each gone record names its ``peer`` and the ``generation`` it
left, so a record of an earlier generation is not news to a node already in a later one, and a
node that finds itself in the table (it was silent, e.g. frozen, while the others went on) learns
it was dropped. A node whose own thread was suspended (SIGSTOP, a sleeping laptop) does not
blame the master for the silence it slept through: it sends at once and waits a deadline anew.

Peers are known by the ``peer`` id inside each message, never by their socket's routing id.
With a session key (protocol.session_key, from the node's join) every message is signed, in
each direction, and carries a counter that must grow: a forged or replayed heartbeat or bye is
rejected and logged (rate-limited), and changes nothing. Peers registered without a key (the
agents) send unsigned messages as before.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

import zmq

from macfleet.cluster.macos import thermal_change, thermal_level
from macfleet.cluster.protocol import (THERMAL_LEVELS, Complaints, bind, decode, encode, make_socket, sign, tcp,
                                       verify)
from macfleet.errors import FrameError

log = logging.getLogger("macfleet")

SUSPENDED_AFTER = 0.5
"""A node's heartbeat loop that did not come round for this many intervals was itself suspended."""
LOST_AFTER = 1.75
"""A peer silent for this many heartbeat intervals is lost (kept under the 2x promise)."""
TO_MASTER = b"node->master"
TO_NODE = b"master->node"
"""Signature directions: a message signed for one way is refused the other way."""
RESUME_ADVICE = ("the run cannot go on without it: restart that node, then every node with trainer.resume=auto "
                 "to continue from the last checkpoint")
ELASTIC_ADVICE = "the others go on without it; start it again with the same command to rejoin the run"


def _deadline(interval: float) -> float:
    return LOST_AFTER * interval


def left_message(who: str, reason: str, step: Optional[int], where: str, advice: str = RESUME_ADVICE) -> str:
    """"rank 1 left (Ctrl-C) at step 37 [node rank 1 (air, 10.0.0.2:50052)]; what to do"."""
    at = f" at step {step}" if step is not None else ""
    return f"{who} left ({reason}){at} [{where}]; {advice}"


def _frames(msg_type: str, key: Optional[bytes], direction: bytes, **fields) -> list:
    body = encode(msg_type, **fields)
    return sign(key, direction, body) if key is not None else [body]


class HeartbeatServer:
    """Master side: one thread, one ROUTER, a table of peers and their last heartbeat."""

    def __init__(self, ctx: zmq.Context, host: str, interval: float,
                 on_lost: Callable[[str, str], None], port: int = 0,
                 on_left: Optional[Callable[[str, dict], None]] = None, elastic: bool = False):
        self.interval = interval
        self.advice = ELASTIC_ADVICE if elastic else RESUME_ADVICE
        self.generation = 0
        self._world: Optional[dict] = None
        self._push = threading.Event()
        self._on_lost = on_lost
        self._on_left = on_left
        self._lock = threading.Lock()
        self._peers: dict[str, dict] = {}
        self._auth: dict[str, dict] = {}   # peer -> key, counters, routing id: never in snapshot()
        self._gone: dict[str, dict] = {}   # peer -> {"rank", "kind", "msg", "after"}
        self._stop = threading.Event()
        self._bye: dict = {}
        self._ctx = ctx
        self._host = host
        self._want_port = port
        self._bound = threading.Event()
        self._bind_error: Optional[Exception] = None
        self._complain = Complaints("heartbeat server")
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="macfleet-heartbeat-server", daemon=True)

    def start(self) -> int:
        self._thread.start()
        self._bound.wait()
        if self._bind_error is not None:
            raise self._bind_error
        return self.port

    def expect(self, peer_id: str, label: str, key: Optional[bytes] = None, rank: Optional[int] = None) -> None:
        """Start watching a peer: from now on it must heartbeat or be declared lost. With `key`,
        only messages signed with it count."""
        with self._lock:
            self._peers[peer_id] = {"label": label, "rank": rank, "last": time.monotonic(), "left": False,
                                    "step": None, "samples_per_s": None, "state": "joined", "thermal": None}
            self._auth[peer_id] = {"key": key, "n_in": -1, "n_out": 0, "ident": None}

    def set_world(self, world: dict) -> None:
        """The run's generation `world` (protocol's _WORLD record): carried by every answer from
        now on, and pushed to every live peer at once (from this server's thread)."""
        with self._lock:
            self._world = dict(world)
            self.generation = int(world["generation"])
        self._push.set()

    def relabel(self, peer_id: str, rank: int, label: str) -> None:
        """A peer's rank (and label) in a new generation."""
        with self._lock:
            peer = self._peers.get(peer_id)
            if peer is not None:
                peer["rank"], peer["label"] = rank, label

    def forget(self, peer_id: str) -> None:
        with self._lock:
            self._peers.pop(peer_id, None)
            self._auth.pop(peer_id, None)
            self._gone.pop(peer_id, None)

    def snapshot(self) -> dict[str, dict]:
        """Copy of the table: last heartbeat age, reported step/samples/s/state per peer."""
        now = time.monotonic()
        with self._lock:
            out = {}
            for pid, p in self._peers.items():
                row = dict(p)
                row["age"] = now - p["last"]
                gone = self._gone.get(pid)
                if gone is not None and gone["kind"] == "lost":
                    row["state"] = "lost"
                elif p["left"]:
                    row["state"] = "left"
                out[pid] = row
            return out

    def stop(self, reason: str = "the master stopped", step: Optional[int] = None,
             after: Optional[int] = None) -> None:
        """Stop, telling every peer the master leaves and why (see the module docstring)."""
        self._bye = {"reason": reason[:500], "step": step, "after": after}
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        sock = make_socket(self._ctx, zmq.ROUTER, self.interval)
        try:
            self.port = bind(sock, self._host, self._want_port)
        except zmq.ZMQError as exc:
            self._bind_error = exc
            self._bound.set()
            sock.close(0)
            return
        self._bound.set()
        tick = self.interval / 20
        try:
            while not self._stop.is_set():
                if sock.poll(int(tick * 1000) or 1, zmq.POLLIN):
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        try:
                            self._on_message(sock, frames)
                        except Exception as exc:  # noqa: BLE001 - one bad message must not end liveness
                            self._complain("message handling failed", repr(exc))
                if self._push.is_set():
                    self._push.clear()
                    self._tell_everyone(sock)
                self._check(sock)
            bye = dict(self._bye, rank=0)
            with self._lock:
                ids = [pid for pid, p in self._peers.items() if not p["left"] and pid not in self._gone]
            for pid in ids:
                self._send(sock, pid, "bye", **bye)
            # A short linger lets the byes leave; a dead peer cannot hold close() longer.
            sock.setsockopt(zmq.LINGER, 200)
        finally:
            sock.close()

    def _send(self, sock: zmq.Socket, pid: str, msg_type: str, **fields) -> None:
        with self._lock:
            auth = self._auth.get(pid)
            if auth is None or auth["ident"] is None:
                return  # never heard from it: it learns from its own deadline
            auth["n_out"] += 1
            frames = [auth["ident"], *_frames(msg_type, auth["key"], TO_NODE, n=auth["n_out"], **fields)]
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # a full queue means that node is not reading; its own deadline decides

    def _reject(self, sock: zmq.Socket, ident: bytes, what: str, detail: str) -> None:
        self._complain(what, detail)
        try:
            # The sender hears what was wrong, not whom it concerned (it may not be a member).
            sock.send_multipart([ident, encode("error", reason=what)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _on_message(self, sock: zmq.Socket, frames: list) -> None:
        if len(frames) not in (2, 3):
            if frames:
                self._reject(sock, frames[0], "malformed heartbeat", f"{len(frames) - 1} frames, expected 1 or 2")
            return
        ident, body = frames[0], frames[1]
        mac = frames[2] if len(frames) == 3 else None
        try:
            msg = decode(body, ("hb", "bye"))
        except FrameError as exc:
            self._reject(sock, ident, "malformed heartbeat", str(exc))
            return
        pid = msg.get("peer")
        with self._lock:
            peer = self._peers.get(pid) if pid is not None else None
            auth = self._auth.get(pid) if pid is not None else None
            if peer is None or auth is None:
                unknown, label = True, ""
            else:
                unknown, label = False, peer["label"]
                key = auth["key"]
                if key is not None:
                    if mac is None or not verify(key, TO_MASTER, body, mac):
                        forged = "a missing" if mac is None else "a wrong"
                    elif not isinstance(msg.get("n"), int) or msg["n"] <= auth["n_in"]:
                        forged = "an old counter (replayed)"
                    else:
                        forged = ""
                        auth["n_in"] = msg["n"]
                else:
                    forged = ""
                if not forged:
                    auth["ident"] = ident
                    peer["last"] = time.monotonic()
        if unknown:
            # Not (or no longer) a member: it learns from its own deadline.
            self._reject(sock, ident, "heartbeat from a non-member", f"{msg['t']} for peer {str(pid)[:40]!r}")
            return
        if forged:
            self._reject(sock, ident, "forged heartbeat rejected",
                         f"{msg['t']} for {label} with {forged} signature; it changes nothing")
            return
        if msg["t"] == "bye":
            self._peer_left(sock, pid, msg)
            return
        with self._lock:
            before = peer["thermal"]
            for key_name in ("step", "samples_per_s", "state", "thermal"):
                if key_name in msg:
                    peer[key_name] = msg[key_name]
            gone = dict(self._gone)
        if "thermal" in msg:
            line = thermal_change(label, before, msg["thermal"])
            if line:
                log.warning("%s", line)
        self._send(sock, pid, "hb", gone=gone, **self._world_field())

    def _peer_left(self, sock: zmq.Socket, pid: str, msg: dict) -> None:
        with self._lock:
            peer = self._peers[pid]
            if peer["left"] or pid in self._gone:
                return
            peer["left"] = True
            peer["state"] = "left"
            who = f"rank {peer['rank']}" if peer["rank"] is not None else peer["label"]
            reason = msg.get("reason") or "no reason given"
            text = left_message(who, reason, msg.get("step", peer["step"]), peer["label"], self.advice)
            record = {"rank": peer["rank"], "kind": "left", "msg": text, "reason": reason, "after": msg.get("after"),
                      "generation": self.generation, "peer": pid}
            self._gone[pid] = record
        self._tell_everyone(sock)
        if self._on_left is not None:
            self._on_left(pid, dict(record))

    def _tell_everyone(self, sock: zmq.Socket) -> None:
        """Push the gone table (and the generation) to every live peer now, not at its next heartbeat."""
        with self._lock:
            gone = dict(self._gone)
            ids = [pid for pid, p in self._peers.items() if not p["left"] and pid not in self._gone]
        world = self._world_field()
        for pid in ids:
            self._send(sock, pid, "hb", gone=gone, **world)

    def _world_field(self) -> dict:
        with self._lock:
            return {"world": dict(self._world)} if self._world is not None else {}

    def _check(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        limit = _deadline(self.interval)
        newly = []
        with self._lock:
            for pid, p in self._peers.items():
                if p["left"] or pid in self._gone:
                    continue
                silence = now - p["last"]
                if silence > limit:
                    msg = (f"{p['label']} sent no heartbeat for {silence:.2f} s (limit {limit:.2f} s = "
                           f"{LOST_AFTER} x cluster.heartbeat_interval): it was killed, stopped or its "
                           f"link went down; {self.advice}")
                    self._gone[pid] = {"rank": p["rank"], "kind": "lost", "msg": msg, "after": None,
                                       "generation": self.generation, "peer": pid}
                    newly.append((pid, msg))
        if newly:
            self._tell_everyone(sock)
        for pid, msg in newly:
            self._on_lost(pid, msg)


class HeartbeatClient:
    """Node side: one thread, one DEALER toward the master's heartbeat port.

    ``on_gone(record)``, when given, hears every departure: the master's own bye as
    ``{"rank": 0, "kind": "left", "msg", "reason", "after"}`` and each peer the master reports
    gone. Without it (the agents) only the master matters: its silence reaches
    ``on_lost(message)``, its bye ``on_bye()``.
    """

    def __init__(self, ctx: zmq.Context, host: str, port: int, peer_id: str, interval: float,
                 on_lost: Callable[[str], None], on_bye: Optional[Callable[[], None]] = None,
                 key: Optional[bytes] = None, on_gone: Optional[Callable[[dict], None]] = None,
                 on_world: Optional[Callable[[dict], None]] = None, thermal: Optional[Callable[[], str]] = None):
        """`thermal()`: this node's thermal pressure level, read for every heartbeat (default
        macos.thermal_level: "unknown" off macOS)."""
        self.interval = interval
        self._thermal = thermal
        self._on_world = on_world
        self._world_generation = -1
        self._ctx = ctx
        self._addr = tcp(host, port)
        self._master = f"{host}:{port}"
        self._peer_id = peer_id
        self._key = key
        self._on_lost = on_lost
        self._on_bye = on_bye
        self._on_gone = on_gone
        self._lock = threading.Lock()
        self._report: dict = {}
        self._stop = threading.Event()
        self._bye: dict = {}
        self._seen: set = set()
        self._n_out = 0
        self._n_in = -1
        self._complain = Complaints("heartbeat client")
        self.lost = False
        self._thread = threading.Thread(target=self._run, name="macfleet-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def report(self, **fields) -> None:
        """Progress that rides on the next heartbeats (step, samples_per_s, state); the thermal
        level rides on every heartbeat by itself."""
        with self._lock:
            self._report.update(fields)

    def stop(self, reason: str = "it stopped", after: Optional[int] = None) -> None:
        """Stop, telling the master this node leaves and why (see the module docstring)."""
        self._bye = {"reason": reason[:500], "after": after}
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _send(self, sock: zmq.Socket, msg_type: str, **fields) -> None:
        self._n_out += 1
        sock.send_multipart(_frames(msg_type, self._key, TO_MASTER, peer=self._peer_id, n=self._n_out, **fields),
                            zmq.NOBLOCK)

    def _receive(self, frames: list) -> Optional[dict]:
        """The master's message if it is well-formed and, with a key, signed and new; else None."""
        if not 1 <= len(frames) <= 2:
            self._complain("malformed message from the master", f"{len(frames)} frames")
            return None
        try:
            msg = decode(frames[0], ("hb", "bye", "error"))
        except FrameError as exc:
            self._complain("malformed message from the master", str(exc))
            return None
        if msg["t"] == "error":
            self._complain("the master rejected a heartbeat", msg["reason"])
            return None
        if self._key is not None:
            if len(frames) != 2 or not verify(self._key, TO_NODE, frames[0], frames[1]):
                self._complain("forged message rejected", f"{msg['t']} without a valid signature from {self._master}")
                return None
            if not isinstance(msg.get("n"), int) or msg["n"] <= self._n_in:
                self._complain("replayed message rejected", f"{msg['t']} with an old counter from {self._master}")
                return None
            self._n_in = msg["n"]
        return msg

    def _run(self) -> None:
        sock = make_socket(self._ctx, zmq.DEALER, self.interval)
        sock.connect(self._addr)
        period = self.interval / 2
        tick = self.interval / 20
        limit = _deadline(self.interval)
        last_heard = time.monotonic()
        next_send = 0.0
        last_tick = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last_tick > SUSPENDED_AFTER * self.interval:
                    # This thread did not run for a while (the process was stopped, or the Mac
                    # slept): the silence it slept through is ours, not the master's. Ask again
                    # and wait a deadline anew. (Its loop otherwise comes round every interval/20.)
                    last_heard, next_send = now, 0.0
                last_tick = now
                if now >= next_send:
                    with self._lock:
                        fields = dict(self._report)
                    fields["thermal"] = self._thermal_level()
                    try:
                        self._send(sock, "hb", **fields)
                    except zmq.Again:
                        pass  # not connected yet or queue full: the deadline below decides
                    next_send = now + period
                if sock.poll(int(tick * 1000) or 1, zmq.POLLIN):
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        msg = self._receive(frames)
                        if msg is None:
                            continue
                        last_heard = time.monotonic()
                        if self._heard(msg):
                            return
                if time.monotonic() - last_tick > SUSPENDED_AFTER * self.interval:
                    continue  # suspended while waiting: the loop's top starts a fresh deadline
                silence = time.monotonic() - last_heard
                if silence > limit:
                    self.lost = True
                    self._on_lost(
                        f"the master at {self._master} answered no heartbeat for {silence:.2f} s "
                        f"(limit {limit:.2f} s = {LOST_AFTER} x cluster.heartbeat_interval): it was "
                        f"killed, stopped or the link went down. The run lives on the master (its run dir and "
                        f"checkpoints): start it again, then this node, both with trainer.resume=auto to continue from "
                        f"the last checkpoint")
                    return
        finally:
            if self._stop.is_set() and not self.lost:
                try:
                    with self._lock:
                        step = self._report.get("step")
                    self._send(sock, "bye", step=step, **self._bye)
                    # A short linger lets the bye leave; a dead master cannot hold close() longer.
                    sock.setsockopt(zmq.LINGER, 200)
                except zmq.ZMQError:
                    pass
            sock.close()

    def _thermal_level(self) -> str:
        try:
            level = (self._thermal or thermal_level)()
        except Exception:  # noqa: BLE001 - a reading must never stop the heartbeats
            return "unknown"
        return level if level in THERMAL_LEVELS else "unknown"

    def _heard(self, msg: dict) -> bool:
        """Act on a valid message from the master; True when this thread's work is over."""
        if msg["t"] == "bye":
            if self._on_gone is not None:
                reason = msg.get("reason") or "no reason given"
                self._on_gone({"rank": 0, "kind": "left", "after": msg.get("after"), "reason": reason,
                               "msg": left_message("rank 0", reason, msg.get("step"), f"the master at {self._master}")})
            elif self._on_bye is not None:
                self._on_bye()
            return True
        if self._on_gone is None:
            return False  # an agent: the other agents' comings and goings are not its business
        world = msg.get("world")
        if world is not None and self._on_world is not None and world["generation"] > self._world_generation:
            self._world_generation = world["generation"]
            self._on_world(world)
        for pid, rec in (msg.get("gone") or {}).items():
            if (pid, rec["kind"]) not in self._seen:
                self._seen.add((pid, rec["kind"]))
                # Heartbeats go on: this node still says bye when it stops, and hears the master.
                self._on_gone(rec)
        return False


