"""Group behaviour within one process (ranks as threads, real sockets on 127.0.0.1).

Cheap checks that need no process start-up: one rank, timeouts at connect, abort from another
thread, malformed and foreign frames on the tensor port, step mismatch, memory over 1,000
all_reduces. Multi-process correctness lives in tests/integration/test_collectives.py.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest
import torch
import zmq

from macfleet.comm import Group, framing
from macfleet.comm.framing import KIND_DATA, Header
from macfleet.comm.launch import free_ports
from macfleet.errors import FrameError, MacFleetError, PeerLostError


def _addrs(n: int) -> list[str]:
    return [f"127.0.0.1:{p}" for p in free_ports(n)]


def _groups(n: int, **kw) -> list[Group]:
    addrs = _addrs(n)
    out: list = [None] * n
    errors: list = []

    def make(r):
        try:
            out[r] = Group(r, n, addrs, **kw)
        except Exception as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def _each(groups, fn):
    """Run fn(group) on one thread per rank; return results by rank, re-raise the first error."""
    out: list = [None] * len(groups)

    def run(r):
        try:
            out[r] = fn(groups[r])
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            out[r] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_single_rank_group_is_identity():
    with Group(0, 1, _addrs(1)) as g:
        t = torch.arange(5.0)
        assert g.all_reduce(t) is t and torch.equal(t, torch.arange(5.0))
        assert torch.equal(g.all_reduce(torch.full((3,), 4.0), op="avg"), torch.full((3,), 4.0))
        assert torch.equal(g.all_reduce_async(torch.ones(2)).wait(), torch.ones(2))
        assert torch.equal(g.broadcast(torch.ones(2)), torch.ones(2))
        assert [x.tolist() for x in g.all_gather(torch.tensor([1, 2]))] == [[1, 2]]
        assert [x.tolist() for x in g.gather(torch.tensor([3]))] == [[3]]
        assert g.scatter([torch.tensor([9])]).tolist() == [9]
        g.barrier()
    g.close()  # idempotent
    with pytest.raises(MacFleetError, match="closed"):
        g.all_reduce(torch.ones(1))


def test_all_gather_check_sees_host_copies_and_fails_the_future():
    seen = []

    def check(x):
        seen.append(x.device.type)
        if x.numel() > 2:
            raise FrameError("bad payload")

    with Group(0, 1, _addrs(1)) as g:
        assert [x.tolist() for x in g.all_gather_async(torch.tensor([1, 2]), check=check).wait()] == [[1, 2]]
        with pytest.raises(FrameError, match="bad payload"):
            g.all_gather_async(torch.tensor([1, 2, 3]), check=check).wait()
    assert seen == ["cpu", "cpu"]


def test_missing_peer_fails_construction_naming_it():
    addrs = _addrs(2)
    t0 = time.monotonic()
    with pytest.raises(PeerLostError, match=f"rank 1 at {addrs[1]}") as info:
        Group(0, 2, addrs, timeout=0.5)
    assert info.value.rank == 1 and info.value.address == addrs[1]
    assert time.monotonic() - t0 < 5


def test_async_calls_complete_in_issue_order_and_non_contiguous_inputs_work():
    groups = _groups(2, timeout=20)
    try:
        def work(g):
            futs = [g.all_reduce_async(torch.full((1000,), float(i + g.rank))) for i in range(20)]
            order = []
            for i, f in enumerate(futs):
                f.then(lambda _f, i=i: order.append(i))
            vals = [f.wait()[0].item() for f in futs]
            strided = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
            g.all_reduce(strided)
            return vals, order, strided
        for vals, order, strided in _each(groups, work):
            assert vals == [2 * i + 1 for i in range(20)]
            assert order == list(range(20))
            assert torch.equal(strided, 2 * torch.arange(12.0).reshape(3, 4).t())
    finally:
        for g in groups:
            g.close()


def test_sync_calls_wait_behind_queued_async_ones():
    """A sync call runs inline on the caller's thread only when nothing is queued; behind queued
    async calls it takes its turn, so every rank still sees one issue order."""
    groups = _groups(2, timeout=20)
    try:
        def work(g):
            out = []
            for i in range(30):
                big = g.all_reduce_async(torch.full((300_000,), float(i)))   # several chunks
                g.set_step(i)                                                 # queued too
                small = g.all_reduce(torch.full((3,), float(g.rank + i)))     # must come after big
                out.append((big.wait()[0].item(), small.tolist(), big.done()))
                g.barrier()                                                   # inline: queue empty
            return out
        for out in _each(groups, work):
            assert [o[0] for o in out] == [2.0 * i for i in range(30)]
            assert [o[1] for o in out] == [[2.0 * i + 1] * 3 for i in range(30)]
            assert all(o[2] for o in out)
        assert all(g.step == 29 for g in groups)
    finally:
        for g in groups:
            g.close()


def test_abort_stops_a_blocked_collective_promptly():
    groups = _groups(2, timeout=30)
    try:
        g0 = groups[0]
        fut = g0.all_reduce_async(torch.ones(10))  # rank 1 never joins: this blocks
        time.sleep(0.2)
        t0 = time.monotonic()
        g0.abort(PeerLostError("heartbeat: rank 1 lost", rank=1, address=g0.addrs[1]))
        with pytest.raises(PeerLostError, match="heartbeat"):
            fut.wait()
        assert time.monotonic() - t0 < 0.5
        with pytest.raises(PeerLostError, match="heartbeat"):
            g0.all_reduce(torch.ones(1))  # later calls fail the same way
        with pytest.raises(PeerLostError, match="heartbeat"):
            g0.check()  # and the trainer can ask for the error without a collective
        groups[1].check()  # the other rank saw nothing wrong
    finally:
        for g in groups:
            g.close()


def _rogue(addr: str):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(f"tcp://{addr}")
    return sock


def _frame_header(**over) -> Header:
    """A well-formed header of rank 1's 4-float chunk in group session 0, generation 0."""
    fields = dict(kind=KIND_DATA, dtype=torch.float32, shape=(4,), sender=1, generation=0, session=0, step=0,
                  seq=1, offset=0, nbytes=16, total=16)
    fields.update(over)
    return Header(**fields)


