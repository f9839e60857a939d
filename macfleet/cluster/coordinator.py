"""The master's coordinator: admits nodes, assigns ranks, weights and membership generations.

Contract the trainer codes against::

    coord = Coordinator(cfg: ClusterConfig, fingerprint: dict, facts: dict, run: dict)
    coord.start()        # ROUTER on cfg.host:cfg.master_port, heartbeat ROUTER, zeroconf advert
    membership = coord.wait_for_nodes(tensor_addr, on_wait=None)   # rank 0's Membership
    membership.close()   # also stops the coordinator

One service thread owns the control ROUTER for the coordinator's whole life: it answers the
token challenge (protocol.py), checks protocol version and config fingerprint (a refusal names
every key that differs, with both values), queues admitted nodes, forms the membership when
``cfg.nodes`` are in (WELCOME carries rank, world size, generation, data addresses, weights,
run facts and the heartbeat port), prints workers' log lines as ``[rank N host] line`` and
answers `macfleet status`. Every refused node or request (protocol version, cluster name, token,
config fingerprint, a full or started run) is also logged here, one line naming its address and
the reason (`say_refused`, which the master agent uses too), never the token; the node prints
its own line. Every message is checked against its schema before use (protocol.decode); a bad
one gets an ``error`` answer and a rate-limited log line, and the thread goes on, so `macfleet
status` keeps answering whatever arrives. Heartbeats run in their own thread and socket
(heartbeat.py), signed with the key each node's join derived; a lost or departed peer reaches
the master's Membership callbacks and, through heartbeat answers, every worker.

Generations (``cluster.elastic``, on by default): each membership has a generation number. A
worker lost or gone (its bye) ends its generation at once: this thread forms the next one from
the others, shares renormalised over them, and announces it on every heartbeat answer
(HeartbeatServer.set_world); the trainers drop the step in flight and redo it there. A node that
joins a run in progress is authenticated and checked as at the start, then waits until the
master's trainer reaches a step boundary and calls `advance()`: the next generation takes it in
(WELCOME with ``running``) and a survivor sends it the training state. A node keeps its peer id
(its heartbeat identity) across generations; its rank is its place in the generation's list.
`events` keeps what happened, shown by `macfleet status`. Without elastic, a join after the
start is refused, and any departure stops the run.

Ranks: the master is 0; a node that asks for a rank (``facts["rank"]``, local fleets) gets it
when free; the others follow in (host, data address) order, so ranks do not depend on who was
quicker. Weights: ``cfg.weights`` per rank if set, else each node's ``cluster.weight``; when
every node says 'auto' the weights follow ``facts["samples_per_s"]``; normalised to sum 1.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Optional

import zmq

from macfleet.cluster.heartbeat import HeartbeatServer
from macfleet.cluster.macos import thermal_change, thermal_level
from macfleet.cluster.membership import FINISHED, Membership, WaitCallback, fill_host, say
from macfleet.cluster.protocol import Complaints, Handshake, bind, decode, encode, make_socket
from macfleet.config import PROTOCOL_VERSION, ClusterConfig
from macfleet.errors import FrameError, MacFleetError, PeerLeftError, PeerLostError
from macfleet.fingerprint import diff as fingerprint_diff

log = logging.getLogger("macfleet")


def _join_problem(msg: dict) -> str:
    """What is wrong with a join's payload beyond the schema's field types ('' when nothing)."""
    missing = [name for name in ("fingerprint", "facts", "tensor_addr", "weight") if name not in msg]
    if missing:
        return f"a join needs {', '.join(missing)}"
    facts = msg["facts"]
    if "rank" in facts and (type(facts["rank"]) is not int or not 0 < facts["rank"] < 65536):
        return f"facts.rank must be a rank > 0, got {str(facts['rank'])[:40]!r}"
    speed = facts.get("samples_per_s")
    if speed is not None and (type(speed) not in (int, float) or not 0 < speed < 1e12):
        return f"facts.samples_per_s must be a number > 0, got {str(speed)[:40]!r}"
    return ""


def peer_address(frame: zmq.Frame) -> str:
    """The sender's IP address as libzmq saw it, "?" where it cannot tell."""
    try:
        return frame.get("Peer-Address") or "?"
    except (zmq.ZMQError, ValueError, TypeError):
        return "?"


