"""The plain-TCP data plane (comm/tcp.py) against what a hostile or stale peer sends it.

Real sockets on 127.0.0.1, ranks as threads. Correctness of the collectives over it (every
algorithm, 2-4 ranks, killed ranks) is tested in tests/integration/test_collectives.py, which
runs the main tests on both transports; the ZeroMQ transport's own rogue-frame tests are in
test_comm_group.py.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from macfleet.comm import Group, framing
from macfleet.comm.framing import KIND_DATA, KIND_HELLO, Header
from macfleet.comm.launch import free_ports
from macfleet.errors import MacFleetError, PeerLostError
from tests.unit.test_comm_group import _each, _groups


def _header(**over) -> bytes:
    fields = dict(kind=KIND_HELLO, dtype=torch.float32, shape=(0,), sender=1, generation=0, session=0, step=0,
                  seq=0, offset=0, nbytes=0, total=0)
    fields.update(over)
    return framing.encode_header(Header(**fields))


def _rogue(addr: str, payload: bytes) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(payload)
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_groups_run_over_zmq_unless_told_tcp(monkeypatch):
    groups = _groups(2, timeout=10)
    try:
        assert [g.transport for g in groups] == ["zmq", "zmq"]
    finally:
        for g in groups:
            g.close()
    monkeypatch.setenv("MACFLEET_TRANSPORT", "tcp")
    groups = _groups(2, timeout=10)
    try:
        assert [g.transport for g in groups] == ["tcp", "tcp"]
        out = _each(groups, lambda g: g.all_reduce(torch.full((3_000_000,), 1.0 + g.rank)))
        assert all(torch.equal(r, torch.full((3_000_000,), 3.0)) for r in out), out
    finally:
        for g in groups:
            g.close()
    monkeypatch.setenv("MACFLEET_TRANSPORT", "carrier-pigeon")
    with pytest.raises(MacFleetError, match="choose zmq .* or tcp"):
        Group(0, 2, ["127.0.0.1:1", "127.0.0.1:2"], timeout=1)


def test_hostile_connections_are_rejected_and_closed_while_the_group_keeps_working():
    groups = _groups(2, timeout=20, transport="tcp")
    try:
        g0 = groups[0]
        payloads = {
            "bad magic": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".ljust(80, b" "),
            "wire version": (lambda h: h[:2] + bytes([framing.WIRE_VERSION + 5]) + h[3:])(_header()),
            "before a HELLO": _header(kind=KIND_DATA, shape=(4,), nbytes=16, total=16, seq=1) + b"\0" * 16,
            "session": _header(session=framing.session_id("another run", 0)),
            "dimensions": (lambda h: h[:5] + bytes([framing.MAX_NDIM + 1]) + h[6:])(_header()) + b"\0" * 200,
        }
        rogues = {words: _rogue(g0.addrs[0], data) for words, data in payloads.items()}
        # Rank 0 reads the rogue connections while it waits for rank 1's data, so collectives run
        # until all five were seen (or 10 s passed), and each result must stay right meanwhile.
        deadline = time.monotonic() + 10
        while len(g0.rejected) < len(payloads) and time.monotonic() < deadline:
            out = _each(groups, lambda g: g.all_reduce(torch.full((4,), 1.0 + g.rank)))
            assert all(torch.equal(r, torch.full((4,), 3.0)) for r in out), out
        messages = " | ".join(str(e) for e in g0.rejected)
        assert len(g0.rejected) == len(payloads), messages
        for words, sock in rogues.items():
            assert words in messages, (words, messages)
            assert _closed_by_peer(sock), f"the connection that sent {words!r} was left open"
            sock.close()
        out = _each(groups, lambda g: g.all_reduce(torch.full((1_000_000,), 1.0 + g.rank)))
        assert all(torch.equal(r, torch.full((1_000_000,), 3.0)) for r in out), out
        assert groups[1].rejected == []
    finally:
        for g in groups:
            g.close()


def test_a_first_connection_taken_by_a_stale_listener_is_made_again():
    """Rank 1 connects while an old listener still holds rank 0's port; that listener takes the
    connection and its HELLO and goes away. Rank 0 comes up later and still hears rank 1."""
    p0, p1 = free_ports(2)
    addrs = [f"127.0.0.1:{p0}", f"127.0.0.1:{p1}"]
    stale = socket.create_server(("127.0.0.1", p0))
    made: dict = {}
    t = threading.Thread(target=lambda: made.setdefault("g1", Group(1, 2, addrs, timeout=20, transport="tcp")),
                         daemon=True)
    t.start()
    stale.settimeout(10)
    conn, _ = stale.accept()
    conn.settimeout(10)
    assert conn.recv(framing.HEADER_FIXED_BYTES)[:2] == framing.MAGIC, "rank 1 sent no HELLO"
    conn.close()
    stale.close()
    g0 = Group(0, 2, addrs, timeout=20, transport="tcp")
    t.join(20)
    g1 = made["g1"]
    try:
        out = _each([g0, g1], lambda g: g.all_reduce(torch.full((10,), 1.0 + g.rank)))
        assert all(torch.equal(r, torch.full((10,), 3.0)) for r in out), out
    finally:
        g0.close()
        g1.close()


def test_a_peer_that_closed_is_named_at_the_deadline():
    groups = _groups(2, timeout=2.0, transport="tcp")
    g0, g1 = groups
    try:
        _each(groups, lambda g: g.all_reduce(torch.ones(8)))
        g1.close()
        t0 = time.monotonic()
        with pytest.raises(PeerLostError) as err:
            g0.all_reduce(torch.ones(1_000_000))
        assert err.value.rank == 1 and f"rank 1 at {g1.addrs[1]}" in str(err.value)
        assert time.monotonic() - t0 < 10
    finally:
        g0.close()


def test_idle_strangers_are_capped_oldest_first():
    from macfleet.comm.tcp import MAX_STRANGERS

    groups = _groups(2, timeout=20, transport="tcp")
    idle = []
    try:
        g0 = groups[0]
        host, port = g0.addrs[0].rsplit(":", 1)
        def work():
            out = _each(groups, lambda g: g.all_reduce(torch.full((4,), 1.0 + g.rank)))
            assert all(torch.equal(r, torch.full((4,), 3.0)) for r in out), out

        for _ in range(MAX_STRANGERS + 1):  # one at a time, so the first is the oldest rank 0 accepted
            idle.append(socket.create_connection((host, int(port)), timeout=10))
            work()  # rank 0 accepts while it waits for rank 1's data
        deadline = time.monotonic() + 10
        while not g0.rejected and time.monotonic() < deadline:
            work()
        assert len(g0.rejected) == 1 and "sent no HELLO" in str(g0.rejected[0]), g0.rejected
        assert _closed_by_peer(idle[0])  # the oldest went
        idle[-1].settimeout(0.2)
        with pytest.raises(TimeoutError):
            idle[-1].recv(1)  # the newest is still open, waiting for its HELLO
    finally:
        for sock in idle:
            sock.close()
        for g in groups:
            g.close()


def _owned(link, deadline: float = 10.0) -> bool:
    """Whether the comm thread is writing `link` itself (tcp._Link.write_now), seen within `deadline`."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if link.owned:
            return True
        time.sleep(0.001)
    return False


