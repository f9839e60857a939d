"""Gradient codecs behind one small interface, and the sparse payload's wire format.

A codec turns a gradient into the payload a node puts on the wire and back:
    payload = codec.encode(t, step)             # t: 1-D tensor; payload stays on t's device
    codec.decode_add(payload, out)              # out += what the payload carries
    codec.decode(payload, numel) -> tensor      # a fresh dense tensor
    codec.payload_nbytes(payload) -> int        # bytes on the wire
`none` and `fp16` are dense (their payload is the tensor, or its fp16 cast, and the engine sums
payloads with all_reduce); `topk` and `topk_fp16` are sparse (the engine all_gathers payloads and
each node sums them with `decode_add`). The sparse codecs also work on a list of parameter
segments (`select`, `pack`, `unpack`, `add_selection`), which is what `GradientCompressor` uses.

Sparse payload (one uint8 tensor, little-endian, so a bucket costs a single all_gather):
    header   8 x int64: MAGIC, VERSION, codec id (2 topk, 3 topk_fp16), value dtype code,
             unit (block_size in block mode, 1 per element), nseg, nvalues, index_nbytes
    segments nseg x 2 x int64: numel, units kept
    values   nvalues x value dtype: the kept units' values, segment by segment, in unit order
             (a kept block is block_size values, a segment's partial last block fewer)
    indices  index_nbytes bytes: the kept units' bucket-wide unit numbers (a segment's units
             are numbered after the previous segments'), coded by `indexcode.encode_indices`
The values section starts at a multiple of 8 bytes so it can be viewed in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from macfleet.compression.indexcode import decode_indices, encode_indices
from macfleet.compression.select import block_scores, keep_count, sample_seed, top_units
from macfleet.config import CompressionConfig
from macfleet.errors import FrameError

MAGIC = 0x315A464D  # b"MFZ1" little-endian
VERSION = 1
HEADER_FIELDS = 8
CODEC_IDS = {"none": 0, "fp16": 1, "topk": 2, "topk_fp16": 3}
VALUE_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64}
_DTYPE_CODES = {dt: code for code, dt in VALUE_DTYPES.items()}


class Codec:
    """The interface every codec implements; see the module docstring."""

    name = "none"
    lossy = False
    """Drops information that error feedback should carry to the next step."""
    sparse = False
    """Payloads are all_gathered and summed with decode_add (else all_reduced as tensors)."""

    def encode(self, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def decode_add(self, payload: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
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

    def decode_add(self, payload: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.add_(payload.reshape(-1).to(out.device, out.dtype))


class FP16Codec(Codec):
    """Sends the gradient cast to float16 (half the bytes; values beyond +-65504 saturate)."""

    name = "fp16"

    def encode(self, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        return to_half(t)

    def decode_add(self, payload: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.add_(payload.reshape(-1).to(out.device, out.dtype))


def to_half(t: torch.Tensor) -> torch.Tensor:
    # saturate instead of overflowing to inf: one huge gradient must not poison the sum.
    # (clamping the fp16 copy in place avoids a full-size fp32 temporary).
    return t.to(torch.float16).clamp_(-65504.0, 65504.0) if t.dtype != torch.float16 else t


@dataclass
class Selection:
    """What a sparse codec keeps of one parameter segment."""

    units: torch.Tensor
    """Sorted int64 unit numbers within the segment (blocks, or elements)."""
    values: torch.Tensor
    """The kept units' values in the wire dtype, in unit order."""
    numel: int
    """Elements in the segment."""