_ASKED = {"join": "a node's join", "agent": "a worker agent", "status": "a status request", "submit": "a job",
          "cancel": "a cancel request"}


_REFUSED_EVERY_S = 10.0
_refused_seen: dict[tuple, list] = {}  # (request, reason, sender) -> [last said at, refused since]


def say_refused(frame: zmq.Frame, msg: dict, reason: str, by_node: bool = False) -> None:
    """The master's one line for a refused node or request (the node prints its own line).
    `by_node`: the node refused this master (it could not verify the master's token proof).
    The first refusal of a kind (request, reason, sender's address) is said at once; a flood of
    the same is said at most once every 10 s, counting the ones in between, so it cannot fill
    the log."""
    facts = msg.get("facts")
    host = facts.get("host") if isinstance(facts, dict) else None
    who = peer_address(frame) + (f" ({host})" if host else "")
    what = _ASKED.get(msg.get("purpose"), f"a {str(msg.get('purpose'))[:40]!r} request")
    now, key = time.monotonic(), (what, by_node, reason[:80], peer_address(frame))
    seen = _refused_seen.get(key)
    if seen is not None and now - seen[0] < _REFUSED_EVERY_S:
        seen[1] += 1
        return
    if seen is None and len(_refused_seen) >= 64:
        _refused_seen.clear()  # bounded: distinct reasons from the network cannot grow it
    _refused_seen[key] = [now, 0]
    more = f" ({seen[1]} more like it in the last {now - seen[0]:.0f} s)" if seen is not None and seen[1] else ""
    line = (f"{what} from {who} refused this master: {reason}" if by_node
            else f"refused {what} from {who}: {reason}") + more
    # Parts of it come from the network: one line, no control characters.
    say("".join(c if c.isprintable() else "?" for c in line))


def answer_hello(shake: Handshake, ident: bytes, msg: dict, frame: zmq.Frame) -> bytes:
    """`shake.on_hello`, with a refusal (protocol version, cluster name) logged on this side too."""
    answer = shake.on_hello(ident, msg)
    reply = decode(answer)
    if reply["t"] == "refuse":
        say_refused(frame, msg, reply["reason"])
    return answer


def answer_node_refusal(frame: zmq.Frame, msg: dict) -> bytes:
    """A node that could not verify this master's token proof says so before it gives up; log it
    and answer, so the node knows its word arrived before it closes its socket."""
    say_refused(frame, msg, str(msg.get("reason", ""))[:500], by_node=True)
    return encode("refuse", reason="noted")


def compute_weights(cfg: ClusterConfig, weights: list, speeds: list) -> list[float]:
    """Normalised per-rank weights from cfg.weights, per-node weights or measured speeds."""
    if cfg.weights is not None:
        if len(cfg.weights) != len(weights):
            raise MacFleetError(
                f"cluster.weights has {len(cfg.weights)} entries for {len(weights)} nodes; give one "
                f"weight per rank or drop cluster.weights")
        raw = [float(w) for w in cfg.weights]
    elif all(str(w) == "auto" for w in weights) and all(s and float(s) > 0 for s in speeds):
        raw = [float(s) for s in speeds]
    else:
        # A lone 'auto' among fixed weights has nothing to compare with; it counts as 1.0.
        raw = [1.0 if str(w) == "auto" else float(w) for w in weights]
    total = sum(raw)
    return [w / total for w in raw]


