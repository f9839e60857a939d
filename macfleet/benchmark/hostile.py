"""Hostile and malformed control-plane traffic: what `macfleet benchmark --type elastic --cases
hostile` floods a live master with (and tests/integration/test_hostile.py too), on real ZeroMQ
sockets.

- The control port: `control_garbage` (random bytes, wrong frame counts, nesting deeper than
  JSON's recursion limit, numbers too long to parse, unknown kinds, fields of a wrong type or
  range) and `HOSTILE_JOINS`, joins that prove the token but carry a payload of the wrong shape
  (`hostile_auth`). The master answers each with an error.
- The heartbeat port: `forged_byes` for a live member (no signature, a wrong one, a short one,
  and an unsigned bye under the member's old routing id), forged heartbeats, byes from
  non-members and `control_garbage`, mixed by `heartbeat_garbage`. The master answers each with
  an error and the member stays a member.
- `flood_control` and `flood_heartbeat` send `n` of them, with up to `window` in flight per
  socket (answers come back in order on each one), the last one over the size limit (libzmq
  drops it with its connection: no answer is due), and tally the answers by kind.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import deque
from typing import Optional

import zmq

from macfleet.cluster.protocol import MAX_MESSAGE_BYTES, decode, encode, make_socket, new_nonce, proof, tcp
from macfleet.errors import FrameError

FORGED_BYE = "forged bye"
HOSTILE_JOIN = "hostile join"
JOIN_EVERY = 25
"""One control-port message in this many is a hostile join (HELLO, then an AUTH proving the token)."""


def control_garbage(rng: random.Random) -> list[bytes]:
    """One fuzzed multipart message: random bytes, broken JSON, or JSON that is not ours."""
    pick = rng.randrange(8)
    if pick == 0:
        return [rng.randbytes(rng.randrange(0, 600))]
    if pick == 1:
        return [rng.randbytes(rng.randrange(1, 50)) for _ in range(rng.randrange(2, 5))]
    if pick == 2:
        return [b"[" * rng.randrange(2000, 20000)]  # deeper than json's recursion limit
    if pick == 3:
        return [b'{"t":"hello","v":1,"cnonce":' + b"9" * rng.randrange(4400, 6000) + b"}"]
    if pick == 4:
        return [json.dumps(rng.choice([[], 5, None, "hello", {"t": 5, "v": 1}, {"t": "hello", "v": True},
                                       {"t": "boom", "v": 1}, {"v": 1}])).encode()]
    if pick == 5:
        junk = rng.choice([5, -1, 1e308, None, True, [], {}, "x" * 5000, [[[]]], {"a": {"b": []}}])
        field = rng.choice(["purpose", "name", "cnonce", "has_token", "proof", "line", "rank", "joined", "weights"])
        kind = rng.choice(["hello", "auth", "log", "accepted", "welcome", "refuse", "hb", "bye", "status"])
        return [encode(kind, **{field: junk})]
    if pick == 6:
        return [b'{"t":"hello","v":1,"purpose":"join","name":"macfleet","cnonce":' + rng.choice(
            [b"Infinity", b"NaN", b"1e999", b"-0"]) + b"}"]
    return [encode("hello", purpose="join", name="macfleet", cnonce="00")[:rng.randrange(1, 60)]]


# Joins that prove the token but carry a payload of the wrong shape: each used to be read as is.
HOSTILE_JOINS = [
    {"fingerprint": 5}, {"fingerprint": {"a": 5}}, {"fingerprint": ["a"]}, {"fingerprint": {"a": "x" * 10000}},
    {"facts": "air"}, {"facts": {"rank": "1"}}, {"facts": {"rank": True}}, {"facts": {"rank": -3}},
    {"facts": {"samples_per_s": "fast"}}, {"facts": {"samples_per_s": -1.0}}, {"facts": {"host": {"nested": 1}}},
    {"facts": {str(i): i for i in range(500)}},
    {"tensor_addr": 5}, {"tensor_addr": "no-port"}, {"tensor_addr": "h:99999"}, {"tensor_addr": "a b:1"},
    {"weight": "heavy"}, {"weight": -1}, {"weight": 0}, {"weight": [1]},
    {"proto": "1"}, {"purpose": 7},
]
GOOD_JOIN = {"fingerprint": {"model": "digits_cnn", "global_batch": "64"}, "facts": {"host": "fuzz"},
             "tensor_addr": ":29299", "weight": 1.0, "proto": 1}


def join_hello(cnonce: str) -> list[bytes]:
    return [encode("hello", purpose="join", name="macfleet", cnonce=cnonce)]


def hostile_auth(token: str, snonce: str, cnonce: str, payload: dict) -> list[bytes]:
    """The AUTH of a join that proves `token` (answering the master's `snonce`) with `payload`
    over a well-formed join; sent raw, so a field of the wrong type reaches the master as is."""
    body = dict(GOOD_JOIN, has_token=True, proof=proof(token, "node", snonce, cnonce), purpose="join")
    body.update(payload)
    return [json.dumps(dict(body, t="auth", v=1)).encode()]


def forged_byes(peer: str, rank: int, n: int = 10**9) -> dict[str, tuple[Optional[bytes], list[bytes]]]:
    """Byes that claim to come from member `peer` (rank `rank`) without its session key, by how
    they are forged: (the routing id to send under, or None; the frames)."""
    bye = encode("bye", peer=peer, n=n, reason="Ctrl-C", step=1, rank=rank)
    return {
        "no signature": (None, [bye]),
        "a wrong signature": (None, [bye, os.urandom(32)]),
        "a short signature": (None, [bye, b"x"]),
        # The old way in: the member's routing id and an unsigned bye.
        "an old routing id": (peer.encode(), [encode("bye")]),
    }


def heartbeat_garbage(rng: random.Random, peers: list[str]) -> tuple[str, Optional[bytes], list[bytes]]:
    """One fuzzed heartbeat-port message aimed at the members `peers` (peer ids; rank = index + 1):
    (what it is, the routing id to send under or None, the frames)."""
    pick = rng.randrange(8)
    i = rng.randrange(len(peers))
    if pick < 3:
        identity, frames = rng.choice(list(forged_byes(peers[i], i + 1, rng.randrange(1, 1 << 40)).values()))
        return FORGED_BYE, identity, frames
    if pick == 3:  # a heartbeat that would keep a member alive or report its progress
        body = encode("hb", peer=peers[i], n=rng.randrange(1, 1 << 40), step=rng.randrange(0, 1 << 20),
                      samples_per_s=1e6, state="training")
        return "forged heartbeat", None, rng.choice([[body], [body, rng.randbytes(32)]])
    if pick == 4:
        stranger = rng.choice(["master", "g0-r1", f"g{rng.randrange(2, 99)}-r{i + 1}", "x" * 128])
        return "non-member", None, [encode(rng.choice(["hb", "bye"]), peer=stranger, n=1, reason="x", rank=1)]
    return "garbage", None, control_garbage(rng)


def answer_kind(label: str, answer: Optional[dict]) -> str:
    """How a message was answered, for the tally: the answer's kind, and an error's reason
    (up to its first colon: the master's fixed words, not the echoed detail)."""
    if answer is None:
        return "undecodable answer"
    if answer["t"] != "error":
        return answer["t"]
    return "error: " + str(answer.get("reason", "")).split(":")[0][:80]


class Tally:
    """What one flood sent and got back."""

    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.dropped = 0       # over the size limit: libzmq drops the connection, no answer is due
        self.unanswered = 0    # no answer within the timeout: the master stopped answering
        self.seconds = 0.0
        self.answers: dict[str, dict[str, int]] = {}   # what was sent -> how it was answered -> count

    def add(self, label: str, answer: Optional[dict]) -> None:
        self.answered += 1
        kinds = self.answers.setdefault(label, {})
        kind = answer_kind(label, answer)
        kinds[kind] = kinds.get(kind, 0) + 1

    def count(self, label: str, prefix: str = "") -> int:
        """How many `label` messages got an answer starting with `prefix`."""
        return sum(c for kind, c in self.answers.get(label, {}).items() if kind.startswith(prefix))

    def as_dict(self) -> dict:
        return {"sent": self.sent, "answered": self.answered, "dropped": self.dropped, "unanswered": self.unanswered,
                "send_s": self.seconds, "answers": self.answers}


class _Silent(Exception):
    """The master did not answer within the timeout."""


class _Pipe:
    """One DEALER with up to `window` messages in flight; its answers come back in order.

    Under a routing id (`identity`) its first message is answered before any other is sent: a
    ROUTER leaves a connection under a routing id still held by another (one closed a moment ago,
    not yet reaped) unread, so until an answer comes it reconnects and sends that message again."""

    def __init__(self, ctx: zmq.Context, addr: str, window: int, timeout: float, tally: Tally,
                 identity: Optional[bytes] = None):
        self.ctx, self.addr, self.identity = ctx, addr, identity
        self.window, self.timeout, self.tally = window, timeout, tally
        self.timeout_ms = int(timeout * 1000)
        self.sock = self._connect()
        self.waiting: deque = deque()
        self.claimed = identity is None

    def _connect(self) -> zmq.Socket:
        sock = make_socket(self.ctx, zmq.DEALER, identity=self.identity)
        sock.connect(self.addr)
        return sock

    def send(self, label: str, frames: list[bytes]) -> None:
        if not self.claimed:
            self._claim(label, frames)
            return
        while len(self.waiting) >= self.window:
            self.take()
        self.sock.send_multipart(frames)
        self.tally.sent += 1
        self.waiting.append(label)

    def _claim(self, label: str, frames: list[bytes]) -> None:
        self.tally.sent += 1
        self.waiting.append(label)
        deadline, wait = time.monotonic() + self.timeout, 0.25
        self.sock.send_multipart(frames)
        while not self.sock.poll(int(wait * 1000)):
            if time.monotonic() > deadline:
                raise _Silent
            self.sock.close(0)
            self.sock = self._connect()
            self.sock.send_multipart(frames)
            wait = min(2 * wait, 2.0)
        self.take()
        self.claimed = True

    def ask(self, label: str, frames: list[bytes]) -> Optional[dict]:
        """Send one and wait for its answer (and those still in flight before it)."""
        self.send(label, frames)
        answer = None
        while self.waiting:
            answer = self.take()
        return answer

    def take(self) -> Optional[dict]:
        if not self.sock.poll(self.timeout_ms):
            raise _Silent
        try:
            answer = decode(self.sock.recv())
        except FrameError:
            answer = None
        self.tally.add(self.waiting.popleft(), answer)
        return answer


class _Flood:
    """The sockets of one flood at `addr` (one pipe per routing id) and its `tally`; on leaving,
    every answer still due is waited for, and a master that went silent leaves them unanswered."""

    def __init__(self, ctx: zmq.Context, addr: str, window: int, timeout: float):
        self.ctx, self.addr, self.window, self.timeout = ctx, addr, window, timeout
        self.tally = Tally()
        self.pipes: dict[object, _Pipe] = {}

    def pipe(self, key: object = None, identity: Optional[bytes] = None, window: Optional[int] = None) -> _Pipe:
        if key not in self.pipes:
            self.pipes[key] = _Pipe(self.ctx, self.addr, window or self.window, self.timeout, self.tally, identity)
        return self.pipes[key]

    def too_big(self) -> None:
        """One message over the size limit, on its own connection: libzmq drops that connection."""
        sock = make_socket(self.ctx, zmq.DEALER)
        try:
            sock.connect(self.addr)
            sock.send(b"x" * (MAX_MESSAGE_BYTES * 3))
            sock.setsockopt(zmq.LINGER, 3000)  # sent before it closes
        finally:
            sock.close()
        self.tally.sent += 1
        self.tally.dropped += 1

    def __enter__(self) -> "_Flood":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        silent = kind is _Silent
        try:
            if kind is None:
                for pipe in self.pipes.values():
                    while pipe.waiting:
                        pipe.take()
        except _Silent:
            silent = True
        finally:
            self.tally.seconds = time.perf_counter() - self._t0
            for pipe in self.pipes.values():
                if silent:
                    self.tally.unanswered += len(pipe.waiting)
                pipe.sock.close(0)
        return silent


def flood_control(ctx: zmq.Context, host: str, port: int, token: str, n: int, rng: random.Random,
                  window: int = 64, timeout: float = 10.0) -> Tally:
    """`n` messages to the master's control port: `control_garbage`; one in JOIN_EVERY a hostile
    join (a HELLO, then the AUTH of the next of `HOSTILE_JOINS` behind a valid proof of `token`;
    two messages); the last one over the size limit. All but that one are answered."""
    with _Flood(ctx, tcp(host, port), window, timeout) as flood:
        i = joins = 0
        while flood.tally.sent < n - 1:
            i += 1
            if i % JOIN_EVERY == 0 and flood.tally.sent + 2 < n:
                joiner = flood.pipe("join", window=1)
                cnonce = new_nonce()
                challenge = joiner.ask("join hello", join_hello(cnonce))
                if challenge is not None and challenge["t"] == "challenge":
                    joiner.send(HOSTILE_JOIN, hostile_auth(token, challenge["snonce"], cnonce,
                                                           HOSTILE_JOINS[joins % len(HOSTILE_JOINS)]))
                joins += 1
            else:
                flood.pipe().send("garbage", control_garbage(rng))
        flood.too_big()
    return flood.tally


def flood_heartbeat(ctx: zmq.Context, host: str, port: int, peers: list[str], n: int, rng: random.Random,
                    window: int = 64, timeout: float = 10.0) -> Tally:
    """`n` messages to the master's heartbeat port: `heartbeat_garbage` aimed at the members
    `peers` (under an old routing id on a socket of that id), the last one over the size limit.
    All but that one are answered with an error."""
    with _Flood(ctx, tcp(host, port), window, timeout) as flood:
        for _ in range(n - 1):
            label, identity, frames = heartbeat_garbage(rng, peers)
            flood.pipe(identity, identity).send(label, frames)
        flood.too_big()
    return flood.tally