class TopKCodec(Codec):
    """Keeps the largest `ratio` of each segment's units and sends (indices, values)."""

    sparse = True
    lossy = True

    def __init__(self, ratio: float = 0.1, granularity: str = "block", block_size: int = 64,
                 sample_fraction: float = 0.01, value_dtype: Optional[torch.dtype] = None):
        self.ratio = float(ratio)
        self.granularity = granularity
        self.unit = block_size if granularity == "block" else 1
        self.sample_fraction = float(sample_fraction)
        self.value_dtype = value_dtype
        """Wire dtype of the values; None keeps the gradient's dtype."""
        self.name = "topk_fp16" if value_dtype == torch.float16 else "topk"
        self._scratch: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"TopKCodec(name={self.name}, ratio={self.ratio}, granularity={self.granularity}, "
                f"unit={self.unit}, sample_fraction={self.sample_fraction})")

    # --- one segment -------------------------------------------------------------------------
    def _abs(self, x: torch.Tensor) -> torch.Tensor:
        # a reused buffer: a fresh 100 MB tensor per step costs ~40 ms of page faults on CPU.
        buf = self._scratch.get(x.device)
        if buf is None or buf.numel() < x.numel() or buf.dtype != x.dtype:
            buf = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
            self._scratch[x.device] = buf
        return torch.abs(x, out=buf[: x.numel()])

    def _wire(self, v: torch.Tensor) -> torch.Tensor:
        if self.value_dtype == torch.float16:
            return to_half(v)
        return v if self.value_dtype is None else v.to(self.value_dtype)

    def select(self, x: torch.Tensor, ratio: float, seed: int = 0) -> Selection:
        """Choose what to send of the 1-D contiguous segment `x`; `x` is not modified."""
        n = x.numel()
        if self.unit == 1:
            k = keep_count(n, ratio)
            score = self._abs(x)
            if self.granularity == "exact" and k < n:
                units = torch.sort(torch.topk(score, k, sorted=False).indices).values
            elif self.granularity == "exact":
                units = torch.arange(n, device=x.device)
            else:
                units = top_units(score, k, self.sample_fraction, seed)
            return Selection(units, self._wire(x.index_select(0, units)), n)
        bs = self.unit
        full = n // bs
        score = block_scores(x, bs)
        units = top_units(score, keep_count(score.numel(), ratio), self.sample_fraction, seed)
        nf = units.numel()
        tail = None
        if n % bs and nf and int(units[-1]) == full:
            nf -= 1
            tail = x[full * bs :]
        values = x[: full * bs].view(full, bs).index_select(0, units[:nf]).view(-1)
        if tail is not None:
            values = torch.cat([values, tail])
        return Selection(units, self._wire(values), n)

    def add_selection(self, out: torch.Tensor, sel: Selection, alpha: float = 1.0) -> None:
        """out += alpha * (the segment `sel` describes); `out` is the segment's 1-D view."""
        vals = sel.values.to(out.dtype)
        if self.unit == 1:
            out.index_add_(0, sel.units, vals, alpha=alpha)
            return
        bs = self.unit
        n = out.numel()
        full = n // bs
        nf = sel.units.numel()
        has_tail = bool(n % bs) and nf > 0 and int(sel.units[-1]) == full
        nf -= int(has_tail)
        if nf:
            out[: full * bs].view(full, bs).index_add_(0, sel.units[:nf], vals[: nf * bs].view(nf, bs), alpha=alpha)
        if has_tail:
            out[full * bs :].add_(vals[nf * bs :], alpha=alpha)

    def fill_selection(self, out: torch.Tensor, sel: Selection, value: float = 0.0) -> None:
        """Set the selected units of the segment view `out` to `value` (DGC momentum masking)."""
        if self.unit == 1:
            out.index_fill_(0, sel.units, value)
            return
        bs = self.unit
        full = out.numel() // bs
        units = sel.units
        if units.numel() and out.numel() % bs and int(units[-1]) == full:
            out[full * bs :].fill_(value)
            units = units[:-1]
        out[: full * bs].view(full, bs).index_fill_(0, units, value)

    def _units_of(self, numel: int) -> int:
        return -(-numel // self.unit)

    # --- a bucket of segments: the wire payload ------------------------------------------------
    def pack(self, selections: list[Selection]) -> torch.Tensor:
        """One uint8 payload for the segments' selections (format in the module docstring)."""
        device = selections[0].values.device if selections else torch.device("cpu")
        vdtype = selections[0].values.dtype if selections else (self.value_dtype or torch.float32)
        base, ids = 0, []
        for sel in selections:
            ids.append(sel.units + base)
            base += self._units_of(sel.numel)
        code = encode_indices(torch.cat(ids)) if ids else torch.empty(0, dtype=torch.uint8, device=device)
        nvalues = sum(sel.values.numel() for sel in selections)
        itemsize = torch.empty(0, dtype=vdtype).element_size()
        hdr = 8 * (HEADER_FIELDS + 2 * len(selections))
        payload = torch.empty(hdr + nvalues * itemsize + code.numel(), dtype=torch.uint8, device=device)
        header = [MAGIC, VERSION, CODEC_IDS[self.name], _DTYPE_CODES[vdtype], self.unit,
                  len(selections), nvalues, code.numel()]
        for sel in selections:
            header += [sel.numel, sel.units.numel()]
        payload[:hdr].view(torch.int64).copy_(torch.tensor(header, dtype=torch.int64))
        values = payload[hdr : hdr + nvalues * itemsize].view(vdtype)
        at = 0
        for sel in selections:
            values[at : at + sel.values.numel()].copy_(sel.values)
            at += sel.values.numel()
        payload[hdr + nvalues * itemsize :].copy_(code)
        return payload

    def unpack(self, payload: torch.Tensor, numels: Optional[list[int]] = None) -> list[Selection]:
        """Validate a payload and split it into per-segment selections."""
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise FrameError(f"{self.name} payload must be a 1-D uint8 tensor, got {payload.dtype} {tuple(payload.shape)}")
        if payload.numel() < 8 * HEADER_FIELDS:
            raise FrameError(f"{self.name} payload of {payload.numel()} bytes is shorter than its header")
        head = _view(payload[: 8 * HEADER_FIELDS], torch.int64).tolist()
        magic, version, codec_id, vcode, unit, nseg, nvalues, nidx = head
        if magic != MAGIC or version != VERSION:
            raise FrameError(f"sparse payload has magic {magic:#x} version {version}, expected "
                             f"{MAGIC:#x} version {VERSION}: all nodes must run the same MacFleet version")
        if codec_id != CODEC_IDS[self.name] or unit != self.unit:
            raise FrameError(f"payload from codec id {codec_id} unit {unit}, but this node runs {self.name} "
                             f"unit {self.unit}: all nodes must use the same compression config")
        if vcode not in VALUE_DTYPES or nseg < 0 or nvalues < 0 or nidx < 0:
            raise FrameError(f"sparse payload header is corrupt: {head}")
        vdtype = VALUE_DTYPES[vcode]
        itemsize = torch.empty(0, dtype=vdtype).element_size()
        hdr = 8 * (HEADER_FIELDS + 2 * nseg)
        if payload.numel() != hdr + nvalues * itemsize + nidx:
            raise FrameError(f"sparse payload is {payload.numel()} bytes, its header says "
                             f"{hdr + nvalues * itemsize + nidx}")
        segs = _view(payload[8 * HEADER_FIELDS : hdr], torch.int64).view(-1, 2).tolist() if nseg else []
        if numels is not None and [s[0] for s in segs] != list(numels):
            raise FrameError("sparse payload's segments differ from this node's bucket: "
                             "all nodes must build the same model and buckets")
        counts = [s[1] for s in segs]
        ids = decode_indices(payload[hdr + nvalues * itemsize :], sum(counts))
        values = _view(payload[hdr : hdr + nvalues * itemsize], vdtype)
        out, base, at_id, at_val = [], 0, 0, 0
        for numel, count in segs:
            units = self._units_of(numel)
            local = ids[at_id : at_id + count] - base
            if count and (int(local[0]) < 0 or int(local[-1]) >= units):
                raise FrameError(f"sparse payload indexes unit {int(local[-1])} of a {units}-unit segment")
            nval = count * self.unit
            if count and self.unit > 1 and numel % self.unit and int(local[-1]) == units - 1:
                nval -= self.unit - numel % self.unit
            if at_val + nval > nvalues:
                raise FrameError("sparse payload holds fewer values than its indices need")
            out.append(Selection(local, values[at_val : at_val + nval], numel))
            base, at_id, at_val = base + units, at_id + count, at_val + nval
        if at_val != nvalues:
            raise FrameError(f"sparse payload holds {nvalues} values, its indices use {at_val}")
        return out

    # --- the flat path (benchmark, tests) -------------------------------------------------------
    def encode(self, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        flat = t.reshape(-1)
        return self.pack([self.select(flat, self.ratio, sample_seed(step, ""))])

    def decode_add(self, payload: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        payload = payload.to(out.device)
        sels = self.unpack(payload)
        at = 0
        for sel in sels:
            self.add_selection(out[at : at + sel.numel], sel)
            at += sel.numel
        if at != out.numel():
            raise FrameError(f"sparse payload covers {at} elements, the output has {out.numel()}")
        return out


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
    if cfg.name == "none":
        return NoneCodec()
    if cfg.name == "fp16":
        return FP16Codec()
    return TopKCodec(cfg.ratio, cfg.granularity, cfg.block_size, cfg.sample_fraction,
                     torch.float16 if cfg.name == "topk_fp16" else None)
