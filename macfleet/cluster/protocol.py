"""Control-plane wire format, sockets, the join-token handshake and heartbeat signatures.

Owns everything the coordinator, the heartbeat threads and the agents say to each other:

* Messages are one JSON object per ZeroMQ frame (`encode` / `decode`), never pickle. Every
  message has ``"t"`` (its kind) and ``"v"`` (``PROTOCOL_VERSION``). `decode` checks the size,
  the JSON, the kind (one of `SCHEMAS`) and every field the kind defines (type, length, range),
  so a stray or hostile frame is a `FrameError` before any code reads it, never a crash. Fields
  a kind does not define are ignored. `Complaints` logs such frames once, then at most every few
  seconds with a count, so a flood cannot fill the log.
* `make_socket` is the one place control sockets get their options (linger, HWM, ZMTP
  heartbeats). One socket per thread: whoever makes a socket is the only thread that uses it.
* The token handshake (`Handshake` on the server, `client_handshake` on the node) is a
  challenge-response; the token itself never crosses the wire::

      node   -> HELLO     {purpose, name, cnonce}
      master -> CHALLENGE {snonce, proof = HMAC(token, "master" | cnonce | snonce)}   (or REFUSE)
      node   -> AUTH      {proof = HMAC(token, "node" | snonce | cnonce), ...purpose payload}
      master -> the purpose's answer (WELCOME, STATUS, ...) or REFUSE {reason}

  The node checks the master's proof first, so a node never hands its config or facts to a
  master that does not know the token; it tells the master it gives up (REFUSE {reason}, answered
  by the master), so both sides log the refusal. Proofs are compared with `hmac.compare_digest`.
* Both sides of a handshake derive the same `session_key` = HMAC(token, "heartbeat" | cnonce |
  snonce): fresh per join, never sent, logged or saved. Heartbeats and byes are signed with it
  (`sign` / `verify`: a second frame holding HMAC-SHA256(key, direction | body), the body
  carrying a counter that must grow), so nobody without the token can forge a goodbye or keep a
  dead node alive. Without a token the key rests on the nonces alone: it stops blind forgery by
  a party that did not see the join, nothing more.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import socket
import time
from typing import Any, Callable, NoReturn, Optional

import zmq

from macfleet.config import PROTOCOL_VERSION
from macfleet.errors import FrameError, JoinRefusedError, MacFleetError

log = logging.getLogger("macfleet")

MAX_MESSAGE_BYTES = 1 << 20
"""Control messages are small; anything bigger is a protocol error (config YAML fits easily)."""

NONCE_BYTES = 16
MAC_BYTES = 32
"""A heartbeat's signature frame: HMAC-SHA256."""


def encode(msg_type: str, **fields: Any) -> bytes:
    """One control message as a JSON frame: {"t": type, "v": PROTOCOL_VERSION, ...fields}."""
    body = {"t": msg_type, "v": PROTOCOL_VERSION}
    body.update(fields)
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def decode(frame: bytes, expect: Optional[tuple] = None) -> dict:
    """Parse and validate one control frame against its kind's schema; FrameError on anything
    malformed, of an unknown kind, or not in `expect`.

    A HELLO, REFUSE or ERROR of another protocol version is passed through (that is how two
    versions tell each other why they part); any other message of another version is a FrameError.
    """
    if len(frame) > MAX_MESSAGE_BYTES:
        raise FrameError(f"control message of {len(frame)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = json.loads(bytes(frame).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers bad JSON and integers too long to parse; RecursionError deep nesting.
        raise FrameError(f"control message is not JSON ({str(exc)[:100]}); is another program on this port?") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str) or type(msg.get("v")) is not int:
        raise FrameError("control message lacks its type or version; is another program on this port?")
    kind = msg["t"]
    if kind not in SCHEMAS:
        raise FrameError(f"unknown control message kind {kind[:40]!r}")
    if expect is not None and kind not in expect:
        raise FrameError(f"expected a {'/'.join(expect)} message, got {kind!r}")
    if msg["v"] != PROTOCOL_VERSION and kind not in ("hello", "refuse", "error"):
        raise FrameError(f"{kind} message of MacFleet protocol {msg['v']}; this node speaks {PROTOCOL_VERSION}")
    for name, check in SCHEMAS[kind].items():
        if name in msg:
            check(msg[name], f"{kind}.{name}")
        elif name in REQUIRED.get(kind, ()):
            raise FrameError(f"{kind} message lacks its {name!r} field")
    extra = _CROSS_CHECKS.get(kind)
    if extra is not None:
        extra(msg)
    return msg