@pytest.mark.parametrize("stripes", [1, 3])
def test_malformed_and_foreign_frames_are_rejected_while_the_receiver_keeps_working(stripes):
    # ZeroMQ frames from a rogue PUSH socket: the zmq transport (tests/unit/test_tcp_transport.py: tcp)
    groups = _groups(2, timeout=20, stripes=stripes, transport="zmq")
    try:
        g0 = groups[0]
        good = _frame_header(seq=2)  # claims to be rank 1, collective #2
        head = framing.encode_header(good)
        rogue = _rogue(g0.addrs[0])
        rogue.send_multipart([head[:2] + bytes([framing.WIRE_VERSION + 5]) + head[3:], b"\0" * 16])  # version
        rogue.send_multipart([head[:30], b"\0" * 16])  # truncated header
        rogue.send_multipart([head, b"\0" * 12])  # wrong size
        rogue.send_multipart([head[:4] + bytes([77]) + head[5:], b"\0" * 16])  # unknown dtype
        rogue.send(b"just one frame")
        # Well formed but of another generation: dropped, never summed.
        other_gen = _frame_header(seq=2, generation=5)
        rogue.send_multipart([framing.encode_header(other_gen), torch.full((4,), 1e6).numpy().tobytes()])
        # The rogue connects and delivers in the background; the receiver files its frames while it
        # waits for real ones, so collectives run until all five have been seen (or 10 s passed).
        deadline = time.monotonic() + 10
        while True:
            results = _each(groups, lambda g: (g.all_reduce(torch.zeros(1)), g.all_reduce(torch.full((4,), 1.0 + g.rank))))
            for res in results:
                assert torch.equal(res[1], torch.full((4,), 3.0))
            if len(g0.rejected) >= 5 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        messages = " | ".join(str(e) for e in g0.rejected)
        assert len(g0.rejected) == 5, messages
        assert all(isinstance(e, FrameError) for e in g0.rejected)
        for words in ("wire version", "truncated header", "wrong-size", "unknown dtype", "exactly 2"):
            assert words in messages
        rogue.close()
    finally:
        for g in groups:
            g.close()


