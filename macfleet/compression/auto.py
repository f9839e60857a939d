"""`compression=auto`: pick the codec from the measured link and backward time, once per run.

After the fleet is connected and before MacFleetDDP is built, every rank runs `resolve`:

1. `probe_link`: timed all_reduces on the fleet's own group (the engine the gradients will
   cross): 1 KB ones for the latency of a collective, 4 MB ones for the bandwidth.
2. `measure_backward`: forward + backward of a copy of the model on this node's local batch
   (RNG states restored, so the run is the same as without the probe), and the time the fp16
   and top-k codecs take to encode that gradient here.
3. Rank 0 gathers every rank's figures (the slowest link and backward count) and `choose`s; the
   decision is broadcast, so every rank builds the same codec.

`choose` is pure arithmetic on those figures. Per candidate (least lossy first: none, fp16,
topk_fp16 at `ratio`, ratio/2, ratio/5, ratio/10) the exchange is estimated as

    codec time + buckets x latency + wire bytes x f / bandwidth

with wire bytes 4 B/param (none), 2 B/param (fp16) or the top-k payload's exact size (kept
values in fp16 plus a 4-byte id per kept unit, codecs.py); f = 2(N-1)/N for a dense all_reduce
of N ranks and N-1 for the top-k all_gather (each rank receives every other rank's payload).
The bandwidth is derived with the same f from the probe, so for 2 ranks both are 1. The first
candidate whose exchange fits within backward (where it can hide) wins; when none fits, the
least lossy within `MARGIN` of the fastest.

The codec is then fixed for the run: error-feedback residuals are only ever produced and
consumed by that one codec, so they stay valid. A resumed run decides again; a top-k residual
in its checkpoint is dropped if it now picks a dense codec, and a run that switches to top-k
starts with zero residuals (neither is an error, but such a resume is not bit-exact). Deciding
again at each membership generation, or when the link or the step time changes a lot, is future
work (issue 11: it needs residuals carried across a codec change).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from macfleet.config import CompressionConfig

log = logging.getLogger("macfleet")

SMALL_BYTES = 1024
LARGE_BYTES = 4 << 20
SMALL_REPEATS = 5
LARGE_REPEATS = 3
BUCKET_BYTES = 25 << 20
"""MacFleetDDP's bucket cap: one collective (and one latency) per bucket."""
RATIO_STEPS = (1.0, 0.5, 0.2, 0.1)
"""Top-k ratios auto may pick, as fractions of compression.ratio."""
MARGIN = 0.1
"""When nothing fits behind backward, a less lossy codec within 10% of the fastest wins."""


@dataclass(frozen=True)
class Link:
    """One collective's latency (s) and the bandwidth one rank sends and receives at (bytes/s)."""

    latency_s: float
    bandwidth: float


@dataclass(frozen=True)
class Candidate:
    """A codec auto may pick: its wire bytes per rank per step and its encode + decode seconds."""

    name: str
    ratio: float | None
    wire_bytes: int
    codec_s: float = 0.0

    @property
    def label(self) -> str:
        return self.name if self.ratio is None else f"{self.name} at {_percent(self.ratio)}"

    @property
    def sparse(self) -> bool:
        return self.ratio is not None


@dataclass(frozen=True)
class Choice:
    """What `choose` decided, and the one line that says why."""

    name: str
    ratio: float | None
    reason: str
    estimates: dict


def _percent(r: float) -> str:
    return f"{100 * r:.3g}%"


def exchange_s(c: Candidate, link: Link, world_size: int, dense_bytes: int) -> float:
    """Estimated seconds of `c`'s exchange per step (see the module docstring)."""
    n = max(2, world_size)
    buckets = max(1, math.ceil(dense_bytes / BUCKET_BYTES))
    factor = (n - 1) if c.sparse else 2 * (n - 1) / n
    return c.codec_s + buckets * link.latency_s + c.wire_bytes * factor / max(link.bandwidth, 1.0)


def choose(candidates: list[Candidate], link: Link, backward_s: float, world_size: int,
           margin: float = MARGIN) -> Choice:
    """The least lossy of `candidates` (given least lossy first, dense "none" first) whose
    exchange fits within `backward_s`; if none fits, the least lossy within `margin` of the
    fastest. One process: none."""
    if world_size <= 1:
        return Choice("none", None, "compression=auto: one process, nothing to exchange: none", {})
    dense_bytes = next((c.wire_bytes for c in candidates if c.name == "none"), candidates[0].wire_bytes)
    est = [(c, exchange_s(c, link, world_size, dense_bytes)) for c in candidates]
    fits = [(c, t) for c, t in est if t <= backward_s]
    if fits:
        pick, t = fits[0]
        why = "fits behind backward"
    else:
        fastest = min(t for _, t in est)
        pick, t = next((c, t) for c, t in est if t <= fastest * (1 + margin))
        why = "nothing fits behind backward: the fastest" + (
            "" if t == fastest else f" within {margin:.0%}")
    dense_t = next((t for c, t in est if c.name == "none"), None)
    shown = f"dense would take {1e3 * dense_t:.1f} ms: " if dense_t is not None else ""
    took = "" if pick.name == "none" else f"{1e3 * t:.1f} ms, "
    reason = (f"compression=auto: link {link.bandwidth / 1e6:.0f} MB/s, {1e3 * link.latency_s:.2f} ms; "
              f"backward {1e3 * backward_s:.1f} ms; {shown}{pick.label} ({took}{why})")
    return Choice(pick.name, pick.ratio, reason, {c.label: t for c, t in est})


