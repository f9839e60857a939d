"""Collective algorithms over a Transport: all_reduce, broadcast, all_gather, gather, scatter.

Each function runs on the Group's comm worker thread, takes CPU contiguous tensors and a
deadline, and moves data as chunks of about `chunk_bytes` so receives overlap with sums and
sends. Algorithms:
- all_reduce, 2 ranks: both send the whole tensor at once and add what arrives chunk by chunk
  (a + b == b + a bit for bit, so both ranks hold the same result); 3+ ranks: ring
  reduce-scatter then ring all-gather, each chunk forwarded as soon as it is summed, so the two
  phases and all ring steps pipeline.
- broadcast: a chain from src through the ring, chunk-pipelined.
- all_gather / gather / scatter: direct sends; receivers allocate from the header's shape, so
  every rank may contribute a different shape (sparse gradients need this).
Every received chunk is checked against what this collective expects (dtype, size, offset) and
a mismatch is a FrameError naming the peer, never a silently wrong tensor.
"""

from __future__ import annotations

import torch

from macfleet.comm.framing import KIND_DATA, Header, byte_view
from macfleet.comm.transport import Transport
from macfleet.errors import FrameError

DEFAULT_CHUNK_BYTES = 1 << 20


def _ranges(lo: int, hi: int, step: int) -> list[tuple[int, int]]:
    # An empty range still yields one (empty) chunk, so both sides count the same messages.
    if hi <= lo:
        return [(lo, lo)]
    return [(a, min(a + step, hi)) for a in range(lo, hi, step)]


def _header(tp: Transport, t: torch.Tensor, lo: int, hi: int, shape=None) -> Header:
    isz = t.element_size()
    shape = tuple(t.shape) if shape is None else shape
    return Header(KIND_DATA, t.dtype, shape, tp.rank, tp.generation, tp.step, tp.seq,
                  lo * isz, (hi - lo) * isz, t.numel() * isz)


def _expect(tp: Transport, h: Header, flat: torch.Tensor, lo: int, hi: int) -> None:
    isz = flat.element_size()
    if h.dtype != flat.dtype or h.total != flat.numel() * isz:
        raise FrameError(
            f"{tp.op} #{tp.seq}: rank {h.sender} sent {h.dtype} of {h.total} bytes, rank {tp.rank} has "
            f"{flat.dtype} of {flat.numel() * isz} bytes: every rank must pass the same shape and dtype"
        )
    if h.offset != lo * isz or h.nbytes != (hi - lo) * isz:
        raise FrameError(
            f"{tp.op} #{tp.seq}: rank {h.sender} sent bytes [{h.offset}, {h.offset + h.nbytes}) where rank "
            f"{tp.rank} expected [{lo * isz}, {hi * isz}): ranks disagree on the chunk size; use the same "
            "macfleet version and settings everywhere"
        )


def _lander(tp: Transport, flat: torch.Tensor, buf, a: int, b: int, base: int = 0):
    """A landing callback: check the chunk is [a, b) of flat, then give recv_into the bytes of
    buf (a memoryview, or a uint8 scratch tensor) for elements [a - base, b - base)."""
    isz = flat.element_size()
    view = buf if isinstance(buf, memoryview) else byte_view(buf)

    def land(h: Header) -> memoryview:
        _expect(tp, h, flat, a, b)
        return view[(a - base) * isz:(b - base) * isz]

    return land