@pytest.mark.parametrize("stripes", [1, 3])
def test_frame_of_another_session_is_rejected_never_summed(stripes):
    # The hazard: a dead run's PUSH socket delivers its queue to whoever binds the port later. Its frame
    # is right in every field but the session, so before sessions rank 0 summed it as rank 1's data.
    mine, stale = framing.session_id("run-b", 0), framing.session_id("run-a", 0)
    groups = _groups(2, timeout=20, session=mine, stripes=stripes, transport="zmq")
    try:
        g0, g1 = groups
        assert g0.session == g1.session == mine
        fut = g0.all_reduce_async(torch.full((4,), 1.0))  # rank 0 waits for rank 1's chunk of collective #1
        rogue = _rogue(g0.addrs[0])
        rogue.send_multipart([framing.encode_header(_frame_header(session=stale)), torch.full((4,), 1e6).numpy()])
        deadline = time.monotonic() + 20
        while not g0.rejected and time.monotonic() < deadline:  # rank 0 reads it while it waits
            time.sleep(0.01)
        assert len(g0.rejected) == 1 and "session" in str(g0.rejected[0]), g0.rejected
        assert f"{stale:#018x}" in str(g0.rejected[0]) and not fut.done()
        g1.all_reduce(torch.full((4,), 2.0))
        assert torch.equal(fut.wait(), torch.full((4,), 3.0))
        out = _each(groups, lambda g: g.all_reduce(torch.full((4,), 1.0 + g.rank)))
        assert all(torch.equal(r, torch.full((4,), 3.0)) for r in out), out
        rogue.close()
    finally:
        for g in groups:
            g.close()


def test_ranks_of_different_sessions_never_connect():
    # A stale HELLO is rejected like a stale data frame: the handshake waits for the right session.
    addrs = _addrs(2)
    made: list = [None, None]

    def make(r):
        try:
            made[r] = Group(r, 2, addrs, timeout=1.0, session=100 + r)
        except Exception as exc:  # noqa: BLE001 - checked below
            made[r] = exc

    threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for r, err in enumerate(made):
        assert isinstance(err, PeerLostError), made
        assert "session" in str(err) and f"{100 + 1 - r:#018x}" in str(err), err


@pytest.mark.parametrize("stripes", [1, 3])
def test_mismatched_step_or_shape_is_a_frame_error(stripes):
    groups = _groups(2, timeout=5, stripes=stripes)
    try:
        groups[1].set_step(7)
        out = _each(groups, lambda g: g.all_reduce(torch.ones(3)))
        assert any(isinstance(r, FrameError) and "set_step" in str(r) for r in out), out
    finally:
        for g in groups:
            g.close()
    groups = _groups(2, timeout=5, stripes=stripes)
    try:
        out = _each(groups, lambda g: g.all_reduce(torch.ones(3 + g.rank)))
        assert any(isinstance(r, FrameError) and "same shape and dtype" in str(r) for r in out), out
    finally:
        for g in groups:
            g.close()


@pytest.mark.parametrize("chunk_bytes", [64 * 1024, 1 << 20], ids=["halves", "direct"])
def test_thousand_all_reduces_do_not_grow_memory(chunk_bytes):
    groups = _groups(2, timeout=30, chunk_bytes=chunk_bytes)
    proc = psutil.Process()
    try:
        def loop(g, n):
            # 256 KB: zero-copy sends; 64 KiB chunks take the halves exchange, 1 MiB the direct one.
            t = torch.ones(64 * 1024)
            for _ in range(n):
                t.fill_(1.0)
                g.all_reduce(t)
            return t[0].item()
        _each(groups, lambda g: loop(g, 100))  # warm-up: allocator and socket buffers settle
        before = proc.memory_info().rss
        out = _each(groups, lambda g: loop(g, 1000))
        grown = proc.memory_info().rss - before
        assert out == [2.0, 2.0]
        assert grown < 20 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 1,000 all_reduces"
    finally:
        for g in groups:
            g.close()


