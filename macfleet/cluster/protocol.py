"""Control-plane wire format, sockets and the join-token handshake.

Owns everything the coordinator, the heartbeat threads and the agents say to each other:

* Messages are one JSON object per ZeroMQ frame (`encode` / `decode`), never pickle. Every
  message has ``"t"`` (its type) and ``"v"`` (``PROTOCOL_VERSION``); `decode` validates both and
  the size, so a stray or hostile frame is a `FrameError`, not a crash.
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
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import time
from typing import Any, NoReturn, Optional

import zmq

from macfleet.config import PROTOCOL_VERSION
from macfleet.errors import FrameError, JoinRefusedError, MacFleetError

MAX_MESSAGE_BYTES = 1 << 20
"""Control messages are small; anything bigger is a protocol error (config YAML fits easily)."""

NONCE_BYTES = 16


def encode(msg_type: str, **fields: Any) -> bytes:
    """One control message as a JSON frame: {"t": type, "v": PROTOCOL_VERSION, ...fields}."""
    body = {"t": msg_type, "v": PROTOCOL_VERSION}
    body.update(fields)
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def decode(frame: bytes, expect: Optional[tuple] = None) -> dict:
    """Parse and validate one control frame; raises FrameError on anything malformed.

    A version mismatch is not a FrameError here: the handshake reports it by name, so callers
    read ``msg["v"]`` themselves where it matters.
    """
    if len(frame) > MAX_MESSAGE_BYTES:
        raise FrameError(f"control message of {len(frame)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = json.loads(bytes(frame).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"control message is not JSON ({exc}); is another program on this port?") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str) or not isinstance(msg.get("v"), int):
        raise FrameError("control message lacks its type or version; is another program on this port?")
    if expect is not None and msg["t"] not in expect:
        raise FrameError(f"expected a {'/'.join(expect)} message, got {msg['t']!r}")
    return msg


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
    if kind == zmq.ROUTER:
        # A peer that reconnects under the same routing id takes over its old slot.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
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
        pending = self._pending.pop(ident, None)
        if pending is None:
            return "no challenge is pending for this connection; start again with HELLO"
        cnonce, snonce, _ = pending
        if not self.token:
            if msg.get("has_token"):
                return ("this node has a join token but the master has none; set the same "
                        "cluster.token (or MACFLEET_TOKEN) on the master, or remove it here")
            return None
        if not msg.get("has_token"):
            return ("the master requires a join token and this node has none; set cluster.token "
                    "or the MACFLEET_TOKEN environment variable")
        expected = proof(self.token, "node", snonce, cnonce)
        if not hmac.compare_digest(expected, str(msg.get("proof", ""))):
            return "wrong join token; use the master's cluster.token (or MACFLEET_TOKEN)"
        return None


def client_handshake(sock: zmq.Socket, token: Optional[str], name: str, purpose: str,
                     payload: dict, timeout: float) -> dict:
    """Run HELLO/CHALLENGE/AUTH on a connected DEALER; returns the master's answer.

    Raises JoinRefusedError on a refusal (or a master that cannot prove the token) and
    TimeoutError when the master does not answer within `timeout`.
    """
    cnonce = new_nonce()
    sock.send(encode("hello", purpose=purpose, name=name, cnonce=cnonce))
    challenge = _recv(sock, timeout, ("challenge", "refuse", "hello"))
    if challenge["t"] == "hello":
        # TCP simultaneous open: dialing our own address while nothing listens there can
        # connect the socket to itself (the port lies in the ephemeral range). No master yet.
        raise TimeoutError("connected to itself")
    if challenge["t"] == "refuse":
        raise JoinRefusedError(challenge.get("reason", "refused"))
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
    if answer["t"] == "refuse":
        raise JoinRefusedError(answer.get("reason", "refused"))
    return answer


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