# -- schemas ----------------------------------------------------------------------------------
# A check is `check(value, where)` raising FrameError; one per field of each kind below.
Check = Callable[[Any, str], None]
_INT64 = (1 << 63) - 1


def _bad(where: str, want: str, value: Any) -> FrameError:
    shown = repr(value)
    return FrameError(f"{where} must be {want}, got {shown[:60]}{'...' if len(shown) > 60 else ''}")


def _str(max_len: int = 256, choices: Optional[tuple] = None, pattern: Optional[str] = None) -> Check:
    rx = re.compile(pattern) if pattern else None

    def check(v: Any, where: str) -> None:
        if not isinstance(v, str) or len(v) > max_len:
            raise _bad(where, f"a string of at most {max_len} characters", v)
        if choices is not None and v not in choices:
            raise _bad(where, f"one of {', '.join(choices)}", v)
        if rx is not None and not rx.fullmatch(v):
            raise _bad(where, f"of the form {pattern}", v)
    return check


def _int(lo: int = 0, hi: int = _INT64) -> Check:
    def check(v: Any, where: str) -> None:
        # bool is an int in Python; on the wire it is not a number.
        if type(v) is not int or not lo <= v <= hi:
            raise _bad(where, f"an integer in [{lo}, {hi}]", v)
    return check


def _num(lo: float = 0.0, hi: float = 1e300) -> Check:
    def check(v: Any, where: str) -> None:
        if type(v) not in (int, float) or not math.isfinite(v) or not lo <= v <= hi:
            raise _bad(where, f"a finite number in [{lo:g}, {hi:g}]", v)
    return check


def _bool(v: Any, where: str) -> None:
    if type(v) is not bool:
        raise _bad(where, "true or false", v)


def _opt(inner: Check) -> Check:
    def check(v: Any, where: str) -> None:
        if v is not None:
            inner(v, where)
    return check


def _any(*inners: Check, want: str) -> Check:
    def check(v: Any, where: str) -> None:
        for inner in inners:
            try:
                inner(v, where)
                return
            except FrameError:
                pass
        raise _bad(where, want, v)
    return check


def _list(item: Check, max_len: int = 4096) -> Check:
    def check(v: Any, where: str) -> None:
        if not isinstance(v, list) or len(v) > max_len:
            raise _bad(where, f"a list of at most {max_len} items", v)
        for i, x in enumerate(v):
            item(x, f"{where}[{i}]")
    return check


def _map(value: Check, max_len: int = 256, key_len: int = 256) -> Check:
    def check(v: Any, where: str) -> None:
        if not isinstance(v, dict) or len(v) > max_len:
            raise _bad(where, f"an object of at most {max_len} keys", v)
        for k, x in v.items():
            if len(k) > key_len:
                raise _bad(where, f"an object with keys of at most {key_len} characters", k)
            value(x, f"{where}.{k[:40]}")
    return check