def test_a_hello_lost_to_a_stale_listener_is_sent_again():
    """Rank 1's first HELLO is taken by an old listener still bound to rank 0's port; rank 0
    comes up after it is gone and still hears rank 1, because unacknowledged HELLOs are re-sent."""
    p0, p1 = free_ports(2)
    addrs = [f"127.0.0.1:{p0}", f"127.0.0.1:{p1}"]
    ctx = zmq.Context()
    stale = ctx.socket(zmq.PULL)
    stale.bind(f"tcp://127.0.0.1:{p0}")
    made: dict = {}
    t = threading.Thread(target=lambda: made.setdefault("g1", Group(1, 2, addrs, timeout=20, transport="zmq")),
                         daemon=True)
    t.start()
    assert stale.poll(10_000), "rank 1 sent no HELLO"
    stale.recv_multipart()  # the first HELLO is gone for good
    stale.close(linger=0)
    ctx.term()
    g0 = Group(0, 2, addrs, timeout=20, transport="zmq")
    t.join(20)
    g1 = made["g1"]
    try:
        f0 = g0.all_reduce_async(torch.full((10,), 1.0))
        f1 = g1.all_reduce_async(torch.full((10,), 2.0))
        assert torch.equal(f0.wait(), torch.full((10,), 3.0)) and torch.equal(f1.wait(), torch.full((10,), 3.0))
    finally:
        g0.close()
        g1.close()


def test_a_hello_from_this_ranks_own_number_is_refused_naming_the_shared_port():
    """Two nodes on one machine given one tensor port: rank 1's address is rank 0's own listener,
    so rank 0's HELLO comes back to it. It is refused with a clear error, never a raw KeyError."""
    (addr,) = _addrs(1)
    with pytest.raises(PeerLostError) as err:
        Group(0, 2, [addr, addr], timeout=2.0)
    text = str(err.value)
    assert "HELLO from rank 0" in text and "cluster.tensor_port" in text and f"rank 1 at {addr}" in text


def test_a_rogue_hello_claiming_the_receivers_rank_is_logged_and_the_group_keeps_working(caplog):
    groups = _groups(2, timeout=20, transport="zmq")
    try:
        g0 = groups[0]
        rogue = _rogue(g0.addrs[0])
        hello = _frame_header(kind=framing.KIND_HELLO, sender=0, shape=(0,), nbytes=0, total=0, seq=0)
        rogue.send_multipart([framing.encode_header(hello), b""])
        deadline = time.monotonic() + 10
        while True:  # rank 0 files the rogue frame while it waits for rank 1's data
            out = _each(groups, lambda g: g.all_reduce(torch.full((4,), 1.0 + g.rank)))
            assert all(torch.equal(r, torch.full((4,), 3.0)) for r in out), out
            if g0.rejected or time.monotonic() > deadline:
                break
        assert len(g0.rejected) == 1 and "HELLO from rank 0" in str(g0.rejected[0]), g0.rejected
        assert "HELLO from rank 0" in caplog.text
        rogue.close()
    finally:
        for g in groups:
            g.close()


def test_free_ports_lie_below_the_outgoing_connection_range():
    """Ports for local ranks come from below the range the OS gives outgoing connections, so no
    connection opened meanwhile can take one; they differ and are free."""
    import socket

    from macfleet.comm.launch import LOW_PORT, _ephemeral_floor, free_ports

    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(LOW_PORT <= p < _ephemeral_floor() for p in ports), ports
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
