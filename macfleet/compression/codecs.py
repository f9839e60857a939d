"""Gradient codecs behind one small interface, and the sparse payload's wire format (v2).

A codec turns a gradient into the payload a node puts on the wire and back:
    payload = codec.encode(t, step)             # t: 1-D tensor; payload stays on t's device
    codec.decode_add(payload, out)              # out += what the payload carries (validated first)
    codec.decode(payload, numel) -> tensor      # a fresh dense tensor
    codec.payload_nbytes(payload) -> int        # bytes on the wire
`none` and `fp16` are dense (their payload is the tensor, or its fp16 cast, and the engine sums
payloads with all_reduce); `topk` and `topk_fp16` are sparse, and `int8` sends every block of
values as int8 with a scale (`Int8Codec`): for these three the engine all_gathers payloads and
each node sums them. They work on a bucket of parameter segments through a `Plan`
(`plan`, `workspace`, `compress`, `keep_unsent`, `sent_mask`, `validate`, `add_payloads`), which is
what `GradientCompressor` uses; `encode`/`decode_add` are that path for one segment.

No host synchronisation on the device path. Everything that decides a size is known on the host
from the segments' numels and the ratio alone: each segment keeps exactly
k_i = keep_count(units_i, ratio) units, so the bucket keeps K = sum(k_i) and its payload has a
fixed size. The index tensors that depend on the layout and ratio are built on the host once
(`Layout`, `Plan`, cached) and uploaded without a sync; a step then runs only device kernels of
host-known shapes: no .item(), nonzero, boolean-mask indexing or upload per call.

Selection (exact, per parameter segment, identical on every device). A unit is a block of
`block_size` elements (granularity=block) or one element (element; `exact` is an alias). Units are
scored by |x| (element) or by their sum of squares (block: the L2 norm's order, summed by a fixed
pairwise tree so CPU and GPU round alike). Segment i keeps its k_i best units, ties going to the
lower unit number. Computed for the whole bucket at once with two sorts of unique int64 keys (so
sort stability and the device's tie order never matter):
    key1 = (inverted score bits << 32) | unit       -> rank of each unit, best first
    key2 = (segment << 32) | rank                   -> each segment's units, best first
then a fixed-size gather of the first k_i of each segment's run, sorted by unit number. Segment
boundaries are not block-aligned in the bucket, so the codec works in a padded workspace where
segment i starts at unit offset sum(units_<i) and a partial last block is padded with zeros:
every kept unit carries exactly `unit` values.

Sparse payload v2 (one uint8 tensor, little-endian; every rank's has the same size):
    header  8 x int64: MAGIC, VERSION, codec id (2 topk, 3 topk_fp16), value dtype code, unit,
            K (units kept in the bucket), n (elements in the bucket), layout checksum (crc32 of
            the segment numels as int64)
    ids     K x int32: the kept units' bucket-wide numbers, strictly increasing (a segment's
            units are numbered after the previous segments')
    pad     4 zero bytes when K is odd, so the values start at a multiple of 8
    values  K x unit x value dtype: the kept units' values in id order (zero padding included)
    size    64 + 8 * ceil(K / 2) + K * unit * itemsize bytes (`Plan.nbytes`)
A receiver validates the payload on host memory (`validate`) before it reaches the device.
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from typing import NamedTuple, Optional

import numpy as np
import torch

from macfleet.config import CompressionConfig
from macfleet.errors import ConfigError, FrameError

MAGIC = 0x325A464D  # b"MFZ2" little-endian
VERSION = 2
HEADER_BYTES = 64
CODEC_IDS = {"none": 0, "fp16": 1, "topk": 2, "topk_fp16": 3, "int8": 4}
VALUE_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64, 4: torch.int8}
_DTYPE_CODES = {dt: code for code, dt in VALUE_DTYPES.items()}
MAX_UNITS = 2**31 - 1
"""Units per bucket: ids go on the wire as int32, and the sort keys hold a unit number in 32 bits."""
CACHE_SIZE = 64
"""Layouts (and plans) kept per codec: DDP's buckets, the rebuilt ones, a warm-up's ratios."""


def keep_count(units: int, ratio: float) -> int:
    """How many of `units` to keep at `ratio`: at least one, so no parameter starves forever."""
    if units == 0:
        return 0
    return min(units, max(1, int(round(ratio * units))))


class Codec:
    """The interface every codec implements; see the module docstring."""

    name = "none"
    lossy = False
    """Drops information that error feedback should carry to the next step."""
    sparse = False
    """Payloads are all_gathered and summed (else all_reduced as tensors)."""
    selects = False
    """Sends only the units it selects (top-k): `ratio` applies."""
    pieced = False
    """Sums payloads with `sum_payloads` (overwriting), and may send a bucket as pieces (int8)."""

    def encode(self, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def decode_add(self, payload: torch.Tensor, out: torch.Tensor, check: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, payload: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32,
               device: Optional[torch.device] = None) -> torch.Tensor:
        out = torch.zeros(numel, dtype=dtype, device=device if device is not None else payload.device)
        return self.decode_add(payload, out)

    def payload_nbytes(self, payload: torch.Tensor) -> int:
        return payload.numel() * payload.element_size()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoneCodec(Codec):
    """Sends the gradient as it is."""

    name = "none"

    def encode(self, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        return t

    def decode_add(self, payload: torch.Tensor, out: torch.Tensor, check: bool = True) -> torch.Tensor:
        return out.add_(payload.reshape(-1).to(out.device, out.dtype))


class FP16Codec(Codec):
    """Sends the gradient cast to float16 (half the bytes; values beyond +-65504 saturate)."""

    name = "fp16"

    def encode(self, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        return to_half(t)

    def decode_add(self, payload: torch.Tensor, out: torch.Tensor, check: bool = True) -> torch.Tensor:
        return out.add_(payload.reshape(-1).to(out.device, out.dtype))


def to_half(t: torch.Tensor) -> torch.Tensor:
    # saturate instead of overflowing to inf: one huge gradient must not poison the sum.
    # (clamping the fp16 copy in place avoids a full-size fp32 temporary).
    return t.to(torch.float16).clamp_(-65504.0, 65504.0) if t.dtype != torch.float16 else t


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built tensor on `device`, without a host sync on CUDA: the copy is queued from pinned
    memory, whose caching allocator keeps the block until the copy has run. Called once per layout
    or plan, never per step. (MPS: a plain copy, which waits, once per layout or plan.)"""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _cached(store: OrderedDict, key, make):
    value = store.get(key)
    if value is None:
        value = store[key] = make()
        if len(store) > CACHE_SIZE:
            store.popitem(last=False)
    else:
        store.move_to_end(key)
    return value