def _record(fields: dict, required: tuple = ()) -> Check:
    def check(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            raise _bad(where, "an object", v)
        for name in required:
            if name not in v:
                raise FrameError(f"{where} lacks its {name!r} field")
        for name, inner in fields.items():
            if name in v:
                inner(v[name], f"{where}.{name}")
    return check


_HEX = "[0-9a-f]*"
_SCALAR = _any(_opt(_str(1024)), _bool, _int(-_INT64, _INT64), _num(-1e300, 1e300),
               want="a string, number, true/false or null")
_FACTS = _map(_SCALAR, max_len=64)
_PORT = _int(1, 65535)
_ADDR_SHAPE = _str(300, pattern=r"(\[[0-9A-Fa-f:.%\w]*\]|[\w.\-]*):\d{1,5}")


def _addr(v: Any, where: str) -> None:
    # "host:port"; the host may be empty (the receiver fills in where it reached the sender).
    _ADDR_SHAPE(v, where)
    if not 0 <= int(v.rpartition(":")[2]) <= 65535:
        raise _bad(where, "host:port with a port in [0, 65535]", v)


_ADDR = _addr
_WEIGHT = _any(_str(8, choices=("auto",)), _num(1e-12, 1e12), want="'auto' or a number > 0")
_PEER_ID = _str(128)
THERMAL_LEVELS = ("nominal", "moderate", "heavy", "trapping", "sleeping", "unknown")
"""A heartbeat's thermal pressure level: macOS's (macos.PRESSURE_LEVELS), or unknown (off macOS)."""
_GONE = _record({"rank": _opt(_int(0, 65535)), "kind": _str(8, choices=("lost", "left")), "msg": _str(4096),
                 "reason": _str(512), "after": _opt(_int()), "generation": _opt(_int()), "peer": _opt(_PEER_ID)},
                required=("kind", "msg"))
_WORLD = _record({"generation": _int(), "peers": _list(_PEER_ID), "addrs": _list(_ADDR),
                  "weights": _list(_num(0.0, 1.0)), "nodes": _list(_FACTS), "joined": _list(_PEER_ID),
                  "why": _str(1024)},
                 required=("generation", "peers", "addrs", "weights", "nodes"))
"""A generation of an elastic run (heartbeat answers): who is in, in rank order, with their
data addresses and shares; `joined`: the peers new in it (they need the training state)."""

SCHEMAS: dict[str, dict[str, Check]] = {
    # handshake (protocol.py)
    "hello": {"purpose": _str(32), "name": _str(256), "cnonce": _str(128, pattern=_HEX)},
    "challenge": {"snonce": _str(128, pattern=_HEX), "has_token": _bool, "proof": _str(128, pattern=_HEX)},
    "auth": {"purpose": _str(32), "has_token": _bool, "proof": _str(128, pattern=_HEX),
             # join (membership.py)
             "fingerprint": _map(_str(4096), max_len=8192, key_len=512), "facts": _FACTS, "tensor_addr": _ADDR,
             "weight": _WEIGHT, "proto": _int(),
             # agent registration and job submission (agent.py)
             "master_addr": _str(256), "my_addr": _str(256), "config_yaml": _str(MAX_MESSAGE_BYTES)},
    "refuse": {"reason": _str(65536)},
    "error": {"reason": _str(65536)},
    # coordinator (coordinator.py, membership.py)
    "accepted": {"joined": _int(0, 65536), "expected": _int(1, 65536), "running": _bool},
    "welcome": {"rank": _int(0, 65535), "world_size": _int(1, 65536), "generation": _int(), "addrs": _list(_ADDR),
                "weights": _list(_num(0.0, 1.0)), "run": _map(_SCALAR, max_len=64), "nodes": _list(_FACTS),
                "hb_port": _PORT, "peer_id": _PEER_ID, "proto": _int(), "running": _bool},
    "status": {"nodes": _list(_map(_SCALAR, max_len=64)), "kind": _str(32), "generation": _int(),
               "run": _map(_SCALAR, max_len=64), "job_id": _opt(_str(128)),
               "events": _list(_record({"generation": _int(), "time": _num(), "what": _str(2048)},
                                       required=("generation", "time", "what")), max_len=64)},
    "log": {"line": _str(MAX_MESSAGE_BYTES), "rank": _int(0, 65535), "job_id": _opt(_str(128))},
    # agents (agent.py)
    "registered": {"hb_port": _PORT, "peer_id": _PEER_ID, "label": _str(256)},
    "job": {"job_id": _str(128), "config_yaml": _str(MAX_MESSAGE_BYTES), "rank": _opt(_int(0, 65535))},
    "job_started": {"job_id": _str(128), "nodes": _list(_str(256))},
    "exit": {"code": _int(-65536, 65536), "job_id": _opt(_str(128)), "node": _str(256), "rank": _opt(_int(0, 65535))},
    "job_done": {"job_id": _str(128), "exit_codes": _map(_int(-65536, 65536), max_len=4096),
                 "error": _opt(_str(65536))},
    "cancel": {"job_id": _opt(_str(128))},
    "cancelled": {"job_id": _opt(_str(128)), "exit_codes": _map(_int(-65536, 65536), max_len=4096)},
    # heartbeats (heartbeat.py)
    "hb": {"peer": _PEER_ID, "n": _int(), "step": _opt(_int()), "samples_per_s": _opt(_num()),
           "state": _str(32), "thermal": _str(16, choices=THERMAL_LEVELS),
           "gone": _map(_GONE, max_len=4096, key_len=128), "world": _WORLD},
    "bye": {"peer": _PEER_ID, "n": _int(), "reason": _str(512), "after": _opt(_int()), "step": _opt(_int()),
            "rank": _int(0, 65535)},
}
"""Every message kind and the fields it may carry. A message of a kind not listed is refused."""

REQUIRED: dict[str, tuple] = {
    "hello": ("purpose", "name", "cnonce"),
    "challenge": ("snonce", "has_token", "proof"),
    "auth": ("purpose", "has_token", "proof"),
    "refuse": ("reason",), "error": ("reason",),
    "accepted": ("joined", "expected"),
    "welcome": ("rank", "world_size", "generation", "addrs", "weights", "run", "nodes", "hb_port", "peer_id"),
    "status": ("nodes",),
    "log": ("line",),
    "registered": ("hb_port", "peer_id", "label"),
    "job": ("job_id", "config_yaml"),
    "job_started": ("job_id", "nodes"),
    "exit": ("code",),
    "job_done": ("job_id", "exit_codes"),
    "cancelled": ("exit_codes",),
}


def _check_welcome(msg: dict) -> None:
    n = msg["world_size"]
    if not msg["rank"] < n or not len(msg["addrs"]) == len(msg["weights"]) == len(msg["nodes"]) == n:
        raise FrameError(f"welcome message is inconsistent: rank {msg['rank']} of {n} with {len(msg['addrs'])} "
                         f"addresses, {len(msg['weights'])} weights and {len(msg['nodes'])} nodes")


def _check_hb(msg: dict) -> None:
    world = msg.get("world")
    if world is not None and not len(world["peers"]) == len(world["addrs"]) == len(world["weights"]) \
            == len(world["nodes"]) >= 1:
        raise FrameError(f"heartbeat's world is inconsistent: {len(world['peers'])} peers with "
                         f"{len(world['addrs'])} addresses, {len(world['weights'])} weights and "
                         f"{len(world['nodes'])} nodes")


_CROSS_CHECKS: dict[str, Callable[[dict], None]] = {"welcome": _check_welcome, "hb": _check_hb}


class Complaints:
    """Logs bad or hostile messages without letting a flood fill the log: the first of each kind
    at once, then at most one line every `every` seconds saying how many came meanwhile."""

    def __init__(self, where: str, every: float = 10.0):
        self.where = where
        self.every = every
        self._seen: dict[str, list] = {}  # what -> [last logged at, suppressed since]

    def __call__(self, what: str, detail: str) -> None:
        now = time.monotonic()
        entry = self._seen.get(what)
        if entry is not None and now - entry[0] < self.every:
            entry[1] += 1
            return
        more = f" ({entry[1]} more since the last report)" if entry is not None and entry[1] else ""
        if entry is None and len(self._seen) >= 64:
            self._seen.clear()  # bounded: a stream of distinct complaints cannot grow this table
        self._seen[what] = [now, 0]
        log.warning("%s: %s: %s%s", self.where, what, detail[:300], more)


def make_socket(ctx: zmq.Context, kind: int, heartbeat_interval: float = 1.0,
                identity: Optional[bytes] = None) -> zmq.Socket:
    """A control-plane socket with the options every control socket shares.

    ZMTP heartbeats make libzmq drop a dead TCP connection (a downed link gives no other event),
    but liveness is still decided by application heartbeats; see heartbeat.py.
    """
    sock = ctx.socket(kind)
    # Never block close() on unsent control messages to a dead peer.
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.setsockopt(zmq.RCVHWM, 1000)
    ivl_ms = max(50, int(heartbeat_interval * 1000 / 2))
    sock.setsockopt(zmq.HEARTBEAT_IVL, ivl_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ivl_ms * 4)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 4096)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    # No ROUTER_HANDOVER: with it, anyone who connects under a member's routing id takes over
    # that member's slot (a forged heartbeat did, and libzmq later aborted on an assertion).
    # Peers are known by what they prove in a message, never by a routing id they chose.
    return sock


