"""Liveness: application heartbeats on their own sockets and threads.

ZeroMQ hides a killed peer (it quietly reconnects) and a stopped (SIGSTOP) process or a downed
link gives no socket event at all, so liveness is decided here by heartbeats with a deadline,
never by socket state. Heartbeats have their own sockets and threads so that a long transfer or
a long backward pass on the data plane never looks like a dead node.

Timing, with ``interval = cluster.heartbeat_interval``: a node sends a heartbeat every
``interval / 2`` and the master answers each one; a side that hears nothing for
``LOST_AFTER * interval`` (1.75x) declares the other lost. The deadline is checked every
``interval / 20``, so a killed or stopped node is reported within 2x the interval while still
tolerating three missed heartbeats in a row.

`HeartbeatServer` (master): a ROUTER thread that tracks every expected peer, answers heartbeats
(answers carry the ids of peers already lost, so every worker stops too) and calls
``on_lost(peer_id, message)`` once per lost peer. `HeartbeatClient` (node): a DEALER thread that
sends heartbeats with the node's progress (`report`) and calls ``on_lost(message)`` when the
master goes silent or reports a lost peer. A clean ``stop()`` says "bye", which is not a loss.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import zmq

from macfleet.cluster.protocol import bind, decode, encode, make_socket, tcp
from macfleet.errors import FrameError

LOST_AFTER = 1.75
"""A peer silent for this many heartbeat intervals is lost (kept under the 2x promise)."""


def _deadline(interval: float) -> float:
    return LOST_AFTER * interval


class HeartbeatServer:
    """Master side: one thread, one ROUTER, a table of peers and their last heartbeat."""

    def __init__(self, ctx: zmq.Context, host: str, interval: float,
                 on_lost: Callable[[str, str], None], port: int = 0):
        self.interval = interval
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._peers: dict[str, dict] = {}
        self._lost: dict[str, str] = {}
        self._stop = threading.Event()
        self._ctx = ctx
        self._host = host
        self._want_port = port
        self._bound = threading.Event()
        self._bind_error: Optional[Exception] = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="macfleet-heartbeat-server", daemon=True)

    def start(self) -> int:
        self._thread.start()
        self._bound.wait()
        if self._bind_error is not None:
            raise self._bind_error
        return self.port

    def expect(self, peer_id: str, label: str) -> None:
        """Start watching a peer: from now on it must heartbeat or be declared lost."""
        with self._lock:
            self._peers[peer_id] = {"label": label, "last": time.monotonic(), "left": False,
                                    "step": None, "samples_per_s": None, "state": "joined"}

    def forget(self, peer_id: str) -> None:
        with self._lock:
            self._peers.pop(peer_id, None)
            self._lost.pop(peer_id, None)

    def snapshot(self) -> dict[str, dict]:
        """Copy of the table: last heartbeat age, reported step/samples/s/state per peer."""
        now = time.monotonic()
        with self._lock:
            out = {}
            for pid, p in self._peers.items():
                row = dict(p)
                row["age"] = now - p["last"]
                if pid in self._lost:
                    row["state"] = "lost"
                elif p["left"]:
                    row["state"] = "left"
                out[pid] = row
            return out

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

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
                            ident, frame = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        except ValueError:
                            continue  # wrong frame count: not one of ours
                        self._on_message(sock, ident, frame)
                self._check()
            # Tell connected nodes the master is leaving on purpose.
            with self._lock:
                ids = [pid for pid, p in self._peers.items() if not p["left"]]
            for pid in ids:
                try:
                    sock.send_multipart([pid.encode(), encode("bye")], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            # A short linger lets the byes leave; a dead peer cannot hold close() longer.
            sock.setsockopt(zmq.LINGER, 200)
        finally:
            sock.close()

    def _on_message(self, sock: zmq.Socket, ident: bytes, frame: bytes) -> None:
        try:
            msg = decode(frame, ("hb", "bye"))
        except FrameError:
            return
        pid = ident.decode(errors="replace")
        with self._lock:
            peer = self._peers.get(pid)
            if peer is None:
                return  # not (or no longer) a member: ignore, it learns from its own deadline
            peer["last"] = time.monotonic()
            if msg["t"] == "bye":
                peer["left"] = True
                return
            for key in ("step", "samples_per_s", "state"):
                if key in msg:
                    peer[key] = msg[key]
            lost = dict(self._lost)
        try:
            sock.send_multipart([ident, encode("hb", lost=lost)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # a full queue means that node is not reading; its own deadline decides

    def _check(self) -> None:
        now = time.monotonic()
        limit = _deadline(self.interval)
        newly = []
        with self._lock:
            for pid, p in self._peers.items():
                if p["left"] or pid in self._lost:
                    continue
                silence = now - p["last"]
                if silence > limit:
                    msg = (f"{p['label']} sent no heartbeat for {silence:.2f} s (limit {limit:.2f} s = "
                           f"{LOST_AFTER} x cluster.heartbeat_interval): it was killed, stopped or its "
                           f"link went down. The run stops; restart that node and resume from the last "
                           f"checkpoint (trainer.resume=auto)")
                    self._lost[pid] = msg
                    newly.append((pid, msg))
        for pid, msg in newly:
            self._on_lost(pid, msg)


class HeartbeatClient:
    """Node side: one thread, one DEALER toward the master's heartbeat port."""

    def __init__(self, ctx: zmq.Context, host: str, port: int, peer_id: str, interval: float,
                 on_lost: Callable[[str], None], on_bye: Optional[Callable[[], None]] = None):
        self.interval = interval
        self._ctx = ctx
        self._addr = tcp(host, port)
        self._master = f"{host}:{port}"
        self._peer_id = peer_id
        self._on_lost = on_lost
        self._on_bye = on_bye
        self._lock = threading.Lock()
        self._report: dict = {}
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._run, name="macfleet-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def report(self, **fields) -> None:
        """Progress that rides on the next heartbeats (step, samples_per_s, state)."""
        with self._lock:
            self._report.update(fields)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        sock = make_socket(self._ctx, zmq.DEALER, self.interval, identity=self._peer_id.encode())
        sock.connect(self._addr)
        period = self.interval / 2
        tick = self.interval / 20
        limit = _deadline(self.interval)
        last_heard = time.monotonic()
        next_send = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_send:
                    with self._lock:
                        fields = dict(self._report)
                    try:
                        sock.send(encode("hb", **fields), zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # not connected yet or queue full: the deadline below decides
                    next_send = now + period
                if sock.poll(int(tick * 1000) or 1, zmq.POLLIN):
                    while True:
                        try:
                            frame = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        try:
                            msg = decode(frame, ("hb", "bye"))
                        except FrameError:
                            continue
                        last_heard = time.monotonic()
                        if msg["t"] == "bye":
                            if self._on_bye is not None:
                                self._on_bye()
                            return
                        lost = msg.get("lost") or {}
                        if lost:
                            self.lost = True
                            self._on_lost("; ".join(str(v) for v in lost.values()))
                            return
                silence = time.monotonic() - last_heard
                if silence > limit:
                    self.lost = True
                    self._on_lost(
                        f"the master at {self._master} answered no heartbeat for {silence:.2f} s "
                        f"(limit {limit:.2f} s = {LOST_AFTER} x cluster.heartbeat_interval): it was "
                        f"killed, stopped or the link went down. Restart the master, then this node")
                    return
        finally:
            if self._stop.is_set() and not self.lost:
                try:
                    sock.send(encode("bye"), zmq.NOBLOCK)
                    # A short linger lets the bye leave; a dead master cannot hold close() longer.
                    sock.setsockopt(zmq.LINGER, 200)
                except zmq.ZMQError:
                    pass
            sock.close()
