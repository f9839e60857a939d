"""Collective algorithms over a Transport: all_reduce, broadcast, all_gather, gather, scatter.

Each function runs on the Group's comm worker thread, takes CPU contiguous tensors and a
deadline, and moves data as chunks of at most `chunk_bytes` so receives overlap with sums and
sends; an all_reduce cuts each rank's segment into at least PIPELINE_CHUNKS even chunks (no smaller
than MIN_CHUNK_BYTES), so mid-sized tensors (10-25 MB, DDP's buckets) pipeline too. Algorithms:
- all_reduce of a small tensor that fits one chunk (see DIRECT_MAX_BYTES): one round, every
  rank sends its tensor to every other and sums all n in rank order (bit-identical everywhere).
- all_reduce, larger, 2 ranks: each rank sums one half and sends it back ("auto", "ring"); with
  algorithm="direct" each rank sends its whole tensor and adds the peer's in place, chunk by
  chunk: one round instead of two dependent ones, the same bytes per rank, twice the additions
  and no copy of final values (see _exchange_whole). 3+ ranks, two algorithms (see ALGORITHMS;
  "auto" picks by world size):
  - ring: reduce-scatter then all-gather around the ring, each chunk forwarded as soon as it is
    summed, so the two phases and all 2(n-1) ring steps pipeline. Bandwidth-optimal for any n,
    using one link in and one out per rank.
  - direct: the same reduce-scatter and all-gather in two rounds: every rank sends each peer its
    part of that peer's segment, sums its own segment (contributions added in rank order) and
    sends the final chunks to every peer. The same bytes per rank as the ring, but 2 dependent
    rounds instead of 2(n-1), and every pair of ranks talks at once: all cables of a
    Thunderbolt mesh carry data both ways. Measured faster than the ring at 3 and 4 ranks from
    1 MB to 100 MB (README, Benchmarks); with many ranks its fan-out and small messages favour
    the ring.
  Sums read libzmq's receive buffer directly (no landing copy); only final values are copied in
  place. Every rank ends with bit-identical values: each element is summed once, by one rank, in
  an order fixed by the ranks.
- broadcast: a chain from src through the ring, chunk-pipelined.
- all_gather / gather / scatter: direct sends; receivers allocate from the header's shape, so
  every rank may contribute a different shape (sparse gradients need this).
Every received chunk is checked against what this collective expects (dtype, size, offset) and
a mismatch is a FrameError naming the peer, never a silently wrong tensor.
"""

from __future__ import annotations

import numpy as np
import torch

from macfleet.comm.framing import KIND_DATA, Header, as_tensor, byte_view
from macfleet.comm.transport import COPY_THRESHOLD, Transport
from macfleet.errors import FrameError

DEFAULT_CHUNK_BYTES = 4 << 20
"""Measured here, 4 MiB chunks cost a 4-rank 100 MB all_reduce about 8% less CPU than 1 MiB
(per-message Python, framing and libzmq work); they still fit the 32 MiB L3 several times."""
DIRECT_MAX_BYTES = 1 << 20
"""all_reduce of a tensor that fits one chunk and at most DIRECT_MAX_BYTES * 2 / world_size bytes
takes the one-round direct exchange (see _direct), larger ones the halves exchange or the ring.
The direct exchange moves world_size / 2 times the bytes of a ring, hence the scaling."""


PIPELINE_CHUNKS = 4
"""A segment (the part of a tensor one rank sums) travels as at least this many chunks, each
no smaller than MIN_CHUNK_BYTES: with 4 MiB chunks a 10 MB all_reduce of 2 ranks had 2 chunks per
half, so a rank could not start summing (nor its peer receive final values) before 4 MiB had
crossed. Chunks are also evened out (no 0.5 MiB tail behind 4 MiB chunks). Every rank derives
the same chunking from the tensor's size, the world size and chunk_bytes."""
MIN_CHUNK_BYTES = 256 << 10


_NUMPY_ADD = (torch.float32, torch.int32, torch.int64, torch.uint8)
"""Dtypes whose sums run in NumPy (see `_add`). Half precision runs in torch: NumPy lacks
bfloat16, and its float16 add converts element by element (on 2 H200s it made fleet-fp16 4x
slower than before the sums moved to NumPy). On a comm thread torch's add is single-threaded too
(`comm/threads.py`)."""