def tcp(host: str, port: int) -> str:
    return f"tcp://{host}:{int(port)}"


def bind(sock: zmq.Socket, host: str, port: int) -> int:
    """Bind `sock` to host:port, or to a free port when port is 0; returns the port bound."""
    if port:
        sock.bind(tcp(host, port))
        return int(port)
    return sock.bind_to_random_port(f"tcp://{host}")


def new_nonce() -> str:
    return os.urandom(NONCE_BYTES).hex()


def proof(token: Optional[str], who: str, first: str, second: str) -> str:
    """HMAC-SHA256(token, who|first|second) in hex; '' when there is no token."""
    if not token:
        return ""
    msg = f"{who}|{first}|{second}".encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def session_key(token: Optional[str], cnonce: str, snonce: str) -> bytes:
    """The key one join's heartbeats and byes are signed with (see the module docstring)."""
    return hmac.new((token or "").encode(), f"heartbeat|{cnonce}|{snonce}".encode(), hashlib.sha256).digest()


def sign(key: bytes, direction: bytes, body: bytes) -> list:
    """[body, HMAC-SHA256(key, direction | body)]; `direction` keeps a message from being
    reflected back to its sender as if the other side had said it."""
    return [body, hmac.new(key, direction + b"|" + body, hashlib.sha256).digest()]