def candidates(numels: list[int], cfg: CompressionConfig, codec_s: dict | None = None) -> list[Candidate]:
    """none, fp16, then topk_fp16 at cfg.ratio x RATIO_STEPS, with their wire bytes for a model
    whose parameters have `numels` elements; `codec_s` maps a codec name to its measured encode
    + decode seconds (top-k's is taken for every ratio: it hardly depends on the ratio)."""
    from macfleet.compression.codecs import TopKCodec

    codec_s = codec_s or {}
    n = sum(numels)
    out = [Candidate("none", None, 4 * n), Candidate("fp16", None, 2 * n, codec_s.get("fp16", 0.0))]
    codec = TopKCodec(cfg.ratio, cfg.granularity, cfg.block_size, torch.float16)
    for step in RATIO_STEPS:
        r = cfg.ratio * step
        # One bucket: the payload's exact size (its header is 64 bytes per bucket, negligible).
        nbytes = codec.plan(tuple(numels), r, torch.device("cpu"), torch.float16).nbytes
        out.append(Candidate("topk_fp16", r, nbytes, codec_s.get("topk_fp16", 0.0)))
    return out


# -- measurements ------------------------------------------------------------------------------
def _timed(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def probe_link(group, world_size: int) -> Link:
    """This rank's view of the link, from timed all_reduces on `group` (every rank must call it:
    they are collectives, the same number on each)."""
    small = torch.zeros(SMALL_BYTES // 4)
    large = torch.zeros(LARGE_BYTES // 4)
    group.all_reduce(small)  # the first collective may set up buffers
    t_small = _timed(lambda: group.all_reduce(small), SMALL_REPEATS)
    group.all_reduce(large)
    t_large = _timed(lambda: group.all_reduce(large), LARGE_REPEATS)
    n = max(2, world_size)
    moved = LARGE_BYTES * 2 * (n - 1) / n
    return Link(latency_s=t_small, bandwidth=moved / max(t_large - t_small, 1e-6))


def measure_backward(model: torch.nn.Module, loss: Callable, batch: tuple, device: torch.device,
                     cfg: CompressionConfig, repeats: int = 3) -> tuple[float, dict, list[int]]:
    """(backward seconds, {codec: encode + decode seconds}, parameter numels) of a copy of
    `model` on `batch`; RNG states and the model are left as they were."""
    from macfleet import checkpoint as ckpt
    from macfleet.compression.compressor import GradientCompressor
    from macfleet.device import synchronize

    rng = ckpt.rng_state()
    try:
        work = copy.deepcopy(model).to(device).train()
        x, y = (t.to(device) for t in batch)
        times = []
        for i in range(repeats + 1):  # the first pass warms allocators and kernels up
            work.zero_grad(set_to_none=True)
            out = loss(work(x), y)
            synchronize(device)
            t0 = time.perf_counter()
            out.backward()
            synchronize(device)
            if i:
                times.append(time.perf_counter() - t0)
        params = [(n, p) for n, p in work.named_parameters() if p.requires_grad]
        numels = [p.numel() for _, p in params]
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device)
                 for _, p in params]
        flat = torch.cat(grads).detach()
        segments, off = [], 0
        for (name, _), k in zip(params, numels):
            segments.append((name, off, k))
            off += k
        codec_s = {}
        for name in ("fp16", "topk_fp16"):
            comp = GradientCompressor(dataclasses.replace(cfg, name=name, warmup_steps=0, momentum_correction=False))

            def once(comp=comp):
                comp.reduce(flat.clone(), segments, 0).wait()
                synchronize(device)
            once()
            codec_s[name] = _timed(once, 2)
    finally:
        ckpt.set_rng_state(rng)
    # The fastest pass: what the model costs here, not what another process on the same cores took.
    return min(times), codec_s, numels


def resolve(cfg: CompressionConfig, world, model: torch.nn.Module, loss: Callable, dataset, local_batch: int,
            device: torch.device) -> tuple[CompressionConfig, dict]:
    """The concrete CompressionConfig for `cfg` (name "auto") in `world`, and the metrics that
    record why ({"compression_auto_reason": line}). Every rank calls it (collectives); every
    rank gets the same answer. Logs the reasoning in one line."""
    from macfleet.data.loader import fetch

    if world.world_size <= 1:
        choice = choose([], Link(0.0, 1.0), 0.0, 1)
    else:
        batch = fetch(dataset, list(range(min(len(dataset), max(1, local_batch)))))
        backward_s, codec_s, numels = measure_backward(model, loss, batch, device, cfg)
        link = probe_link(world.group, world.world_size)
        mine = {"latency_s": link.latency_s, "bandwidth": link.bandwidth, "backward_s": backward_s,
                "fp16": codec_s["fp16"], "topk_fp16": codec_s["topk_fp16"]}
        every = world.gather_object(mine)
        decided = None
        if world.rank == 0:
            # The slowest figures count: a step waits for the slowest rank and the slowest link.
            worst = {k: max(r[k] for r in every) for k in ("latency_s", "backward_s", "fp16", "topk_fp16")}
            slowest_link = Link(worst["latency_s"], min(r["bandwidth"] for r in every))
            choice = choose(candidates(numels, cfg, worst), slowest_link, worst["backward_s"], world.world_size)
            decided = {"name": choice.name, "ratio": choice.ratio, "reason": choice.reason}
        decided = world.broadcast_object(decided)
        choice = Choice(decided["name"], decided["ratio"], decided["reason"], {})
    log.info("%s", choice.reason)
    chosen = dataclasses.replace(cfg, name=choice.name, ratio=choice.ratio if choice.ratio is not None else cfg.ratio)
    return chosen, {"compression_auto_reason": choice.reason}


__all__ = ["Link", "Candidate", "Choice", "choose", "candidates", "exchange_s", "probe_link", "measure_backward",
           "resolve"]