def test_a_one_way_send_is_written_by_the_caller_and_still_gives_up_on_a_peer_that_does_not_read():
    """A broadcast flows one way, so the TCP transport writes it on the calling thread, not the
    sender thread. A peer that never reads it must still be named at the deadline, and an abort
    must still stop the write."""
    groups = _groups(2, timeout=1.5, transport="tcp", lanes=1)
    g0, g1 = groups
    try:
        sent = [torch.arange(300_000, dtype=torch.float32) * (g.rank + 1) for g in groups]
        _each(groups, lambda g: g.broadcast(sent[g.rank], src=0))
        assert torch.equal(sent[1], torch.arange(300_000, dtype=torch.float32))
        link = g0._transport.push[1]
        # 64 MB: more than both ends' socket buffers hold, and rank 1 reads none of it.
        big = torch.ones(16_000_000)
        t0 = time.monotonic()
        with pytest.raises(PeerLostError, match="did not take data") as err:
            g0.broadcast(big, src=0)
        assert err.value.rank == 1 and time.monotonic() - t0 < 10
        assert not link.items and not link.owned  # nothing went to the sender thread; the link is free
    finally:
        for g in groups:
            g.close()

    groups = _groups(2, timeout=60, transport="tcp", lanes=1)
    g0, g1 = groups
    try:
        outcome: list = []
        writer = threading.Thread(target=lambda: outcome.append(_raised(lambda: g0.broadcast(torch.ones(16_000_000)))))
        writer.start()
        assert _owned(g0._transport.push[1])
        g0.abort(PeerLostError("rank 1 stopped answering (test)", rank=1))
        writer.join(10)
        assert not writer.is_alive()
        assert isinstance(outcome[0], PeerLostError) and "stopped answering (test)" in str(outcome[0])
    finally:
        for g in groups:
            g.close()


def _raised(fn):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - returned to the test
        return exc
    return None