def verify(key: bytes, direction: bytes, body: bytes, mac: bytes) -> bool:
    return len(mac) == MAC_BYTES and hmac.compare_digest(
        hmac.new(key, direction + b"|" + bytes(body), hashlib.sha256).digest(), bytes(mac))


def route_address(peer_host: str) -> str:
    """This machine's address on the route toward `peer_host` (UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer_host, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class Handshake:
    """Server half of the token challenge, one pending nonce per peer routing id."""

    def __init__(self, token: Optional[str], name: str):
        self.token = token
        self.name = name
        self._pending: dict[bytes, tuple[str, str, float]] = {}

    def on_hello(self, ident: bytes, msg: dict) -> bytes:
        """Answer a HELLO with a CHALLENGE, or a REFUSE naming the mismatch."""
        if msg["v"] != PROTOCOL_VERSION:
            return encode("refuse", reason=(
                f"protocol version differs: master speaks MacFleet protocol {PROTOCOL_VERSION}, "
                f"this node speaks {msg['v']}; install the same macfleet version on every Mac"))
        if msg.get("name") != self.name:
            return encode("refuse", reason=(
                f"cluster name differs: master is {self.name!r}, this node asked for "
                f"{msg.get('name')!r}; set cluster.name to match"))
        cnonce = str(msg.get("cnonce", ""))
        snonce = new_nonce()
        self._pending[ident] = (cnonce, snonce, time.monotonic())
        # Forget abandoned handshakes so a port scanner cannot grow this table without bound.
        if len(self._pending) > 256:
            oldest = sorted(self._pending.items(), key=lambda kv: kv[1][2])[:128]
            for key, _ in oldest:
                self._pending.pop(key, None)
        return encode("challenge", snonce=snonce, has_token=bool(self.token),
                      proof=proof(self.token, "master", cnonce, snonce))

    def check_auth(self, ident: bytes, msg: dict) -> Optional[str]:
        """None when the AUTH message proves the token, else the reason to refuse."""
        return self.authenticate(ident, msg)[0]

    def authenticate(self, ident: bytes, msg: dict) -> tuple[Optional[str], Optional[bytes]]:
        """(None, this join's session key) when the AUTH message proves the token, else
        (the reason to refuse, None)."""
        pending = self._pending.pop(ident, None)
        if pending is None:
            return "no challenge is pending for this connection; start again with HELLO", None
        cnonce, snonce, _ = pending
        if not self.token:
            if msg.get("has_token"):
                return ("this node has a join token but the master has none; set the same "
                        "cluster.token (or MACFLEET_TOKEN) on the master, or remove it here"), None
            return None, session_key(None, cnonce, snonce)
        if not msg.get("has_token"):
            return ("the master requires a join token and this node has none; set cluster.token "
                    "or the MACFLEET_TOKEN environment variable"), None
        expected = proof(self.token, "node", snonce, cnonce)
        if not hmac.compare_digest(expected, str(msg.get("proof", ""))):
            return "wrong join token; use the master's cluster.token (or MACFLEET_TOKEN)", None
        return None, session_key(self.token, cnonce, snonce)


def client_handshake(sock: zmq.Socket, token: Optional[str], name: str, purpose: str,
                     payload: dict, timeout: float) -> dict:
    """Run HELLO/CHALLENGE/AUTH on a connected DEALER; returns the master's answer.

    Raises JoinRefusedError on a refusal (or a master that cannot prove the token) and
    TimeoutError when the master does not answer within `timeout`.
    """
    return client_handshake_keyed(sock, token, name, purpose, payload, timeout)[0]


def client_handshake_keyed(sock: zmq.Socket, token: Optional[str], name: str, purpose: str,
                           payload: dict, timeout: float) -> tuple[dict, bytes]:
    """`client_handshake`, plus this join's session key (for signing heartbeats)."""
    cnonce = new_nonce()
    sock.send(encode("hello", purpose=purpose, name=name, cnonce=cnonce))
    challenge = _recv(sock, timeout, ("challenge", "refuse", "error", "hello"))
    if challenge["t"] == "hello":
        # TCP simultaneous open: dialing our own address while nothing listens there can
        # connect the socket to itself (the port lies in the ephemeral range). No master yet.
        raise TimeoutError("connected to itself")
    if challenge["t"] in ("refuse", "error"):
        raise JoinRefusedError(challenge["reason"])
    snonce = str(challenge.get("snonce", ""))
    if token:
        if not challenge.get("has_token"):
            _refuse_master(sock, purpose, timeout,
                           "the master has no join token but this node has one; set the same cluster.token "
                           "(or MACFLEET_TOKEN) on the master, or remove it here")
        if not hmac.compare_digest(proof(token, "master", cnonce, snonce), str(challenge.get("proof", ""))):
            _refuse_master(sock, purpose, timeout,
                           "the master could not prove it knows the join token (wrong token on one side, or "
                           "not a MacFleet master); use the same cluster.token on every node")
    sock.send(encode("auth", purpose=purpose, has_token=bool(token),
                     proof=proof(token, "node", snonce, cnonce), **payload))
    answer = _recv(sock, timeout, None)
    if answer["t"] in ("refuse", "error"):
        raise JoinRefusedError(answer["reason"])
    return answer, session_key(token, cnonce, snonce)


def _refuse_master(sock: zmq.Socket, purpose: str, timeout: float, reason: str) -> NoReturn:
    """Tell the master why this node gives up, so it logs the refusal too, then raise. Its answer
    means our word arrived before the caller closes the socket (linger 0 would drop it)."""
    sock.send(encode("refuse", purpose=purpose, reason=reason))
    try:
        _recv(sock, min(timeout, 1.0), None)
    except (TimeoutError, FrameError):
        pass  # an older master says nothing
    raise JoinRefusedError(reason)


def _recv(sock: zmq.Socket, timeout: float, expect: Optional[tuple]) -> dict:
    if not sock.poll(int(timeout * 1000), zmq.POLLIN):
        raise TimeoutError("no answer")
    return decode(sock.recv(), expect)


def request(ctx: zmq.Context, host: str, port: int, token: Optional[str], name: str, purpose: str,
            payload: dict, timeout: float) -> dict:
    """One authenticated request/answer on a fresh DEALER (status queries, job submits)."""
    sock = make_socket(ctx, zmq.DEALER)
    try:
        sock.connect(tcp(host, port))
        try:
            return client_handshake(sock, token, name, purpose, payload, timeout)
        except TimeoutError:
            raise MacFleetError(
                f"no MacFleet master answered at {host}:{port} within {timeout:.0f} s; check that "
                f"`macfleet launch --role master` (or the training master) runs there and the port "
                f"is reachable") from None
    finally:
        sock.close(0)