def all_reduce(tp: Transport, t: torch.Tensor, op: str, deadline: float, chunk_bytes: int) -> torch.Tensor:
    n = tp.world_size
    flat = t.view(-1)
    if n > 1:
        step = max(1, chunk_bytes // flat.element_size())
        if n == 2:
            _exchange_halves(tp, flat, deadline, step)
        else:
            _ring(tp, flat, deadline, step)
    if op == "avg":
        if flat.is_floating_point():
            flat.div_(n)
        else:
            flat.div_(n, rounding_mode="floor")
    return t


def _exchange_halves(tp: Transport, flat: torch.Tensor, deadline: float, step: int) -> None:
    """2 ranks: each sums one half and sends it back; every byte crosses the link once each way."""
    peer = 1 - tp.rank
    mv = byte_view(flat)
    isz = flat.element_size()
    half = flat.numel() // 2
    own, other = ((0, half), (half, flat.numel())) if tp.rank == 0 else ((half, flat.numel()), (0, half))
    own_chunks, other_chunks = _ranges(*own, step), _ranges(*other, step)
    scratch = tp.scratch(step * isz)
    for a, b in other_chunks:
        # Zero-copy without waiting: these bytes are overwritten only by the peer's sums of them,
        # which cannot arrive before the peer has received them.
        tp.send(peer, _header(tp, flat, a, b), mv[a * isz:b * isz])
    last = None
    for a, b in own_chunks:
        # Landing in a reused scratch buffer beats summing from zmq's own per-message buffer,
        # which libzmq mallocs (and the kernel page-faults) afresh for every chunk.
        tp.recv(peer, deadline, _lander(tp, flat, scratch, a, b, base=a))
        flat[a:b].add_(scratch[:(b - a) * isz].view(flat.dtype))
        last = tp.send(peer, _header(tp, flat, a, b), mv[a * isz:b * isz], track=True)
    for a, b in other_chunks:
        tp.recv(peer, deadline, _lander(tp, flat, mv, a, b))
    # The caller may reuse t as soon as we return: our last bytes must have left.
    tp.wait_sent(peer, last, deadline)


def _ring(tp: Transport, flat: torch.Tensor, deadline: float, step: int) -> None:
    n, rank = tp.world_size, tp.rank
    left, right = (rank - 1) % n, (rank + 1) % n
    mv = byte_view(flat)
    isz = flat.element_size()
    numel = flat.numel()
    bounds = [numel * i // n for i in range(n + 1)]
    seg_chunks = [_ranges(bounds[i], bounds[i + 1], step) for i in range(n)]
    scratch = tp.scratch(step * isz)

    def send(a: int, b: int):
        # Zero-copy is safe without waiting: a chunk sent here is only overwritten later by its
        # final value, which cannot arrive before the ring has consumed what we sent.
        return tp.send(right, _header(tp, flat, a, b), mv[a * isz:b * isz], track=True)

    last = None
    for a, b in seg_chunks[rank]:
        last = send(a, b)
    # Reduce-scatter: after step s we hold segment (rank - s - 1) summed over s + 2 ranks; the
    # last step's result is final and its send is the all-gather's first step.
    for s in range(n - 1):
        for a, b in seg_chunks[(rank - s - 1) % n]:
            tp.recv(left, deadline, _lander(tp, flat, scratch, a, b, base=a))
            flat[a:b].add_(scratch[:(b - a) * isz].view(flat.dtype))
            last = send(a, b)
    # All-gather: final segments travel around the ring; the one that completes its lap stops.
    for s in range(n - 1):
        for a, b in seg_chunks[(rank - s) % n]:
            tp.recv(left, deadline, _lander(tp, flat, mv, a, b))
            if s < n - 2:
                last = send(a, b)
    # The caller may reuse t as soon as we return: our last bytes must have left.
    tp.wait_sent(right, last, deadline)


def broadcast(tp: Transport, t: torch.Tensor, src: int, deadline: float, chunk_bytes: int) -> torch.Tensor:
    n, rank = tp.world_size, tp.rank
    if n == 1:
        return t
    flat = t.view(-1)
    left, right = (rank - 1) % n, (rank + 1) % n
    mv = byte_view(flat)
    isz = flat.element_size()
    last = None
    for a, b in _ranges(0, flat.numel(), max(1, chunk_bytes // isz)):
        if rank != src:
            tp.recv(left, deadline, _lander(tp, flat, mv, a, b))
        if right != src:
            last = tp.send(right, _header(tp, flat, a, b), mv[a * isz:b * isz], track=True)
    tp.wait_sent(right, last, deadline)
    return t


def send_tensor(tp: Transport, dst: int, t: torch.Tensor, chunk_bytes: int):
    """Send a whole tensor (its shape travels in every header); returns the last tracker."""
    flat = t.reshape(-1)
    mv = byte_view(flat)
    isz = flat.element_size()
    last = None
    for a, b in _ranges(0, flat.numel(), max(1, chunk_bytes // isz)):
        last = tp.send(dst, _header(tp, flat, a, b, shape=tuple(t.shape)), mv[a * isz:b * isz], track=True)
    return last


def recv_tensor(tp: Transport, src: int, deadline: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Receive a whole tensor of a shape announced by its first header, chunks landing in place."""
    state: dict = {"got": 0}

    def land(h: Header) -> memoryview:
        if "out" not in state:
            if dtype is not None and h.dtype != dtype:
                raise FrameError(f"{tp.op} #{tp.seq}: rank {src} sent {h.dtype}, rank {tp.rank} has {dtype}: "
                                 "every rank must use the same dtype")
            state["out"] = torch.empty(h.shape, dtype=h.dtype)
            state["mv"] = byte_view(state["out"])
        out, got = state["out"], state["got"]
        if h.offset != got or h.shape != tuple(out.shape) or h.dtype != out.dtype:
            raise FrameError(
                f"{tp.op} #{tp.seq}: rank {src} sent chunk at byte {h.offset} of shape {h.shape} {h.dtype}, expected "
                f"byte {got} of {tuple(out.shape)} {out.dtype}: the stream from rank {src} is inconsistent"
            )
        return state["mv"][got:got + h.nbytes]

    while True:
        h, _ = tp.recv(src, deadline, land)
        state["got"] += h.nbytes
        if state["got"] >= h.total:
            return state["out"]


def all_gather(tp: Transport, t: torch.Tensor, deadline: float, chunk_bytes: int) -> list[torch.Tensor]:
    n, rank = tp.world_size, tp.rank
    trackers = {peer: send_tensor(tp, peer, t, chunk_bytes) for peer in range(n) if peer != rank}
    out: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
    out[rank] = t.clone()
    for k in range(1, n):
        src = (rank - k) % n
        out[src] = recv_tensor(tp, src, deadline, t.dtype)
    for peer, tracker in trackers.items():
        tp.wait_sent(peer, tracker, deadline)
    return out


def gather(tp: Transport, t: torch.Tensor, dst: int, deadline: float, chunk_bytes: int) -> list[torch.Tensor] | None:
    if tp.rank != dst:
        tp.wait_sent(dst, send_tensor(tp, dst, t, chunk_bytes), deadline)
        return None
    return [t.clone() if r == dst else recv_tensor(tp, r, deadline, t.dtype) for r in range(tp.world_size)]


def scatter(tp: Transport, tensors, src: int, deadline: float, chunk_bytes: int) -> torch.Tensor:
    if tp.rank != src:
        return recv_tensor(tp, src, deadline)
    trackers = {r: send_tensor(tp, r, tensors[r], chunk_bytes) for r in range(tp.world_size) if r != src}
    for r, tracker in trackers.items():
        tp.wait_sent(r, tracker, deadline)
    return tensors[src].clone()
