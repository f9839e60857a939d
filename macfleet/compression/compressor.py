"""`GradientCompressor`: what MacFleetDDP's comm hook calls for each bucket.

    comp = GradientCompressor(cfg, group)              # group: macfleet.comm.Group, or None
    fut = comp.reduce(flat, segments, step)            # -> Future[Tensor]: the global-mean bucket

`flat` is the bucket's buffer, already scaled by this node's sample share b_i / B, and
`segments` lists (parameter name, offset, numel) covering it. The future's value is `flat`
itself, overwritten with the sum over ranks of what each rank sent (like PyTorch's allreduce
hook, which reduces bucket.buffer() in place): keep a copy first if you need the input.

Per codec:
- none: dense all_reduce(sum) of flat.
- fp16: flat cast to fp16 (saturating at +-65504), all_reduce(sum) in fp16 on the wire, cast
  back. Precision: each value is rounded to fp16 once, and the engine's sum is rounded in fp16,
  so the result matches the fp32 mean to about world_size * 2^-11 relative.
- topk / topk_fp16: error feedback (add the residual, per parameter) into a padded workspace ->
  select per parameter segment, vectorised over the bucket -> one uint8 payload of a size fixed
  by the layout and ratio (codecs.py) -> all_gather (equal sizes on every rank; each payload is
  validated on its host copy) -> every node sums the payloads in rank order (so all nodes get
  the same bits) -> the residual keeps what was not sent. On a device the whole of it queues
  kernels of host-known shapes: no host sync.
  While the warm-up ratio (or the configured ratio) is 1.0 the top-k codecs send densely through
  the none / fp16 path: topk at ratio 1.0 is exactly none; topk_fp16 is fp16 whose rounding
  error is carried by error feedback into the next step (exactly fp16 with error_feedback=false).
With world_size 1 (group None) the same encode/decode runs locally, so one process computes
exactly what a node contributes.

Where the encoding runs (compression.encoder): on CUDA in a fleet, `reduce` hands the bucket to
an encoder thread (encoder.py) and returns a future at once, so backward's thread only launches
backward's kernels; on CPU and MPS, or with encoder=inline, the hook encodes. The kernels and
their order are the same either way, so are the bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Optional

import torch

from macfleet.compression.codecs import Codec, build_codec, to_half
from macfleet.compression.feedback import ErrorFeedback, warmup_ratio
from macfleet.config import CompressionConfig
from macfleet.errors import ConfigError


def _done(value: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


class GradientCompressor:
    """One node's codec, error-feedback state and wire statistics."""

    def __init__(self, cfg: CompressionConfig, group=None, redoable: bool = False):
        self.cfg = cfg
        self.group = group
        self.codec: Codec = build_codec(cfg)
        if cfg.momentum_correction and not (self.codec.selects and cfg.error_feedback):
            raise ConfigError("compression.momentum_correction needs a top-k codec (topk, topk_fp16) and "
                              "compression.error_feedback=true (the velocity is accumulated in the residual)")
        self.feedback: Optional[ErrorFeedback] = (
            ErrorFeedback(cfg, redoable=redoable) if cfg.lossy and cfg.error_feedback else None
        )
        self._encoder = None  # an Encoder, or False: encode in the caller (decided at the first bucket)
        self._stats_lock = threading.Lock()
        self.stats = {"calls": 0, "bytes_sent": 0, "dense_bytes": 0, "compress_s": 0.0, "decompress_s": 0.0}
        """Totals since construction: payload bytes this node sent, the dense fp32 bytes they
        stand for, and seconds spent encoding / decoding. wire_ratio = bytes_sent / dense_bytes."""

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else int(self.group.world_size)

    @property
    def wire_ratio(self) -> float:
        return self.stats["bytes_sent"] / max(1, self.stats["dense_bytes"])

    def ratio_at(self, step: int) -> float:
        """The top-k ratio used at `step` (sparsity warm-up included)."""
        return warmup_ratio(self.cfg, step)

    def reduce(self, flat: torch.Tensor, segments: list[tuple[str, int, int]], step: int) -> torch.futures.Future:
        """Compress, exchange and sum one bucket; see the module docstring. On a device this
        queues kernels only: no host sync (sizes come from the layout, see codecs.py). With an
        encoder thread (compression.encoder) the caller only hands the bucket over."""
        encoder = self._encoder_for(flat.device)
        if encoder is None:
            return self.reduce_now(flat, segments, step)
        # The kernels go where the hook's would have: on CUDA the caller's current stream (and
        # device); MPS has one queue, CPU none.
        where = torch.cuda.stream(torch.cuda.current_stream(flat.device)) if flat.device.type == "cuda" \
            else contextlib.nullcontext()

        def job():
            with where:
                return self.reduce_now(flat, segments, step)

        return encoder.submit(job)

    def _encoder_for(self, device: torch.device):
        if self._encoder is False:
            return None
        if self._encoder is None:
            mode = getattr(self.cfg, "encoder", "auto")
            # auto: CUDA only. On MPS, PyTorch reports crashes inside Metal when two Python threads
            # run tensor ops at once (pytorch/pytorch#197805, torch 2.8 to 2.15.dev): the hook's
            # thread is also backward's, so inline keeps the codec's kernels off a second thread.
            threaded = self.world_size > 1 and (mode == "thread" or (mode == "auto" and device.type == "cuda"))
            if not threaded:
                self._encoder = False
                return None
            from macfleet.compression.encoder import Encoder

            # On CPU the encoding is compute: it keeps torch's thread pool; elsewhere it is launches.
            self._encoder = Encoder(solo=device.type != "cpu")
        return self._encoder

    def drain(self) -> None:
        """Every bucket handed over so far has been encoded and its exchange issued."""
        if self._encoder:
            self._encoder.drain()

    def close(self) -> None:
        """Stop the encoder thread (a generation's end), once what was handed over has run: a
        bucket still queued must not touch the residuals while the next generation takes them."""
        if self._encoder:
            self._encoder.drain()
            self._encoder.close()
        self._encoder = False

    def reduce_now(self, flat: torch.Tensor, segments: list[tuple[str, int, int]], step: int) -> torch.futures.Future:
        """`reduce` on the calling thread."""
        start = time.perf_counter()
        flat = flat.view(-1)
        views = _segment_views(flat, segments)
        codec = self.codec
        ratio = self.ratio_at(step)
        if self.feedback:
            self.feedback.begin(step)
        if codec.selects and ratio >= 1.0:
            self._fold_dense(flat, views)
            dense = "none" if codec.name == "topk" else "fp16"
            return self._dense(flat, dense, start)
        if not codec.sparse:
            return self._dense(flat, codec.name, start)
        plan = codec.plan(tuple(v.numel() for _, v in views), ratio, flat.device, codec.wire_dtype(flat.dtype))
        lay = plan.layout
        if codec.pieced and lay.aligned:
            # The bucket is its own workspace: int8 reads each piece once before its sum
            # overwrites it, and writes the residual elsewhere (one buffer and one copy saved).
            work = flat
        else:
            work = codec.fill(codec.workspace(plan, flat.dtype), flat, plan)
        bound = None
        if self.feedback:
            # the bucket's residuals as one buffer in workspace layout: one kernel each way
            bound = self.feedback.bind(tuple(name for name, _ in views), lay.starts, lay.numels, lay.padded, work)
            bound.accumulate(work)
        if codec.pieced:
            return self._in_pieces(flat, plan, work, bound, start)
        sent = codec.compress(work, plan)
        if bound is not None:
            codec.keep_unsent(work, sent)
            bound.commit(work, codec.sent_mask(plan, sent.ids) if self.feedback.momentum else None)
        self._count(flat, sent.payload.numel(), start)
        if self.world_size == 1:
            return _done(self._sum(flat, plan, [sent.payload]))
        # Every payload of this plan has plan.nbytes bytes on every rank; each is validated on
        # its host copy (comm thread) before it reaches the device.
        fut = self.group.all_gather_async(sent.payload, check=lambda p: codec.validate(p, plan), equal=True)
        return fut.then(lambda f: self._sum(flat, plan, f.value()))

    def _in_pieces(self, flat: torch.Tensor, plan, work: torch.Tensor, bound, start: float) -> torch.futures.Future:
        """int8: a large bucket goes as pieces (Int8Codec.PIECE_UNITS units each), each encoded,
        all_gathered and summed on its own, so one piece crosses the wire while this thread
        encodes the next and a comm thread sums the last: a 68 MB bucket no longer waits for its
        whole encode before its first byte leaves, nor for its last byte before its sum starts.
        Blocks are independent, so the bits are those of one payload per bucket."""
        codec = self.codec
        # On an accelerator the codec is a few kernels: there each piece's staging and collective
        # cost more than the overlap saves (ResNet-50 on 2 H100s: 42 ms of comm wait in pieces, 28
        # in one payload per bucket), so pieces are for CPU buckets.
        cpu = flat.device.type == "cpu"
        pieces = plan.pieces(codec.PIECE_UNITS) if self.world_size > 1 and cpu else [plan]
        unit = codec.unit
        futures, nbytes = [], 0
        # Each piece's residual goes straight into the buffer commit would copy it to, before
        # the piece's sum can overwrite the bucket (which may be the workspace).
        residual = bound.next_residual() if bound is not None else None
        for piece in pieces:
            span = slice(piece.first * unit, (piece.first + piece.K) * unit)
            part = work[span]
            sent = codec.compress(part, piece)
            if bound is not None:
                codec.keep_unsent(part, sent, out=residual[span])  # before the next compress reuses its scratch
            nbytes += sent.payload.numel()
            if self.world_size == 1:
                futures.append(_done(self._sum(flat, piece, [sent.payload])))
                continue
            fut = self.group.all_gather_async(sent.payload, check=lambda p, piece=piece: codec.validate(p, piece),
                                             equal=True)
            futures.append(fut.then(lambda f, piece=piece: self._sum(flat, piece, f.value())))
        if bound is not None:
            bound.commit(None)  # written above
        self._count(flat, nbytes, start)
        if len(futures) == 1:
            return futures[0]
        return torch.futures.collect_all(futures).then(lambda f: _each_done(flat, f.value()))

    def _fold_dense(self, flat: torch.Tensor, views) -> None:
        # ratio 1.0: everything is sent, so flat becomes residual + gradient and the residual
        # keeps only fp16's rounding (or nothing).
        if self.feedback is None:
            return
        for name, view in views:
            acc = self.feedback.accumulate(name, view, out=view)
            sent = acc if self.codec.name == "topk" else to_half(acc).to(acc.dtype)
            self.feedback.commit(name, acc - sent)
            if sent is not acc:
                view.copy_(sent)

    def _dense(self, flat: torch.Tensor, name: str, start: float) -> torch.futures.Future:
        payload = flat if name == "none" else to_half(flat)
        self._count(flat, payload.numel() * payload.element_size(), start)
        if self.world_size == 1:
            return _done(flat if payload is flat else flat.copy_(payload))
        fut = self.group.all_reduce_async(payload, "sum")
        return fut.then(lambda f: _into(flat, f.value()))

    def _sum(self, flat: torch.Tensor, plan, payloads: list) -> torch.Tensor:
        start = time.perf_counter()
        if self.codec.pieced:  # int8: overwrites the plan's elements (a piece's)
            self.codec.sum_payloads(flat, plan, payloads)
        else:
            flat.zero_()
            self.codec.add_payloads(flat, plan, payloads)
        with self._stats_lock:  # pieces are summed on several comm threads
            self.stats["decompress_s"] += time.perf_counter() - start
        return flat

    def _count(self, flat: torch.Tensor, nbytes: int, start: float) -> None:
        """One bucket sent: `nbytes` payload bytes (uint8 payloads)."""
        self.stats["calls"] += 1
        self.stats["bytes_sent"] += nbytes
        self.stats["dense_bytes"] += flat.numel() * 4
        self.stats["compress_s"] += time.perf_counter() - start

    def settle(self) -> None:
        """The step in flight completed on every rank: its residual updates take effect."""
        self.drain()
        if self.feedback is not None:
            self.feedback.settle()

    def rollback(self) -> None:
        """This step's exchange did not complete on every rank: its residual updates never
        happened (a redoable compressor; see ErrorFeedback)."""
        self.drain()  # a bucket still queued would update the residuals after they were undone
        if self.feedback is not None:
            self.feedback.rollback()

    def state_dict(self) -> dict:
        """Residuals (and DGC velocities) per parameter name, as tensor copies, and the byte
        counters behind wire_ratio (so a resumed run reports the whole run's ratio)."""
        self.drain()
        return {"codec": self.codec.name, "feedback": self.feedback.state_dict() if self.feedback else None,
                "counters": counters_state(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.drain()
        if self.feedback is not None and state.get("feedback"):
            self.feedback.load_state_dict(state["feedback"])
        load_counters(self.stats, state)


def carry_residuals(cfg: CompressionConfig, saved: dict | None) -> CompressionConfig:
    """The codec that runs `cfg` and still pays out the error-feedback residuals in `saved` (a
    GradientCompressor's state_dict, e.g. from a checkpoint written under top-k).

    A dense codec (none, fp16) keeps no residuals, so loading top-k's into it would drop the
    gradient they hold: every element top-k did not send yet. Its top-k form at ratio 1.0 sends
    the same bytes (fp32 for none, fp16 for fp16) and adds the residual to the next gradient
    first (`_fold_dense`), so that gradient reaches the optimizer one step late, never not at
    all; then only fp16's rounding (or nothing) is carried. DGC velocities are not carried (the
    dense codecs keep no momentum of their own). Any other pair: `cfg` itself."""
    feedback = (saved or {}).get("feedback") or {}
    if cfg.name not in ("none", "fp16") or not feedback.get("residuals"):
        return cfg
    return dataclasses.replace(cfg, name="topk" if cfg.name == "none" else "topk_fp16", ratio=1.0,
                               error_feedback=True, momentum_correction=False, warmup_steps=0)


COUNTERS = ("calls", "bytes_sent", "dense_bytes")


def counters_state(stats: dict) -> dict:
    """The cumulative byte counters of a reducer's stats, for its checkpointed state."""
    return {k: int(stats[k]) for k in COUNTERS if k in stats}


def load_counters(stats: dict, state: dict) -> None:
    """Continue counting from a checkpoint's counters (absent in older checkpoints: start at 0)."""
    for k, v in (state.get("counters") or {}).items():
        if k in stats:
            stats[k] = int(v)


def _each_done(flat: torch.Tensor, futures: list) -> torch.Tensor:
    for fut in futures:
        fut.value()  # raises the first piece's error
    return flat


def _into(flat: torch.Tensor, result) -> torch.Tensor:
    if isinstance(result, (list, tuple)):
        result = result[0]
    if result.data_ptr() != flat.data_ptr():
        flat.copy_(result.reshape(-1))
    return flat


def _segment_views(flat: torch.Tensor, segments) -> list[tuple[str, torch.Tensor]]:
    views, at = [], 0
    for name, offset, numel in sorted(segments, key=lambda s: s[1]):
        if offset != at:
            raise ValueError(f"segments must cover the bucket without gaps or overlaps: {name!r} starts at "
                             f"{offset}, expected {at}")
        views.append((name, flat[offset : offset + numel]))
        at += numel
    if at != flat.numel():
        raise ValueError(f"segments cover {at} of the bucket's {flat.numel()} elements")
    return views