class Layout:
    """A bucket's segments in unit space: host numbers, and the device tensors selection needs."""

    def __init__(self, numels: tuple[int, ...], unit: int, device: torch.device):
        self.numels = numels
        self.unit = unit
        self.device = device
        self.units = tuple(-(-n // unit) for n in numels)
        """Units per segment (a partial last block counts as one)."""
        self.first_units = tuple(int(x) for x in np.cumsum((0,) + self.units[:-1])) if numels else ()
        """Bucket-wide number of each segment's first unit."""
        self.starts = tuple(u * unit for u in self.first_units)
        """Element offset of each segment in the padded workspace."""
        self.offsets = tuple(int(x) for x in np.cumsum((0,) + numels[:-1])) if numels else ()
        """Element offset of each segment in the bucket."""
        self.n = sum(numels)
        self.total_units = sum(self.units)
        self.padded = self.total_units * unit
        """Elements of the padded workspace (total_units x unit)."""
        if self.total_units > MAX_UNITS:
            raise ValueError(f"a bucket of {self.total_units} units is over the sparse codecs' limit of "
                             f"{MAX_UNITS}: use smaller buckets (bucket_cap_mb) or a larger block_size")
        self.pads = tuple((s + n, s + u * unit) for s, n, u in zip(self.starts, numels, self.units) if n % unit)
        """Padding (start, end) in the workspace after each partial last block: always zero."""
        self.checksum = zlib.crc32(np.asarray(numels, dtype="<i8").tobytes())
        seg = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64),
                                      torch.tensor(self.units, dtype=torch.int64))
        self.unit_bits = max(1, (self.total_units - 1).bit_length())
        segment_bits = max(1, (len(numels) - 1).bit_length())
        self.one_key: Optional[torch.Tensor] = None
        """Per unit: segment << (31 + unit_bits) | unit, where a (segment, score, unit) sort key
        fits 63 bits (every bucket DDP makes of a real model); None: select with two sorts."""
        self.segment_key: Optional[torch.Tensor] = None
        """Two sorts only: per unit, its segment number << 32 (the high half of the second key)."""
        self._arange: Optional[torch.Tensor] = None
        if segment_bits + 31 + self.unit_bits <= 63:
            self.one_key = _upload((seg << (31 + self.unit_bits)) | torch.arange(self.total_units, dtype=torch.int64),
                                   device)
        else:
            self.segment_key = _upload(seg << 32, device)
        self.aligned = not self.pads
        """Every segment fills whole units: the workspace is the bucket itself, element for element."""
        self._to_work: Optional[torch.Tensor] = None

    @property
    def arange(self) -> torch.Tensor:
        """Unit numbers 0..total_units-1 on the device: two sorts only, built at their first use."""
        if self._arange is None:
            self._arange = torch.arange(self.total_units, dtype=torch.int64, device=self.device)
        return self._arange

    @property
    def to_work(self) -> torch.Tensor:
        """Per bucket element, its position in the padded workspace (n,) int64, built once: moving
        a whole bucket in or out of the workspace is then one kernel, not one per segment."""
        if self._to_work is None:
            pos = torch.cat([torch.arange(n, dtype=torch.int64) + start for start, n in zip(self.starts, self.numels)]) \
                if self.numels else torch.empty(0, dtype=torch.int64)
            self._to_work = _upload(pos, self.device)
        return self._to_work