class Coordinator:
    """The master's control plane; see the module docstring."""

    def __init__(self, cfg: ClusterConfig, fingerprint: dict, facts: dict, run: dict,
                 log_sink: Optional[Callable[[str], None]] = None):
        self.cfg = cfg
        self.fingerprint = {str(k): str(v) for k, v in dict(fingerprint).items()}
        self.facts = dict(facts)
        self.run = dict(run)
        self.log_sink = log_sink or (lambda line: print(line, flush=True))
        self.generation = 0
        self.port = cfg.master_port
        self._ctx: Optional[zmq.Context] = None
        self._hb: Optional[HeartbeatServer] = None
        self._advert = None
        self._lock = threading.Lock()
        self._pending: dict[bytes, dict] = {}      # ident -> admitted node, before formation
        self._members: list[dict] = []             # rank order, after formation
        self._peer_rank: dict[str, int] = {}
        self._master_state: dict = {"state": "waiting", "step": None, "samples_per_s": None}
        self._commands: queue.Queue = queue.Queue()
        self._formed = threading.Event()
        self._form_error: Optional[Exception] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._bound = threading.Event()
        self._bind_error: Optional[Exception] = None
        self._membership: Optional[Membership] = None
        self._keys: dict[bytes, bytes] = {}        # ident -> heartbeat key of an admitted node; never logged
        self._complain = Complaints("coordinator")
        self.elastic = bool(cfg.elastic)
        self.run.setdefault("elastic", self.elastic)
        if self.elastic and cfg.min_nodes > 1:
            self.run.setdefault("min_nodes", int(cfg.min_nodes))  # workers wait as long as the master may
        self.events: list[dict] = []
        """What changed the membership: {"generation", "time", "what"}, oldest first."""
        self._world: Optional[dict] = None
        self._world_cond = threading.Condition()
        self._serial = 0
        self._departed: list[dict] = []
        self._short = False
        """Elastic: fewer than cluster.min_nodes are left; the next join forms the next generation."""

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> "Coordinator":
        self._ctx = zmq.Context()
        self._hb = HeartbeatServer(self._ctx, self.cfg.host, self.cfg.heartbeat_interval, self._on_peer_lost,
                                   on_left=self._on_peer_left, elastic=self.elastic)
        self._hb.start()
        self._thread = threading.Thread(target=self._serve, name="macfleet-coordinator", daemon=True)
        self._thread.start()
        self._bound.wait()
        if self._bind_error is not None:
            self.stop()
            raise MacFleetError(
                f"cannot listen on {self.cfg.host}:{self.cfg.master_port} ({self._bind_error}); another "
                f"master or agent may be running there: stop it or set cluster.master_port") from None
        if self.cfg.discovery_enabled:
            from macfleet.cluster.discovery import advertise

            self._advert = advertise(self.cfg, port=self.port, kind="coordinator")
            self._advert.__enter__()
        return self

    def stop(self, reason: str = "the master stopped", after: Optional[int] = None) -> None:
        """Stop serving: heartbeat peers get a signed bye with `reason` (and `after`, see
        heartbeat.py); sockets and the advert are closed. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._hb is not None:
            self._hb.stop(reason, step=self._master_state.get("step"), after=after)
        if self._advert is not None:
            self._advert.__exit__(None, None, None)
            self._advert = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -- the trainer's side -------------------------------------------------------------------
    def wait_for_nodes(self, tensor_addr: str, on_wait: Optional[WaitCallback] = None) -> Membership:
        """Block until cfg.nodes nodes (this one included) joined; rank 0's Membership."""
        # A host-less address stays host-less on the wire: each worker fills in the address it
        # reached the master at, which is right across machines, namespaces and discovery.
        me = {"facts": self.facts, "tensor_addr": fill_host(tensor_addr, ""), "weight": self.cfg.weight}
        self._commands.put(("master", me))
        start = time.monotonic()
        deadline = start + self.cfg.wait_timeout
        last_said = -10.0
        last_count = -1
        while not self._formed.wait(timeout=0.2):
            elapsed = time.monotonic() - start
            count = self.joined()
            if on_wait is not None:
                on_wait(count, self.cfg.nodes, elapsed)
            elif count != last_count or elapsed - last_said >= 5.0:
                say(f"waiting for nodes: {count} of {self.cfg.nodes} joined ({elapsed:.0f} s of "
                    f"cluster.wait_timeout={self.cfg.wait_timeout:g} s); workers join at "
                    f"{self.cfg.master_addr}:{self.port}")
                last_said, last_count = elapsed, count
            if time.monotonic() >= deadline:
                self._commands.put(("give_up", None))
                hosts = ", ".join(n["facts"].get("host", "?") for n in self._pending_nodes()) or "none"
                raise MacFleetError(
                    f"only {count} of cluster.nodes={self.cfg.nodes} nodes joined within "
                    f"cluster.wait_timeout={self.cfg.wait_timeout:g} s (workers in: {hosts}); start "
                    f"`macfleet launch --role worker` or the worker command on the missing Macs, check "
                    f"they reach {self.cfg.master_addr}:{self.port} with the same token, or lower cluster.nodes (nodes=1 trains alone)")
        if self._form_error is not None:
            raise self._form_error
        assert self._membership is not None
        return self._membership

    # -- generations (elastic) ----------------------------------------------------------------
    def joiners(self) -> int:
        """Nodes admitted to a run in progress, waiting for the next step boundary."""
        with self._lock:
            return len(self._pending) if self._formed.is_set() else 0

    def advance(self, timeout: float) -> dict:
        """Take the waiting joiners in: form the next generation now (the master's trainer calls
        this at a step boundary); returns it."""
        generation = self.generation
        self._commands.put(("regen", {"admit": True}))
        return self.next_world(generation, timeout)

    def next_world(self, generation: int, timeout: float) -> dict:
        """The newest generation after `generation`, waiting up to `timeout` s for it."""
        deadline = time.monotonic() + timeout
        with self._world_cond:
            while self._world is None or self._world["generation"] <= generation:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    if self._short:
                        raise MacFleetError(
                            f"fewer than cluster.min_nodes={self.cfg.min_nodes} nodes were left and none joined within "
                            f"{timeout:g} s; the run stops: start the missing nodes, then every node with "
                            f"trainer.resume=auto to continue from the last checkpoint")
                    raise MacFleetError(f"the coordinator formed no generation after {generation} within {timeout:g} s")
                self._world_cond.wait(min(left, 0.05))
            return dict(self._world)

    def members(self) -> list[dict]:
        """The nodes of the current generation, in rank order."""
        with self._lock:
            return list(self._members)

    def joined(self) -> int:
        """Nodes in so far, the master included."""
        with self._lock:
            return (len(self._members) if self._formed.is_set() else len(self._pending)) + 1

    def status(self) -> list[dict]:
        """The node table `macfleet status` prints (one row per rank, or per waiting node)."""
        hb = self._hb.snapshot() if self._hb is not None else {}
        with self._lock:
            rows = []
            if self._members:
                for rank, node in enumerate(self._members):
                    rows.append(self._row(rank, node, hb.get(node.get("peer_id", ""))))
                for node in self._pending.values():  # joining a run in progress at the next step boundary
                    rows.append(self._row(None, node, None, state="joining"))
                for node in self._departed:  # out of the run: left or lost, newest last
                    rows.append(self._row(None, node, hb.get(node.get("peer_id", "")), state="left"))
            else:
                rows.append(self._row(0, {"facts": self.facts, "weight": self.cfg.weight}, None))
                for node in self._pending.values():
                    rows.append(self._row(None, node, None, state="joined"))
            return rows

    # -- internals ----------------------------------------------------------------------------
    def _row(self, rank, node: dict, hb: Optional[dict], state: Optional[str] = None) -> dict:
        f = node.get("facts", {})
        if rank == 0:
            live = dict(self._master_state, age=0.0, thermal=thermal_level())
        else:
            live = hb or {"state": state or "joined", "age": None, "step": None, "samples_per_s": None}
        return {"rank": rank, "host": f.get("host", "?"), "chip": f.get("chip", "?"),
                "device": f.get("device", "?"), "weight": node.get("norm_weight", node.get("weight")),
                "state": live.get("state"), "last_heartbeat_s": live.get("age"), "step": live.get("step"),
                "samples_per_s": live.get("samples_per_s"), "thermal": live.get("thermal"),
                "generation": self.generation,
                "addr": node.get("tensor_addr")}

    def _pending_nodes(self) -> list[dict]:
        with self._lock:
            return list(self._pending.values())

    def _serve(self) -> None:
        sock = make_socket(self._ctx, zmq.ROUTER, self.cfg.heartbeat_interval)
        try:
            self.port = bind(sock, self.cfg.host, self.cfg.master_port)
        except zmq.ZMQError as exc:
            self._bind_error = exc
            self._bound.set()
            sock.close(0)
            return
        self._bound.set()
        shake = Handshake(self.cfg.token, self.cfg.name)
        master: Optional[dict] = None
        gave_up = False
        try:
            while not self._stop.is_set():
                while True:
                    try:
                        cmd, arg = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    if cmd == "master":
                        master = arg
                    elif cmd == "regen":
                        try:
                            self._regen(sock, **arg)
                        except Exception as exc:  # noqa: BLE001 - the coordinator outlives a failed regroup
                            self._complain("could not form the next generation", repr(exc))
                    elif cmd == "give_up":
                        gave_up = True
                        for ident in list(self._pending):
                            self._send(sock, ident, encode("refuse", reason=(
                                "the master stopped waiting for nodes (cluster.wait_timeout); restart "
                                "the run with every node up")))
                if master is not None and not gave_up and not self._formed.is_set() \
                        and len(self._pending) + 1 >= self.cfg.nodes:
                    try:
                        self._form(sock, master)
                    except Exception as exc:  # noqa: BLE001 - reported to wait_for_nodes, not lost with the thread
                        self._form_error = MacFleetError(f"could not form the run: {exc!r}")
                        self._formed.set()
                if not sock.poll(100, zmq.POLLIN):
                    continue
                try:
                    # Frames, not bytes: a refusal is logged with the sender's address.
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    continue
                self._receive(sock, shake, frames, gave_up)
            with self._lock:
                waiting = list(self._pending) if self._formed.is_set() else []
            for ident in waiting:
                self._send(sock, ident, encode("refuse", reason="the run ended before this node could join it"))
            sock.setsockopt(zmq.LINGER, 200)
        finally:
            sock.close()

    def _receive(self, sock, shake: Handshake, frames: list, gave_up: bool) -> None:
        """Validate one message and handle it; a bad one is answered and logged, never fatal."""
        ident = frames[0].bytes
        try:
            if len(frames) != 2:
                raise FrameError(f"a control message is 1 frame, this one has {len(frames) - 1}")
            msg = decode(frames[1].bytes)
        except FrameError as exc:
            self._complain("malformed message", str(exc))
            self._send(sock, ident, encode("error", reason=f"malformed message: {exc}"[:2000]))
            return
        try:
            self._handle(sock, shake, ident, msg, gave_up, frames[1])
        except Exception as exc:  # noqa: BLE001 - the coordinator outlives any one message
            self._complain("message handling failed", f"{msg['t']}: {exc!r}")
            self._send(sock, ident, encode("error", reason=f"the master could not handle this {msg['t']} message"))

    def _send(self, sock: zmq.Socket, ident: bytes, frame: bytes) -> None:
        try:
            sock.send_multipart([ident, frame], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # that peer is gone or not reading; the heartbeat deadline handles members

    def _handle(self, sock, shake: Handshake, ident: bytes, msg: dict, gave_up: bool, frame: zmq.Frame) -> None:
        t = msg["t"]

        def refuse(reason: str) -> None:
            say_refused(frame, msg, reason)
            self._send(sock, ident, encode("refuse", reason=reason))

        if t == "hello":
            self._send(sock, ident, answer_hello(shake, ident, msg, frame))
            return
        if t == "refuse":
            self._send(sock, ident, answer_node_refusal(frame, msg))
            return
        if t == "log":
            rank = msg.get("rank")
            with self._lock:
                known = [n for n in self._members if n.get("ident") == ident]
            if known:
                host = known[0]["facts"].get("host", "?")
                self.log_sink(f"[rank {rank} {host}] {msg['line']}")
            else:
                self._send(sock, ident, encode("error", reason="log lines are taken from members of the run only"))
            return
        if t != "auth":
            self._complain("unexpected message", f"{t} on the control port")
            self._send(sock, ident, encode("error", reason=f"a {t} message is not a request this master answers"))
            return
        reason, key = shake.authenticate(ident, msg)
        if reason is not None:
            refuse(reason)
            return
        purpose = msg.get("purpose")
        if purpose == "status":
            self._send(sock, ident, encode("status", nodes=self.status(), kind="coordinator",
                                           generation=self.generation, run=self.run, events=self.events[-20:]))
            return
        if purpose != "join":
            refuse(f"this master runs a training job, not an agent; {purpose!r} requests go to "
                   f"`macfleet launch --role master`")
            return
        problem = _join_problem(msg)
        if problem:
            self._complain("malformed join", problem)
            self._send(sock, ident, encode("error", reason=problem))
            return
        diff = fingerprint_diff(self.fingerprint, msg["fingerprint"])
        if diff:
            refuse("this node's config differs from the master's in what must match: " + "; ".join(diff)
                   + ". Use the same conf/ and overrides on every node")
            return
        if gave_up:
            refuse("the master stopped waiting for nodes; restart the run")
            return
        if self._formed.is_set() and not self.elastic:
            refuse(f"the run already started with {len(self._members)} nodes (generation {self.generation}) and "
                   f"cluster.elastic is false on the master: restart the run with cluster.nodes including this node")
            return
        node = {"ident": ident, "facts": dict(msg["facts"]), "tensor_addr": msg["tensor_addr"],
                "weight": msg["weight"]}
        with self._lock:
            # A restarted worker (same data address) replaces its earlier self.
            for other in [i for i, n in self._pending.items() if n["tensor_addr"] == node["tensor_addr"]]:
                del self._pending[other]
                self._keys.pop(other, None)
            if self._formed.is_set():
                # a run in progress takes nodes back up to the size it was started for
                full = len(self._members) + len(self._pending) >= self.cfg.nodes
            else:
                full = len(self._pending) + 1 >= self.cfg.nodes
            if not full:
                self._pending[ident] = node
                self._keys[ident] = key
                full = False
        if full:
            refuse(f"the master already has cluster.nodes={self.cfg.nodes} nodes" + (
                " in its running run" if self._formed.is_set() else "") + "; raise cluster.nodes on the master")
            return
        if self._formed.is_set():
            say(f"node {node['facts'].get('host', '?')} ({node['tensor_addr']}) asks to join the running run: "
                f"it joins at the next step boundary")
            with self._lock:
                enough = len(self._members) + len(self._pending) >= self.cfg.min_nodes
            if self._short and enough:  # the run is stalled waiting for nodes: no step boundary to wait for
                self._commands.put(("regen", {"admit": True}))
        self._send(sock, ident, encode("accepted", joined=self.joined(), expected=self.cfg.nodes,
                                       running=self._formed.is_set()))

    def _form(self, sock, master: dict) -> None:
        """Assign ranks and weights, send WELCOME to every worker, build rank 0's Membership."""
        with self._lock:
            workers = list(self._pending.values())
            self._pending.clear()
        size = len(workers) + 1
        ranks: list[Optional[dict]] = [master] + [None] * (size - 1)
        unplaced = []
        for node in sorted(workers, key=lambda n: (str(n["facts"].get("host", "")), n["tensor_addr"])):
            want = node["facts"].get("rank")
            if type(want) is int and 0 < want < size and ranks[want] is None:
                ranks[want] = node
            else:
                unplaced.append(node)
        for i in range(1, size):
            if ranks[i] is None:
                ranks[i] = unplaced.pop(0)
        members: list[dict] = ranks  # type: ignore[assignment]
        try:
            weights = compute_weights(self.cfg, [n["weight"] for n in members],
                                      [n["facts"].get("samples_per_s") for n in members])
        except MacFleetError as exc:
            self._form_error = exc
            for node in members[1:]:
                self._send(sock, node["ident"], encode("refuse", reason=str(exc)))
            self._formed.set()
            return
        self.generation += 1
        addrs = [n["tensor_addr"] for n in members]
        nodes = [n["facts"] for n in members]
        for rank, node in enumerate(members):
            node["norm_weight"] = node["raw_weight"] = weights[rank]
            node["peer_id"] = f"g{self.generation}-r{rank}" if rank else "master"
        with self._lock:
            self._members = members
        for rank, node in enumerate(members[1:], start=1):
            label = f"node rank {rank} ({node['facts'].get('host', '?')}, {node['tensor_addr']})"
            self._peer_rank[node["peer_id"]] = rank
            self._hb.expect(node["peer_id"], label, key=self._keys.pop(node["ident"]), rank=rank)
            self._send(sock, node["ident"], encode(
                "welcome", rank=rank, world_size=size, generation=self.generation, addrs=addrs,
                weights=weights, run=self.run, nodes=nodes, hb_port=self._hb.port, peer_id=node["peer_id"],
                proto=PROTOCOL_VERSION))
        here = self.cfg.master_addr if self.cfg.master_addr not in ("", "auto") else "127.0.0.1"
        self._membership = Membership(rank=0, world_size=size, generation=self.generation,
                                      addrs=[fill_host(a, here) for a in addrs],
                                      weights=weights, run=dict(self.run), nodes=nodes, _link=_MasterLink(self),
                                      _master_host=here)
        self._master_state["state"] = "running"
        self._event(f"formed with {size} nodes")
        if self.elastic:
            self._announce("formed")
        self._formed.set()

    def _event(self, what: str) -> None:
        self.events.append({"generation": self.generation, "time": time.time(), "what": what})
        del self.events[:-50]

    def _announce(self, why: str, joined: tuple = ()) -> None:
        """Publish the current generation: heartbeat answers carry it; the master's trainer waits on it."""
        with self._lock:
            members = list(self._members)
        world = {"generation": self.generation, "peers": [n["peer_id"] for n in members],
                 "addrs": [n["tensor_addr"] for n in members], "weights": [n["norm_weight"] for n in members],
                 "nodes": [n["facts"] for n in members], "joined": list(joined), "why": why[:1024]}
        self._hb.set_world(world)
        with self._world_cond:
            self._world = world
            self._world_cond.notify_all()

    def _regen(self, sock, drop: Optional[str] = None, why: str = "", admit: bool = False, quiet: bool = False) -> None:
        """Form the next generation: without peer `drop`, and with the waiting joiners when `admit`.
        `quiet`: not worth a line (a node that finished its run, as the others are about to)."""
        with self._lock:
            members = [n for n in self._members if n["peer_id"] != drop]
            dropped = len(members) < len(self._members)
            if dropped:
                self._departed = (self._departed + [n for n in self._members if n["peer_id"] == drop])[-16:]
            joiners = list(self._pending.values()) if admit else []
            if admit:
                self._pending.clear()
        if not dropped and not joiners:
            if admit:
                self._announce_same()
            return
        min_nodes = self.cfg.min_nodes
        if len(members) + len(joiners) < min_nodes:
            # Too few to go on: the trainers wait in their regroup until joiners make up min_nodes.
            with self._lock:
                self._members = members
                self._short = True
                self._pending.update({n["ident"]: n for n in joiners})
            line = (f"{why or 'a node left'}: {len(members)} node(s) left, fewer than cluster.min_nodes={min_nodes}; "
                    f"the run waits up to cluster.wait_timeout={self.cfg.wait_timeout:g} s for nodes to join")
            self._event(line)
            say(line)
            return
        self._short = False
        self.generation += 1
        mean = sum(n["raw_weight"] for n in members) / max(1, len(members))
        for node in joiners:
            self._serial += 1
            node["peer_id"] = f"g{self.generation}-r{len(members)}-{self._serial}"
            node["raw_weight"] = self._joiner_weight(node, members, mean)
            members.append(node)
        total = sum(n["raw_weight"] for n in members)
        for rank, node in enumerate(members):
            node["norm_weight"] = node["raw_weight"] / total
        with self._lock:
            self._members = members
            self._peer_rank = {n["peer_id"]: rank for rank, n in enumerate(members) if rank}
        for rank, node in enumerate(members[1:], start=1):
            if node not in joiners:
                self._hb.relabel(node["peer_id"], rank,
                                 f"node rank {rank} ({node['facts'].get('host', '?')}, {node['tensor_addr']})")
        addrs = [n["tensor_addr"] for n in members]
        nodes = [n["facts"] for n in members]
        weights = [n["norm_weight"] for n in members]
        for node in joiners:
            rank = members.index(node)
            label = f"node rank {rank} ({node['facts'].get('host', '?')}, {node['tensor_addr']})"
            self._hb.expect(node["peer_id"], label, key=self._keys.pop(node["ident"], None), rank=rank)
            self._send(sock, node["ident"], encode(
                "welcome", rank=rank, world_size=len(members), generation=self.generation, addrs=addrs,
                weights=weights, run=self.run, nodes=nodes, hb_port=self._hb.port, peer_id=node["peer_id"],
                proto=PROTOCOL_VERSION, running=True))
        what = []
        if dropped:
            what.append(why or f"{drop} left")
        if joiners:
            what.append(", ".join(f"{n['facts'].get('host', '?')} joined as rank {members.index(n)}" for n in joiners))
        line = f"generation {self.generation}: {'; '.join(what)}; {len(members)} node(s), shares " \
               f"{[round(w, 3) for w in weights]}"
        self._event(line)
        if not quiet:
            say(line)
        self._announce(line, tuple(n["peer_id"] for n in joiners))

    def _announce_same(self) -> None:
        with self._world_cond:
            self._world_cond.notify_all()

    def _joiner_weight(self, node: dict, members: list, mean: float) -> float:
        """A joiner's share before normalisation (the members' are their shares at formation): its
        rank's cluster.weights entry, its measured speed next to the others' when every node
        measured one, its cluster.weight next to theirs, else the members' mean."""
        if self.cfg.weights is not None and len(members) < len(self.cfg.weights):
            # cluster.weights names shares by rank: the joiner takes its rank's (a Mac back in its place)
            return float(self.cfg.weights[len(members)]) / sum(float(w) for w in self.cfg.weights)
        speeds = [n["facts"].get("samples_per_s") for n in members] + [node["facts"].get("samples_per_s")]
        if str(node.get("weight")) == "auto" and all(speeds) and all(str(n.get("weight")) == "auto" for n in members):
            per_weight = sum(n["raw_weight"] for n in members) / sum(float(v) for v in speeds[:-1])
            return float(speeds[-1]) * per_weight
        if self.cfg.weights is None and str(node.get("weight")) != "auto" \
                and all(str(n.get("weight")) != "auto" for n in members):
            # fixed per-node weights: in the units of the others'
            fixed = [float(n["weight"]) for n in members]
            return float(node["weight"]) * sum(n["raw_weight"] for n in members) / sum(fixed)
        return mean

    def _address(self, peer_id: str) -> tuple[Optional[int], Optional[str]]:
        rank = self._peer_rank.get(peer_id)
        return rank, self._members[rank]["tensor_addr"] if rank is not None and rank < len(self._members) else None

    def _member(self, peer_id: str) -> bool:
        with self._lock:
            return any(n.get("peer_id") == peer_id for n in self._members)

    def _on_peer_lost(self, peer_id: str, message: str) -> None:
        if not self._member(peer_id):
            return  # already out of the current generation
        rank, addr = self._address(peer_id)
        if self.elastic and rank:
            self._commands.put(("regen", {"drop": peer_id, "why": f"rank {rank} lost"}))
        if self._membership is not None:
            self._membership._peer_lost(PeerLostError(message, rank=rank, address=addr))

    def _on_peer_left(self, peer_id: str, record: dict) -> None:
        if not self._member(peer_id):
            return
        rank, addr = self._address(peer_id)
        if self.elastic and rank:
            self._commands.put(("regen", {"drop": peer_id, "why": f"rank {rank} left ({record['reason']})",
                                          "quiet": record["reason"] == FINISHED}))
        if self._membership is not None:
            self._membership._peer_left(PeerLeftError(record["msg"], rank=rank, address=addr, reason=record["reason"]),
                                        record["after"])


class _MasterLink:
    """Rank 0's Membership talks to its coordinator in-process."""

    def __init__(self, coord: Coordinator):
        self._coord = coord
        self._thermal: Optional[str] = None

    def report(self, **fields: Any) -> None:
        self._coord._master_state.update(fields)
        # Rank 0 has no heartbeat to its own server: its thermal changes are logged here.
        level = thermal_level()
        line = thermal_change(f"rank 0 ({self._coord.facts.get('host', '?')}, the master)", self._thermal, level)
        self._thermal = level
        if line:
            log.warning("%s", line)

    def log(self, rank: int, line: str) -> None:
        host = self._coord.facts.get("host", "?")
        self._coord.log_sink(f"[rank {rank} {host}] {line}")

    def close(self, reason: str, after: Optional[int]) -> None:
        self._coord.stop(reason, after)