def _add(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a + b (out may be a), on this thread alone. torch's CPU add runs in its intra-op
    OpenMP pool: each comm thread that sums starts a team of its own (tests/unit/test_comm_sums.py
    counts the threads), whose workers spin-wait after every sum. On a node whose process is
    pinned to its cores, those spinning workers compete for the cores of the training thread,
    the autograd thread and libzmq's I/O threads. NumPy's elementwise add is single-threaded,
    lets go of the GIL and gives the same IEEE sums, bit for bit. Half precision stays in torch
    (see _NUMPY_ADD): the comm threads limit their own torch ops to themselves
    (`comm/threads.py`), and a collective run inline on the caller's thread uses the caller's
    pool."""
    if out.dtype in _NUMPY_ADD:
        np.add(a.numpy(), b.numpy(), out=out.numpy())
    else:
        torch.add(a, b, out=out)


ALGORITHMS = ("auto", "ring", "direct")
DIRECT_MAX_RANKS = 4
"""algorithm="auto" takes the direct reduce-scatter up to this many ranks (measured), the ring above."""


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"all_reduce algorithm {algorithm!r}: choose auto, ring or direct")
    return algorithm


def resolve_algorithm(algorithm: str, world_size: int) -> str:
    """The algorithm a 3+-rank all_reduce runs: "auto" resolved by world size."""
    if check_algorithm(algorithm) == "auto":
        return "direct" if world_size <= DIRECT_MAX_RANKS else "ring"
    return algorithm


def chunk_elems(numel: int, isz: int, n: int, chunk_bytes: int) -> int:
    """Elements per chunk for an all_reduce of numel elements over n ranks (see PIPELINE_CHUNKS)."""
    seg = max(1, -(-numel // n))
    step = max(1, chunk_bytes // isz)
    want = max(MIN_CHUNK_BYTES // isz, -(-seg // PIPELINE_CHUNKS))
    step = min(step, want)
    count = -(-seg // step)
    return max(1, -(-seg // count))  # even chunks: the same count, no short tail


def _ranges(lo: int, hi: int, step: int) -> list[tuple[int, int]]:
    # An empty range still yields one (empty) chunk, so both sides count the same messages.
    if hi <= lo:
        return [(lo, lo)]
    return [(a, min(a + step, hi)) for a in range(lo, hi, step)]


def _header(tp: Transport, t: torch.Tensor, lo: int, hi: int, shape=None) -> Header:
    isz = t.element_size()
    shape = tuple(t.shape) if shape is None else shape
    return Header(KIND_DATA, t.dtype, shape, tp.rank, tp.generation, tp.session, tp.step, tp.seq,
                  lo * isz, (hi - lo) * isz, t.numel() * isz)


def _expect_tensor(tp: Transport, h: Header, flat: torch.Tensor) -> None:
    isz = flat.element_size()
    if h.dtype != flat.dtype or h.total != flat.numel() * isz:
        raise FrameError(
            f"{tp.op} #{tp.seq}: rank {h.sender} sent {h.dtype} of {h.total} bytes, rank {tp.rank} has "
            f"{flat.dtype} of {flat.numel() * isz} bytes: every rank must pass the same shape and dtype"
        )


def _expect(tp: Transport, h: Header, flat: torch.Tensor, lo: int, hi: int) -> None:
    isz = flat.element_size()
    _expect_tensor(tp, h, flat)
    if h.offset != lo * isz or h.nbytes != (hi - lo) * isz:
        raise FrameError(
            f"{tp.op} #{tp.seq}: rank {h.sender} sent bytes [{h.offset}, {h.offset + h.nbytes}) where rank "
            f"{tp.rank} expected [{lo * isz}, {hi * isz}): ranks disagree on the chunk size; use the same "
            "macfleet version and settings everywhere"
        )


def _recv_chunk(tp: Transport, src: int, deadline: float, flat: torch.Tensor, a: int, land=None):
    """Receive chunk [a, ...) of flat from src: by its offset, so striped chunks may arrive in any order."""
    return tp.recv(src, deadline, land, offset=a * flat.element_size(), check=lambda h: _expect_tensor(tp, h, flat))


def _lander(tp: Transport, flat: torch.Tensor, buf, a: int, b: int, base: int = 0):
    """A landing callback: check the chunk is [a, b) of flat, then give recv_into the bytes of
    buf (a memoryview, or a uint8 scratch tensor) for elements [a - base, b - base)."""
    isz = flat.element_size()
    view = buf if isinstance(buf, memoryview) else byte_view(buf)

    def land(h: Header) -> memoryview:
        _expect(tp, h, flat, a, b)
        return view[(a - base) * isz:(b - base) * isz]

    return land


def all_reduce(tp: Transport, t: torch.Tensor, op: str, algorithm: str, deadline: float,
               chunk_bytes: int) -> torch.Tensor:
    n = tp.world_size
    flat = t.view(-1)
    if n > 1:
        step = chunk_elems(flat.numel(), flat.element_size(), n, chunk_bytes)
        nbytes = flat.numel() * flat.element_size()
        if nbytes <= min(chunk_bytes, DIRECT_MAX_BYTES * 2 // n):
            _direct(tp, flat, deadline)
        elif n == 2:
            (_exchange_whole if algorithm == "direct" else _exchange_halves)(tp, flat, deadline, step)
        elif resolve_algorithm(algorithm, n) == "direct":
            _scatter_direct(tp, flat, deadline, step)
        else:
            _ring(tp, flat, deadline, step)
    if op == "avg":
        if flat.is_floating_point():
            flat.div_(n)
        else:
            flat.div_(n, rounding_mode="floor")
    return t


def _recv_add(tp: Transport, src: int, deadline: float, flat: torch.Tensor, a: int, b: int) -> None:
    """Receive chunk [a, b) of flat from src and add it in place, reading libzmq's receive buffer
    directly (one pass over the bytes: no landing copy before the sum)."""
    h, body = _recv_chunk(tp, src, deadline, flat, a)
    _expect(tp, h, flat, a, b)
    if b > a:
        _add(flat[a:b], flat[a:b], as_tensor(body, flat.dtype))


def _direct(tp: Transport, flat: torch.Tensor, deadline: float) -> None:
    """Small tensors (one chunk): every rank sends its whole tensor to every other rank and sums
    all n in rank order, so every rank runs the same additions and holds a bit-identical result.
    One round instead of the 2(n-1) dependent steps of a ring, for (n-1)x the bytes: a win while
    latency, not bandwidth, bounds the time."""
    n, rank = tp.world_size, tp.rank
    numel, isz = flat.numel(), flat.element_size()
    # flat is overwritten with the sum while libzmq may still read our sends, so a private copy
    # goes on the wire (libzmq keeps it alive until sent); below COPY_THRESHOLD the transport copies.
    wire = flat if numel * isz < COPY_THRESHOLD else flat.clone()
    header, body = _header(tp, flat, 0, numel), byte_view(wire)
    for k in range(1, n):
        tp.send((rank + k) % n, header, body)
    parts = []
    for r in range(n):
        if r == rank:
            parts.append(flat)
            continue
        h, got = _recv_chunk(tp, r, deadline, flat, 0)
        _expect(tp, h, flat, 0, numel)
        parts.append(as_tensor(got, flat.dtype))
    if n == 2:
        _add(flat, parts[0], parts[1])
        return
    total = tp.scratch(numel * isz)[:numel * isz].view(flat.dtype)
    _add(total, parts[0], parts[1])
    for part in parts[2:-1]:
        _add(total, total, part)
    _add(flat, total, parts[-1])


def _exchange_halves(tp: Transport, flat: torch.Tensor, deadline: float, step: int) -> None:
    """2 ranks: each sums one half and sends it back; every byte crosses the link once each way."""
    peer = 1 - tp.rank
    mv = byte_view(flat)
    isz = flat.element_size()
    half = flat.numel() // 2
    own, other = ((0, half), (half, flat.numel())) if tp.rank == 0 else ((half, flat.numel()), (0, half))
    own_chunks, other_chunks = _ranges(*own, step), _ranges(*other, step)
    for a, b in other_chunks:
        # Zero-copy without waiting: these bytes are overwritten only by the peer's sums of them,
        # which cannot arrive before the peer has received them.
        tp.send(peer, _header(tp, flat, a, b), mv[a * isz:b * isz])
    last = None
    for i, (a, b) in enumerate(own_chunks):
        _recv_add(tp, peer, deadline, flat, a, b)
        # Only the last send is tracked: libzmq sends one socket's messages in order.
        last = tp.send(peer, _header(tp, flat, a, b), mv[a * isz:b * isz], track=i == len(own_chunks) - 1)
    for a, b in other_chunks:
        _recv_chunk(tp, peer, deadline, flat, a, _lander(tp, flat, mv, a, b))
    # The caller may reuse t as soon as we return: our last bytes must have left.
    tp.wait_sent(peer, last, deadline)


def _exchange_whole(tp: Transport, flat: torch.Tensor, deadline: float, step: int) -> None:
    """2 ranks, algorithm="direct": each rank sends its whole tensor and adds the peer's chunks in
    place as they come. Both ranks compute a + b for every element, and IEEE addition commutes,
    so they hold the same bits."""
    peer = 1 - tp.rank
    mv = byte_view(flat)
    isz = flat.element_size()
    chunks = _ranges(0, flat.numel(), step)
    trackers = [tp.send(peer, _header(tp, flat, a, b), mv[a * isz:b * isz], track=True) for a, b in chunks]
    for (a, b), sent in zip(chunks, trackers):
        h, body = _recv_chunk(tp, peer, deadline, flat, a)
        _expect(tp, h, flat, a, b)
        # The sum overwrites bytes that went out zero-copy: they must have left first (by the time
        # the peer's chunk is here, ours usually has, so this rarely waits).
        tp.wait_sent(peer, sent, deadline)
        if b > a:
            _add(flat[a:b], flat[a:b], as_tensor(body, flat.dtype))


def _ring(tp: Transport, flat: torch.Tensor, deadline: float, step: int) -> None:
    n, rank = tp.world_size, tp.rank
    left, right = (rank - 1) % n, (rank + 1) % n
    mv = byte_view(flat)
    isz = flat.element_size()
    numel = flat.numel()
    bounds = [numel * i // n for i in range(n + 1)]
    seg_chunks = [_ranges(bounds[i], bounds[i + 1], step) for i in range(n)]

    def send(a: int, b: int, track: bool = False):
        # Zero-copy is safe without waiting: a chunk sent here is only overwritten later by its
        # final value, which cannot arrive before the ring has consumed what we sent.
        return tp.send(right, _header(tp, flat, a, b), mv[a * isz:b * isz], track=track)

    for a, b in seg_chunks[rank]:
        send(a, b)
    # Reduce-scatter: after step s we hold segment (rank - s - 1) summed over s + 2 ranks; the
    # last step's result is final and its send is the all-gather's first step.
    for s in range(n - 1):
        for a, b in seg_chunks[(rank - s - 1) % n]:
            _recv_add(tp, left, deadline, flat, a, b)
            send(a, b)
    # All-gather: final segments travel around the ring; the one that completes its lap stops.
    # Only the very last send is tracked: libzmq sends one socket's messages in order.
    last = None
    for s in range(n - 1):
        chunks = seg_chunks[(rank - s) % n]
        for i, (a, b) in enumerate(chunks):
            _recv_chunk(tp, left, deadline, flat, a, _lander(tp, flat, mv, a, b))
            if s < n - 2:
                last = send(a, b, track=s == n - 3 and i == len(chunks) - 1)
    # The caller may reuse t as soon as we return: our last bytes must have left.
    tp.wait_sent(right, last, deadline)


def _scatter_direct(tp: Transport, flat: torch.Tensor, deadline: float, step: int) -> None:
    """3+ ranks in two rounds: rank r owns segment r; every peer sends r its part of segment r,
    r adds them in rank order and sends the final chunks to every peer."""
    n, rank = tp.world_size, tp.rank
    mv = byte_view(flat)
    isz = flat.element_size()
    numel = flat.numel()
    bounds = [numel * i // n for i in range(n + 1)]
    seg_chunks = [_ranges(bounds[i], bounds[i + 1], step) for i in range(n)]
    peers = [(rank + k) % n for k in range(1, n)]  # staggered, so no rank is everyone's first
    for peer in peers:
        # Zero-copy without waiting: segment `peer` is overwritten here only by its final values,
        # which `peer` sends after it has received these bytes.
        for a, b in seg_chunks[peer]:
            tp.send(peer, _header(tp, flat, a, b), mv[a * isz:b * isz])
    own = seg_chunks[rank]
    last = {}
    for i, (a, b) in enumerate(own):
        for peer in range(n):
            if peer != rank:
                _recv_add(tp, peer, deadline, flat, a, b)
        for peer in peers:
            # Only the last send per peer is tracked: libzmq sends one socket's messages in order.
            sent = tp.send(peer, _header(tp, flat, a, b), mv[a * isz:b * isz], track=i == len(own) - 1)
            last[peer] = sent if sent is not None else last.get(peer)
    for peer in peers:
        for a, b in seg_chunks[peer]:
            _recv_chunk(tp, peer, deadline, flat, a, _lander(tp, flat, mv, a, b))
    # The caller may reuse t as soon as we return: our last bytes must have left.
    for peer in peers:
        tp.wait_sent(peer, last.get(peer), deadline)


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
            _recv_chunk(tp, left, deadline, flat, a, _lander(tp, flat, mv, a, b))
        if right != src:
            last = tp.send(right, _header(tp, flat, a, b), mv[a * isz:b * isz], track=True, one_way=True)
    tp.wait_sent(right, last, deadline)
    return t


def send_tensor(tp: Transport, dst: int, t: torch.Tensor, chunk_bytes: int, one_way: bool = False):
    """Send a whole tensor (its shape travels in every header); returns the last tracker.
    `one_way`: `dst` sends nothing back in this collective (see Transport.send)."""
    flat = t.reshape(-1)
    mv = byte_view(flat)
    isz = flat.element_size()
    last = None
    for a, b in _ranges(0, flat.numel(), max(1, chunk_bytes // isz)):
        last = tp.send(dst, _header(tp, flat, a, b, shape=tuple(t.shape)), mv[a * isz:b * isz], track=True,
                       one_way=one_way)
    return last


def recv_tensor(tp: Transport, src: int, deadline: float, dtype: torch.dtype | None = None,
                into: torch.Tensor | None = None) -> torch.Tensor:
    """Receive a whole tensor of a shape announced by its first header, chunks landing in place:
    in `into` (contiguous) when the header announces its shape and dtype, else in a new tensor
    (which the caller tells apart by identity)."""
    state: dict = {"got": 0}

    def land(h: Header) -> memoryview:
        if "out" not in state:
            if dtype is not None and h.dtype != dtype:
                raise FrameError(f"{tp.op} #{tp.seq}: rank {src} sent {h.dtype}, rank {tp.rank} has {dtype}: "
                                 "every rank must use the same dtype")
            fits = into is not None and h.shape == tuple(into.shape) and h.dtype == into.dtype
            state["out"] = into if fits else torch.empty(h.shape, dtype=h.dtype)
            state["mv"] = byte_view(state["out"])
        out, got = state["out"], state["got"]
        if h.offset != got or h.shape != tuple(out.shape) or h.dtype != out.dtype:
            raise FrameError(
                f"{tp.op} #{tp.seq}: rank {src} sent chunk at byte {h.offset} of shape {h.shape} {h.dtype}, expected "
                f"byte {got} of {tuple(out.shape)} {out.dtype}: the stream from rank {src} is inconsistent"
            )
        return state["mv"][got:got + h.nbytes]

    while True:
        h, _ = tp.recv(src, deadline, land, offset=state["got"])
        state["got"] += h.nbytes
        if state["got"] >= h.total:
            return state["out"]


def all_gather(tp: Transport, t: torch.Tensor, deadline: float, chunk_bytes: int,
               into: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every rank's `t` in rank order. `into` (shape (n, *t.shape), t's dtype): each peer's part
    that has t's shape lands in its row (another shape lands in a tensor of its own, for the
    caller to refuse); this rank's row is left as it is and its part is `t` itself, not a copy."""
    n, rank = tp.world_size, tp.rank
    trackers = {peer: send_tensor(tp, peer, t, chunk_bytes) for peer in range(n) if peer != rank}
    out: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
    out[rank] = t if into is not None else t.clone()
    for k in range(1, n):
        src = (rank - k) % n
        out[src] = recv_tensor(tp, src, deadline, t.dtype, into=None if into is None else into[src])
    for peer, tracker in trackers.items():
        tp.wait_sent(peer, tracker, deadline)
    return out


def gather(tp: Transport, t: torch.Tensor, dst: int, deadline: float, chunk_bytes: int) -> list[torch.Tensor] | None:
    if tp.rank != dst:
        tp.wait_sent(dst, send_tensor(tp, dst, t, chunk_bytes, one_way=True), deadline)
        return None
    return [t.clone() if r == dst else recv_tensor(tp, r, deadline, t.dtype) for r in range(tp.world_size)]


def scatter(tp: Transport, tensors, src: int, deadline: float, chunk_bytes: int) -> torch.Tensor:
    if tp.rank != src:
        return recv_tensor(tp, src, deadline)
    trackers = {r: send_tensor(tp, r, tensors[r], chunk_bytes, one_way=True) for r in range(tp.world_size) if r != src}
    for r, tracker in trackers.items():
        tp.wait_sent(r, tracker, deadline)
    return tensors[src].clone()