class Plan:
    """One layout at one ratio: the kept counts, the payload's shape and its cached device parts."""

    def __init__(self, layout: Layout, ratio: float, value_dtype: torch.dtype, codec_id: int):
        self.layout = layout
        self.ratio = ratio
        self.value_dtype = value_dtype
        self.kept = tuple(keep_count(u, ratio) for u in layout.units)
        """Units kept per segment."""
        self.K = sum(self.kept)
        itemsize = torch.empty(0, dtype=value_dtype).element_size()
        self.ids_offset = HEADER_BYTES
        self.values_offset = HEADER_BYTES + 8 * (-(-self.K // 2))
        self.nbytes = self.values_offset + self.K * layout.unit * itemsize
        """Bytes of every payload of this plan."""
        kept = torch.tensor(self.kept, dtype=torch.int64)
        ends = torch.cumsum(kept, 0)
        # slot j of segment i (kept slots numbered bucket-wide) reads position
        # first_unit_i + (j - first_slot_i) of the (segment, rank) order.
        shift = torch.tensor(layout.first_units, dtype=torch.int64) - (ends - kept)
        self.slots = _upload(torch.arange(self.K, dtype=torch.int64) + torch.repeat_interleave(shift, kept),
                             layout.device)
        """Positions in the (segment, rank) order of the kept units (K,)."""
        _add_header(self, codec_id, value_dtype)


class Sent(NamedTuple):
    """What `TopKCodec.compress` produced for a bucket."""

    payload: torch.Tensor
    ids: torch.Tensor
    """Kept unit numbers, ascending (K,) int64."""
    values: torch.Tensor
    """Their values in the workspace dtype (K, unit)."""
    wire: torch.Tensor
    """The same values as sent (K, unit), rounded to the wire dtype."""


class TopKCodec(Codec):
    """Keeps the best `ratio` of each segment's units and sends (ids, values); see the module docstring."""

    sparse = True
    lossy = True
    selects = True

    def __init__(self, ratio: float = 0.1, granularity: str = "block", block_size: int = 64,
                 value_dtype: Optional[torch.dtype] = None):
        self.ratio = float(ratio)
        self.granularity = granularity
        self.unit = block_size if granularity == "block" else 1
        self.value_dtype = value_dtype
        """Wire dtype of the values; None keeps the gradient's dtype."""
        self.name = "topk_fp16" if value_dtype == torch.float16 else "topk"
        self._layouts: OrderedDict = OrderedDict()
        self._plans: OrderedDict = OrderedDict()
        self._scratch: dict = {}
        self._decode_local = threading.local()

    def __repr__(self) -> str:
        return f"TopKCodec(name={self.name}, ratio={self.ratio}, granularity={self.granularity}, unit={self.unit})"

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.value_dtype or dtype

    # --- host: layouts and plans (cached) ------------------------------------------------------
    def plan(self, numels: tuple[int, ...], ratio: float, device: torch.device, value_dtype: torch.dtype) -> Plan:
        """The plan of a bucket of segments of `numels` elements at `ratio`."""
        numels, device = tuple(int(n) for n in numels), torch.device(device)
        layout = _cached(self._layouts, (numels, device), lambda: Layout(numels, self.unit, device))
        return _cached(self._plans, (numels, device, float(ratio), value_dtype),
                       lambda: Plan(layout, float(ratio), value_dtype, CODEC_IDS[self.name]))

    def workspace(self, plan: Plan, dtype: torch.dtype) -> torch.Tensor:
        """A padded scratch (layout.padded elements) with its padding zeroed; fill segment i at
        layout.starts[i]. Reused by the next call: read it only before then."""
        lay = plan.layout
        key = (lay.device, dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < lay.padded:
            # one buffer grown to the largest bucket: a fresh 100 MB tensor per step costs ~40 ms
            # of page faults on CPU.
            buf = self._scratch[key] = torch.empty(lay.padded, dtype=dtype, device=lay.device)
        work = buf[: lay.padded]
        for a, b in lay.pads:
            work[a:b].zero_()
        return work

    # --- device: the hot path (no host sync) ---------------------------------------------------
    def select(self, work: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Kept unit numbers (K,) int64, ascending: each segment's k_i best units (module docstring)."""
        lay = plan.layout
        rows = work.view(lay.total_units, self.unit)
        if rows.dtype != torch.float32:
            rows = rows.float()
        score = rows.abs().view(-1) if self.unit == 1 else _sum_squares(rows)
        # non-negative float32 order == their bits' integer order; the mask drops a NaN's sign.
        bits = score.view(torch.int32).to(torch.int64).bitwise_and_(0x7FFFFFFF)
        if lay.one_key is not None:
            # One sort by (segment, score descending, unit): each segment's units in a row, best
            # first, ties to the lower unit number. The key is unique, so no stable sort is needed.
            by_segment = torch.argsort(lay.one_key | ((0x7FFFFFFF - bits) << lay.unit_bits))
        else:
            # Too many units and segments for one 63-bit key: two sorts, the same order.
            by_score = torch.argsort(((0x7FFFFFFF - bits) << 32) | lay.arange)
            rank = torch.empty_like(by_score).index_copy_(0, by_score, lay.arange)
            by_segment = torch.argsort(rank | lay.segment_key)
        return _ascending(by_segment.index_select(0, plan.slots), lay.total_units)

    def compress(self, work: torch.Tensor, plan: Plan) -> Sent:
        """Select from the filled workspace and pack the payload."""
        ids = self.select(work, plan)
        values = work.view(-1, self.unit).index_select(0, ids)
        wire = self._wire(values)
        return Sent(self.pack(plan, ids, wire), ids, values, wire)

    def _wire(self, v: torch.Tensor) -> torch.Tensor:
        if self.value_dtype == torch.float16:
            return to_half(v)
        return v if self.value_dtype in (None, v.dtype) else v.to(self.value_dtype)

    def pack(self, plan: Plan, ids: torch.Tensor, wire: torch.Tensor) -> torch.Tensor:
        """The payload: cached header, int32 ids, padding, values (module docstring)."""
        parts = [plan.header, ids.to(torch.int32).view(torch.uint8)]
        if plan.pad is not None:
            parts.append(plan.pad)
        parts.append(wire.reshape(-1).view(torch.uint8))
        return torch.cat(parts)

    def keep_unsent(self, work: torch.Tensor, sent: Sent) -> None:
        """Turn the workspace into what stays behind (error feedback's residual): the kept units
        become value - value as sent, which carries the wire dtype's rounding."""
        work.view(-1, self.unit).index_copy_(0, sent.ids, sent.values - sent.wire.to(sent.values.dtype))

    def sent_mask(self, plan: Plan, ids: torch.Tensor) -> torch.Tensor:
        """Workspace-shaped bool mask of the kept units (DGC's momentum factor masking)."""
        units = plan.layout.total_units
        mask = torch.zeros(units, dtype=torch.bool, device=ids.device).index_fill_(0, ids, True)
        return mask if self.unit == 1 else mask[:, None].expand(units, self.unit).reshape(-1)

    def unpack(self, payload: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int64 (K,), values (K, unit) in the wire dtype): views of a payload of `plan`."""
        end = plan.ids_offset + 4 * plan.K
        ids = _view(payload[plan.ids_offset : end], torch.int32).to(torch.int64)
        values = _view(payload[plan.values_offset : plan.nbytes], plan.value_dtype)
        return ids, values.view(plan.K, self.unit)

    def _decode_scratch(self, lay: Layout, like: torch.Tensor) -> torch.Tensor:
        """A zeroed padded buffer to decode into. On CPU one per thread is reused (a fresh 100 MB
        tensor costs ~40 ms of page faults); on an accelerator a fresh one from the caching
        allocator is free, and stays ordered on the stream of the thread that decodes."""
        if like.device.type != "cpu":
            return torch.zeros(lay.padded, dtype=like.dtype, device=like.device)
        local = self._decode_local
        buf = getattr(local, "buf", None)
        if buf is None or buf.numel() < lay.padded or buf.dtype != like.dtype:
            buf = local.buf = torch.empty(lay.padded, dtype=like.dtype)
        return buf[: lay.padded].zero_()

    def fill(self, work: torch.Tensor, flat: torch.Tensor, plan: Plan) -> torch.Tensor:
        """The workspace holds the bucket `flat`, each segment at its start (one kernel)."""
        lay = plan.layout
        if lay.aligned:
            return work.copy_(flat)
        if flat.device.type == "cpu":  # slices cost nothing to launch on CPU; a 25M-index gather does
            for at, start, n in zip(lay.offsets, lay.starts, lay.numels):
                work[start : start + n].copy_(flat[at : at + n])
            return work
        return work.index_copy_(0, lay.to_work, flat)

    def add_payloads(self, out: torch.Tensor, plan: Plan, payloads) -> torch.Tensor:
        """out (the bucket, n elements) += each payload, in the order given (so every node that
        sums the same payloads gets the same bits). Ids within a payload are unique, so each
        index_add_ is a plain scatter: no order between atomics to decide the result."""
        lay = plan.layout
        dec = out if lay.aligned else self._decode_scratch(lay, out)
        rows = dec.view(-1, self.unit)
        for p in payloads:
            ids, values = self.unpack(p, plan)
            rows.index_add_(0, ids, values.to(dec.dtype))
        return _add_from_workspace(out, dec, lay)

    # --- host: validation of a received payload ------------------------------------------------
    def validate(self, payload: torch.Tensor, plan: Plan) -> None:
        """Raise FrameError unless `payload` (host memory) is a well-formed payload of `plan`:
        header, size, layout checksum, ids in range and strictly increasing, k_i per segment."""
        raw = _checked_header(self.name, payload, plan)
        K = plan.K
        ids = np.frombuffer(raw, dtype="<i4", count=K, offset=plan.ids_offset).astype(np.int64)
        lay = plan.layout
        if K and (ids[0] < 0 or ids[-1] >= lay.total_units or not bool(np.all(ids[1:] > ids[:-1]))):
            raise FrameError(f"sparse payload's unit ids are out of range (0..{lay.total_units - 1}) or not "
                             "strictly increasing: the payload is corrupt")
        bounds = np.searchsorted(ids, np.asarray(lay.first_units + (lay.total_units,), dtype=np.int64))
        if tuple(int(c) for c in np.diff(bounds)) != plan.kept:
            raise FrameError("sparse payload keeps other counts per segment than this node's bucket: "
                             "all nodes must build the same model and buckets")

    # --- the flat path (benchmark, tests): one segment -----------------------------------------
    def encode(self, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        """The payload of the 1-D `t` as one segment (`step` is unused: selection is exact)."""
        flat = t.reshape(-1)
        plan = self.plan((flat.numel(),), self.ratio, flat.device, self.wire_dtype(flat.dtype))
        work = self.workspace(plan, flat.dtype)
        work[: flat.numel()].copy_(flat)
        return self.compress(work, plan).payload

    def decode_add(self, payload: torch.Tensor, out: torch.Tensor, check: bool = True) -> torch.Tensor:
        """out += the payload `encode` made of a tensor of out's size and dtype. check=False skips
        the validation, which reads the payload on the host (a copy, and a sync, from a device)."""
        flat = out.view(-1)
        plan = self.plan((flat.numel(),), self.ratio, flat.device, self.wire_dtype(flat.dtype))
        if check:
            self.validate(payload, plan)
        return self.add_payloads(flat, plan, [payload.to(flat.device)]).view(out.shape)


class QuantPlan:
    """An int8 plan: every unit of a layout, its scale and its values (see Int8Codec)."""

    def __init__(self, layout: Layout, codec_id: int):
        self.layout = layout
        self.ratio = 1.0
        self.K = layout.total_units
        self.kept = layout.units
        self.first = 0
        """The first unit of the bucket's workspace that this plan covers (a piece's; else 0)."""
        self.scales_offset = HEADER_BYTES
        self.values_offset = HEADER_BYTES + 8 * (-(-self.K // 2))
        self.nbytes = self.values_offset + self.K * layout.unit
        """Bytes of every payload of this plan: the header, K float32 scales (padded to 8 bytes)
        and K x unit int8 values."""
        _add_header(self, codec_id, torch.int8)
        self._pieces: Optional[tuple] = None

    @property
    def bucket_plan(self) -> "QuantPlan":
        """The whole bucket's plan (this one, unless this is a piece of it)."""
        return self

    def spans(self) -> list[tuple[int, int, int]]:
        """(bucket offset, offset in this plan's units, count) of each run of bucket elements."""
        lay = self.layout
        return list(zip(lay.offsets, lay.starts, lay.numels))

    def index(self) -> torch.Tensor:
        """Per bucket element, its position in this plan's units (device int64)."""
        return self.layout.to_work

    def pieces(self, units: int) -> list["QuantPlan"]:
        """The plan cut into pieces of at most `units` units (one piece: the plan itself), each a
        plan of its own with its own payload, so a piece can cross the wire while the next is
        encoded and the last decoded (see GradientCompressor). Built once per plan."""
        if self._pieces is None or self._pieces[0] != units:
            made = [self] if self.K <= units else [_Piece(self, a, min(a + units, self.K))
                                                    for a in range(0, self.K, units)]
            self._pieces = (units, made)
        return self._pieces[1]


class _PieceLayout(NamedTuple):
    """What a piece's plan reads of a layout: its units in one run, and a checksum that names the
    bucket's layout and the piece's place in it (two nodes' pieces match only if both do)."""

    unit: int
    units: tuple[int, ...]
    total_units: int
    n: int
    padded: int
    checksum: int
    device: torch.device


class _Piece(QuantPlan):
    """Units [first, end) of a bucket's int8 plan as a plan of its own; `bucket` is the whole
    bucket's plan (its layout places the piece's elements in the bucket)."""

    def __init__(self, bucket: QuantPlan, first: int, end: int):
        lay = bucket.layout
        units = end - first
        checksum = zlib.crc32(np.asarray([lay.checksum, first, units], dtype="<i8").tobytes())
        piece = _PieceLayout(lay.unit, (units,), units, units * lay.unit, units * lay.unit, checksum, lay.device)
        super().__init__(piece, CODEC_IDS["int8"])  # type: ignore[arg-type]
        self.first = first
        self.bucket = bucket
        self._spans: Optional[list] = None
        self._index: Optional[torch.Tensor] = None

    @property
    def bucket_plan(self) -> QuantPlan:
        return self.bucket

    def spans(self) -> list[tuple[int, int, int]]:
        """(bucket offset, piece offset, count) of each run of the bucket's elements inside this
        piece, in order (padding after a segment's partial last block is in no run)."""
        if self._spans is None:
            lay, unit = self.bucket.layout, self.layout.unit
            lo, hi = self.first * unit, (self.first + self.K) * unit
            self._spans = [(at + max(lo, start) - start, max(lo, start) - lo, min(hi, start + n) - max(lo, start))
                           for at, start, n in zip(lay.offsets, lay.starts, lay.numels)
                           if start < hi and start + n > lo]
        return self._spans

    def index(self) -> torch.Tensor:
        """Per bucket element inside this piece, its position in the piece (device int64): one
        gather moves a decoded piece into the bucket on an accelerator."""
        if self._index is None:
            pos = [torch.arange(n, dtype=torch.int64) + p for _, p, n in self.spans()]
            self._index = _upload(torch.cat(pos) if pos else torch.empty(0, dtype=torch.int64), self.layout.device)
        return self._index


class Quantized(NamedTuple):
    """What `Int8Codec.compress` produced for a bucket."""

    payload: torch.Tensor
    scale: torch.Tensor
    """Per unit, float32 (K,): max |x| / 127."""
    q: torch.Tensor
    """The values as sent (K, unit) int8: round(x / scale), a view of the payload."""
    rounded: torch.Tensor
    """The same values as float32 (K, unit), a scratch that `keep_unsent` overwrites."""


class Int8Codec(TopKCodec):
    """Sends every block of `block_size` values as int8 with one float32 scale per block: a
    quarter of fp32's bytes (26.6% with the scales at 64-element blocks), nothing left out.

    Each block's scale is max |x| / 127 (computed as max |x| times float32(1/127), which rounds
    alike on every device) and its values round(x / scale), so each value is off by
    at most scale / 2, a 254th of its block's largest; error feedback (on by default) carries
    that rounding into the next step's gradient, as it carries what top-k leaves out. A block
    of zeros has scale 0 and sends zeros. A non-finite value makes its block's scale inf or NaN,
    so the sum there is NaN on every node, as an fp32 sum with an inf or NaN would not be
    silently finite either. Like top-k, payloads are all_gathered and every node adds them in
    rank order (same bits everywhere), through the same padded workspace and error-feedback
    buffers; the payload (format v2 header, codec id 4, value dtype code 4) is

        header 64 bytes | K float32 scales | 4 zero bytes when K is odd | K x unit int8 values
    """

    lossy = True
    sparse = True
    selects = False
    pieced = True

    def __init__(self, block_size: int = 64):
        super().__init__(1.0, "block", block_size, torch.int8)
        self.name = "int8"

    def __repr__(self) -> str:
        return f"Int8Codec(unit={self.unit})"

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.int8

    def plan(self, numels: tuple[int, ...], ratio: float, device: torch.device, value_dtype: torch.dtype) -> QuantPlan:
        """The plan of a bucket of segments of `numels` elements (`ratio` and `value_dtype` are
        unused: every unit is sent, as int8)."""
        numels, device = tuple(int(n) for n in numels), torch.device(device)
        layout = _cached(self._layouts, (numels, device), lambda: Layout(numels, self.unit, device))
        return _cached(self._plans, (numels, device), lambda: QuantPlan(layout, CODEC_IDS[self.name]))

    def compress(self, work: torch.Tensor, plan: QuantPlan) -> Quantized:
        """Scale and round the filled workspace, and pack the payload. Every step is one
        elementwise op (no fused multiply-add), so each device rounds alike."""
        rows = work.view(plan.K, self.unit)
        if rows.dtype != torch.float32:
            rows = rows.float()
        payload = torch.empty(plan.nbytes, dtype=torch.uint8, device=rows.device)  # in flight until the step ends
        payload[:HEADER_BYTES].copy_(plan.header)
        if plan.pad is not None:
            payload[plan.scales_offset + 4 * plan.K : plan.values_offset].zero_()
        scale = payload[plan.scales_offset : plan.scales_offset + 4 * plan.K].view(torch.float32)
        q = payload[plan.values_offset : plan.nbytes].view(torch.int8).view(plan.K, self.unit)
        qf = self._scratch_like(rows, "q")
        for c in _chunks(plan.K, rows.device):
            # times float32(1/127), not / 127: CUDA divides by a host scalar as a multiplication by
            # its reciprocal, so only this rounds alike on every device. NaN stays NaN.
            torch.mul(_tree(rows[c], torch.abs, torch.maximum), INV_127, out=scale[c])
            safe = torch.where(scale[c] > 0, scale[c], torch.ones_like(scale[c]))  # zeros divide by 1
            torch.div(rows[c], safe[:, None], out=qf[c])
            # round, then +-127 (an inf scale's finite values give 0, inf / inf NaN), NaN -> 0
            q[c].copy_(qf[c].round_().clamp_(-127.0, 127.0).nan_to_num_(0.0))
        return Quantized(payload, scale, q, qf)

    def keep_unsent(self, work: torch.Tensor, sent: Quantized, out: Optional[torch.Tensor] = None) -> None:
        """What stays behind, each value minus its value as sent, goes into `out` (work's shape;
        None: into the workspace itself)."""
        rows = work.view(-1, self.unit)
        dst = rows if out is None else out.view(-1, self.unit)
        for c in _chunks(rows.shape[0], rows.device):
            torch.sub(rows[c], sent.rounded[c].mul_(sent.scale[c, None]).to(rows.dtype), out=dst[c])

    def _scratch_like(self, rows: torch.Tensor, key: str) -> torch.Tensor:
        return self._scratch_rows(tuple(rows.shape), rows.device, key)

    def _scratch_rows(self, shape: tuple[int, int], device: torch.device, key: str) -> torch.Tensor:
        """A float32 buffer of `shape`: on CPU one per thread and purpose, reused (a fresh 100 MB
        tensor costs ~40 ms of page faults there); on an accelerator a fresh one."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=torch.float32, device=device)
        local = self._decode_local
        buf = getattr(local, key, None)
        numel = shape[0] * shape[1]
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=torch.float32)
            setattr(local, key, buf)
        return buf[:numel].view(shape)

    def unpack(self, payload: torch.Tensor, plan: QuantPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales float32 (K,), values int8 (K, unit)): views of a payload of `plan`."""
        scale = _view(payload[plan.scales_offset : plan.scales_offset + 4 * plan.K], torch.float32)
        q = _view(payload[plan.values_offset : plan.nbytes], torch.int8)
        return scale, q.view(plan.K, self.unit)

    def add_payloads(self, out: torch.Tensor, plan: QuantPlan, payloads) -> torch.Tensor:
        """out (the bucket, n elements) += each payload's values times their scales, in the order
        given (so every node that sums the same payloads gets the same bits)."""
        lay = plan.layout
        dec = out if lay.aligned else self._decode_scratch(lay, out)
        rows = dec.view(-1, self.unit)
        parts = [self.unpack(p, plan) for p in payloads]
        value = self._scratch_like(rows, "decode")
        for c in _chunks(plan.K, rows.device):  # each element still adds the payloads in order
            for scale, q in parts:
                rows[c].add_(torch.mul(q[c], scale[c, None], out=value[c]).to(dec.dtype))
        return _add_from_workspace(out, dec, lay)

    PIECE_UNITS = 32768
    """A bucket of more units is sent as pieces of this many (2M values, 2.1 MB on the wire):
    GradientCompressor encodes the next piece while one crosses the wire and another is summed."""

    def sum_payloads(self, out: torch.Tensor, plan: QuantPlan, payloads) -> torch.Tensor:
        """The bucket elements of `plan` (a bucket's plan or a piece of it) in `out` (the whole
        bucket) become the sum of `payloads` (each a payload of `plan`), added in the order given
        so that every node that sums the same payloads gets the same bits. Elements outside the
        plan are left as they are."""
        unit, bucket = self.unit, plan.bucket_plan
        parts = [self.unpack(p, plan) for p in payloads]
        direct = bucket.layout.aligned and out.dtype == torch.float32
        if direct:  # the plan's units are bucket elements, in order
            rows = out[plan.first * unit : (plan.first + plan.K) * unit].view(plan.K, unit)
        else:
            rows = self._scratch_rows((plan.K, unit), out.device, "decode")
        value = self._scratch_like(rows, "value")
        for c in _chunks(plan.K, rows.device):
            for i, (scale, q) in enumerate(parts):
                if i == 0:  # int8 x float32 is float32: no separate cast of the values
                    torch.mul(q[c], scale[c, None], out=rows[c])
                else:
                    rows[c].add_(torch.mul(q[c], scale[c, None], out=value[c]))
        if not parts:
            rows.zero_()
        if not direct:
            dec = rows.view(-1)
            spans = plan.spans()
            if out.device.type == "cpu":
                for at, pos, n in spans:
                    out[at : at + n].copy_(dec[pos : pos + n])
            elif spans:
                lo, hi = spans[0][0], spans[-1][0] + spans[-1][2]
                out[lo:hi].copy_(dec.index_select(0, plan.index()))
        return out

    def validate(self, payload: torch.Tensor, plan: QuantPlan) -> None:
        """Raise FrameError unless `payload` (host memory) is a well-formed payload of `plan`:
        header, size, layout checksum, and no negative scale (a scale is a maximum of |x|)."""
        raw = _checked_header(self.name, payload, plan)
        scale = np.frombuffer(raw, dtype="<f4", count=plan.K, offset=plan.scales_offset)
        if bool(np.any(scale < 0)):
            raise FrameError(f"{self.name} payload has a negative scale: the payload is corrupt")


def _chunks(rows: int, device: torch.device):
    """Row slices to work through: on CPU `CPU_TREE_ROWS` rows at a time, which stay in cache
    between one elementwise pass and the next (the same bits as whole passes); elsewhere one."""
    step = CPU_TREE_ROWS if device.type == "cpu" else max(rows, 1)
    return [slice(i, i + step) for i in range(0, rows, step)]


def _add_header(plan, codec_id: int, value_dtype: torch.dtype) -> None:
    """A plan's header (host values, device bytes) and the zero pad between its K 4-byte entries
    (ids or scales, right after the header) and its values at `plan.values_offset`."""
    lay = plan.layout
    header = np.array([MAGIC, VERSION, codec_id, _DTYPE_CODES[value_dtype], lay.unit, plan.K, lay.n, lay.checksum],
                      dtype="<i8")
    plan.header_values = tuple(int(x) for x in header)
    plan.header = _upload(torch.frombuffer(bytearray(header.tobytes()), dtype=torch.uint8), lay.device)
    pad = plan.values_offset - HEADER_BYTES - 4 * plan.K
    plan.pad = torch.zeros(pad, dtype=torch.uint8, device=lay.device) if pad else None


def _add_from_workspace(out: torch.Tensor, dec: torch.Tensor, lay: Layout) -> torch.Tensor:
    """out (the bucket) += `dec` (the padded workspace it was decoded into), unless they are
    one tensor (an aligned layout decodes in place)."""
    if dec is out:
        return out
    if out.device.type == "cpu":  # as in fill: slices on CPU, one gather on an accelerator
        for at, start, n in zip(lay.offsets, lay.starts, lay.numels):
            out[at : at + n].add_(dec[start : start + n])
        return out
    return out.add_(dec.index_select(0, lay.to_work))


def _checked_header(name: str, payload: torch.Tensor, plan) -> np.ndarray:
    """The payload's bytes on the host, once its header, size and layout checksum match `plan`
    (a top-k or an int8 plan); else FrameError saying what differs."""
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise FrameError(f"{name} payload must be a 1-D uint8 tensor, got "
                         f"{getattr(payload, 'dtype', type(payload).__name__)} {tuple(getattr(payload, 'shape', ()))}")
    raw = payload.detach().cpu().contiguous().numpy()
    if raw.size < HEADER_BYTES:
        raise FrameError(f"{name} payload of {raw.size} bytes is shorter than its {HEADER_BYTES}-byte header")
    magic, version, codec_id, vcode, unit, K, n, checksum = (int(x) for x in np.frombuffer(raw, dtype="<i8", count=8))
    if magic != MAGIC or version != VERSION:
        raise FrameError(f"{name} payload has magic {magic:#x} version {version}, expected "
                         f"{MAGIC:#x} version {VERSION}: all nodes must run the same MacFleet version")
    want = plan.header_values
    if (codec_id, vcode, unit) != want[2:5]:
        raise FrameError(f"payload from codec id {codec_id} unit {unit} value dtype code {vcode}, but this node "
                         f"runs {name} (id {want[2]}) unit {want[4]} value dtype code {want[3]}: "
                         "all nodes must use the same compression config")
    if (n, checksum) != (want[6], want[7]):
        raise FrameError(f"{name} payload's segments differ from this node's bucket ({n} elements, checksum "
                         f"{checksum:#x}; here {want[6]}, {want[7]:#x}): all nodes must build the same model and buckets")
    if K != plan.K:
        raise FrameError(f"{name} payload keeps {K} units, this node keeps {plan.K} at ratio {plan.ratio}: "
                         "all nodes must use the same compression config at the same step")
    if raw.size != plan.nbytes:
        raise FrameError(f"{name} payload is {raw.size} bytes, its header says {plan.nbytes}: truncated or corrupt")
    return raw


INV_127 = float(np.float32(1.0 / 127.0))
"""int8's scale factor: a block's scale is its max |x| times this (see `Int8Codec.compress`)."""

CPU_TREE_ROWS = 8192
"""On CPU the tree runs over chunks of this many rows, which stay in cache between its levels:
the same bits as one pass over all rows, several times faster on CPU (ResNet-50: `macfleet benchmark
--type compression`)."""


def _ascending(kept: torch.Tensor, total_units: int) -> torch.Tensor:
    """The distinct unit numbers `kept` (int64), in ascending order, without a sort: each lands
    at its rank among the kept, which a running count over a mask of all units gives. A sort of
    K int64 keys is a radix pass (a kernel and a memset) per key byte; this is six kernels,
    whose sizes the layout fixes, so still no host sync (ResNet-50 on CUDA: about half of a
    bucket's launches were its two sorts)."""
    mask = torch.zeros(total_units, dtype=torch.int64, device=kept.device).index_fill_(0, kept, 1)
    rank = torch.cumsum(mask, 0).index_select(0, kept).sub_(1)
    return torch.empty_like(kept).index_copy_(0, rank, kept)


def _sum_squares(rows: torch.Tensor) -> torch.Tensor:
    """Per row sum of squares by a fixed pairwise tree (elementwise adds only), so every device
    rounds it alike; a reduction kernel's order would differ between CPU and GPU."""
    return _by_tree(rows, lambda r: r * r, torch.add)


def _max_abs(rows: torch.Tensor) -> torch.Tensor:
    """Per row max |x| (NaN if the row has one) by the same tree: on CPU several times faster
    than a max reduction over short rows."""
    return _by_tree(rows, torch.abs, torch.maximum)


def _by_tree(rows: torch.Tensor, leaf, combine) -> torch.Tensor:
    if rows.device.type == "cpu" and rows.shape[0] > CPU_TREE_ROWS:
        out = torch.empty(rows.shape[0], dtype=rows.dtype)
        for i in range(0, rows.shape[0], CPU_TREE_ROWS):
            out[i : i + CPU_TREE_ROWS] = _tree(rows[i : i + CPU_TREE_ROWS], leaf, combine)
        return out
    return _tree(rows, leaf, combine)


def _tree(rows: torch.Tensor, leaf, combine) -> torch.Tensor:
    s = leaf(rows)
    while s.shape[1] > 1:
        w = s.shape[1]
        h = w // 2
        t = combine(s[:, :h], s[:, h : 2 * h])
        if w % 2:
            t[:, :1] = combine(t[:, :1], s[:, 2 * h :])
        s = t
    return s.reshape(-1)


def _view(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    try:
        return raw.view(dtype)
    except RuntimeError:
        # a received buffer may start at an unaligned offset: copy, then view.
        return raw.clone().view(dtype)


def build_codec(cfg: CompressionConfig | str = "none", **overrides) -> Codec:
    """The codec for a `CompressionConfig` (or a codec name plus CompressionConfig fields)."""
    if isinstance(cfg, str):
        cfg = CompressionConfig(name=cfg, **overrides)
    elif overrides:
        raise TypeError("build_codec: pass overrides only with a codec name")
    if cfg.name == "auto":
        raise ConfigError("compression=auto is not a codec: the trainer picks one at start (macfleet/compression/"
                          "auto.py); name a codec here: none, fp16, int8, topk or topk_fp16")
    if cfg.name == "none":
        return NoneCodec()
    if cfg.name == "fp16":
        return FP16Codec()
    if cfg.name == "int8":
        return Int8Codec(cfg.block_size)
    return TopKCodec(cfg.ratio, cfg.granularity, cfg.block_size,
                     torch.float16 if cfg.name == "topk_fp16" else None)
