"""Striping (several TCP connections per peer): real sockets on 127.0.0.1, ranks as threads.

Chunks of one peer may arrive in any order over its stripes; the receiver must hand them out by
offset, drop frames of another generation, and turn a chunk that never comes into the usual
PeerLostError at the deadline.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from macfleet.comm import Group
from macfleet.comm.framing import KIND_DATA, Header, byte_view
from macfleet.comm.launch import free_ports
from macfleet.comm.transport import Transport
from macfleet.errors import MacFleetError, PeerLostError

CHUNK = 16  # bytes: 4 float32 per chunk
COUNT = 6


def _pair(stripes: int, body0, body1, timeout: float = 10.0):
    """Two Transports, each made, handshaken and used on its own thread; body_r(tp) runs there."""
    addrs = [f"127.0.0.1:{p}" for p in free_ports(2)]
    out: list = [None, None]

    def run(rank, body):
        tp = None
        try:
            tp = Transport(rank, 2, addrs, generation=0, timeout=timeout, stripes=stripes)
            tp.handshake(time.monotonic() + timeout)
            tp.seq, tp.op = 1, "test"
            out[rank] = body(tp)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            out[rank] = exc
        finally:
            if tp is not None:
                tp.close()

    threads = [threading.Thread(target=run, args=(r, b)) for r, b in enumerate((body0, body1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def _chunk_header(k: int, *, generation: int = 0) -> Header:
    return Header(KIND_DATA, torch.float32, (COUNT * 4,), 1, generation, 0, 0, 1, k * CHUNK, CHUNK, COUNT * CHUNK)


def _send_chunks(order, *, other_generation_first: bool = False):
    def body(tp):
        if other_generation_first:
            # Right in every field but the generation: must be dropped, never handed out.
            tp.send(0, _chunk_header(0, generation=7), byte_view(torch.full((4,), 1e6)))
        for k in order:
            tp.send(0, _chunk_header(k), byte_view(torch.full((4,), float(k))))
        return "sent"
    return body


def test_striped_chunks_are_handed_out_by_offset_whatever_order_they_arrive():
    def receive(tp):
        got = []
        for k in range(COUNT):
            h, body = tp.recv(1, time.monotonic() + 10, offset=k * CHUNK)
            got.append((h.offset, torch.frombuffer(body, dtype=torch.float32).clone()))
        return got, tp.reordered_count, tp.dropped_count

    # Sent last chunk first, round-robin over 3 connections: they arrive out of order.
    got, sent = _pair(3, receive, _send_chunks(reversed(range(COUNT)), other_generation_first=True))
    assert sent == "sent"
    chunks, reordered, dropped = got
    assert [off for off, _ in chunks] == [k * CHUNK for k in range(COUNT)]
    assert all(torch.equal(t, torch.full((4,), float(k))) for k, (_, t) in enumerate(chunks))
    assert reordered >= 1  # chunk 0 came last
    assert dropped == 1  # the frame of generation 7


def test_a_chunk_lost_on_one_stripe_is_peer_lost_naming_what_arrived():
    def receive(tp):
        tp.recv(1, time.monotonic() + 10, offset=0)
        started = time.monotonic()
        try:
            tp.recv(1, time.monotonic() + 1.0, offset=CHUNK)
        except PeerLostError as exc:
            return exc, time.monotonic() - started
        return None, 0.0

    def send_all_but_one(tp):
        _send_chunks([0, 2, 3])(tp)
        return "sent"

    (exc, waited), _ = _pair(2, receive, send_all_but_one, timeout=1.0)
    assert isinstance(exc, PeerLostError), exc
    assert exc.rank == 1 and 0.9 < waited < 5
    assert "striped over 2 connections" in str(exc) and "[32, 48]" in str(exc)


def _groups(n: int, **kw) -> list[Group]:
    addrs = [f"127.0.0.1:{p}" for p in free_ports(n)]
    out: list = [None] * n
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, Group(r, n, addrs, **kw))) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(g, Group) for g in out), out
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_striped_groups_match_torch_and_reuse_buffers_safely(n):
    groups = _groups(n, timeout=30, chunk_bytes=4096, stripes=3)
    results: list = [None] * n

    def run(r):
        g = groups[r]
        gen = torch.Generator().manual_seed(r)
        data = [torch.randn(numel, generator=gen) for numel in (0, 1, 1031, 70_001)]
        sums = [g.all_reduce(t.clone()) for t in data]
        # The buffer is refilled at once after every call: the striped trackers must have covered every send.
        buf = torch.empty(50_000)
        reused = []
        for i in range(5):
            buf.fill_(float(r + i))
            reused.append(g.all_reduce(buf).clone())
        bcast = g.broadcast(torch.arange(30_000, dtype=torch.float32) * (r + 1), src=n - 1)
        parts = g.all_gather(torch.arange(r * 5000, dtype=torch.int64))
        results[r] = dict(data=data, sums=sums, reused=reused, bcast=bcast, parts=parts)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for g in groups:
            g.close()
    assert all(res is not None for res in results), "a rank failed"
    for i in range(4):
        expected = sum(res["data"][i] for res in results)
        for res in results:
            assert torch.allclose(res["sums"][i], expected, atol=1e-5)
            assert torch.equal(res["sums"][i], results[0]["sums"][i])  # bit-identical on every rank
    for i in range(5):
        assert all(torch.equal(res["reused"][i], torch.full((50_000,), float(sum(r + i for r in range(n))))) for res in results)
    assert all(torch.equal(res["bcast"], torch.arange(30_000, dtype=torch.float32) * n) for res in results)
    for res in results:
        assert [p.tolist() for p in res["parts"]] == [list(range(r * 5000)) for r in range(n)]


def test_stripes_are_checked():
    with pytest.raises(MacFleetError, match="stripes"):
        Group(0, 1, ["127.0.0.1:1"], stripes=0)
