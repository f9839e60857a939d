"""`compression=auto`: pick the codec from measured trial exchanges and backward time, per generation.

After the fleet is connected and before MacFleetDDP is built, every rank runs `resolve`:

1. `measure_backward`: forward + backward of a copy of the model on this node's local batch
   (RNG states restored, so the run is the same as without the probe): the forward and backward
   times, and that real gradient as one flat tensor on the device.
2. `probe_link`: timed all_reduces on the fleet's own group (the engine the gradients will
   cross): 1 KB ones for the latency of a collective, 4 MB ones for the bandwidth. Rank 0 takes
   the slowest rank's figures and broadcasts them, so every rank plans the trials alike.
3. `trial_exchanges`: every rank, in the same order, runs each candidate's real reducer (the
   dense reducer for none, `GradientCompressor` for fp16 and topk_fp16) on a copy of that
   gradient, split into buckets as MacFleetDDP splits it, then waits for the results and
   synchronizes the device: 1 warm-up + 2 timed exchanges, the faster of which is this rank's
   time; the slowest rank's counts (a step waits for it). Candidates go least lossy first:
   none, fp16, int8 (these three send every value), topk_fp16 at `ratio`, ratio/2, ratio/5,
   ratio/10; except that int8 goes before fp16 where fp16's bytes alone cannot fit behind
   backward (`_trial_order`).
4. Rank 0 `choose`s and broadcasts the decision, so every rank builds the same codec.

The rule (`choose`, pure arithmetic on those times): each candidate's step is forward +
backward + the part of its exchange that backward does not hide, and a top-k step counts
`steps_factor` times: `compression.topk_steps` (2 by default) at 10%, more at sparser ratios
(top-k needs more steps to the same accuracy, and the time to accuracy is what a user waits for;
1 weighs samples/s alone at 10%); the least lossy candidate within
`MARGIN` of the lowest wins. So the least lossy exchange that fits behind backward wins over
any that does not, except that int8 or fp16 left a little exposed can beat a top-k that hides.
int8 and a top-k ratio below `compression.ratio` win only on their measured time, never on an
estimate, once any trial ran (`_eligible`). Measured, not estimated from bytes: a top-k exchange has fixed costs (selection,
error feedback, the sum of the gathered payloads) that its few bytes on the wire do not show.

The trials are kept short (`TRIAL_BUDGET_S`, 2.5 s): once a candidate fits, the more lossy
ones cannot win and are not tried; a warm-up slower than `SLOW_TRIAL_S` is the measurement (no
timed runs), except a top-k codec's, whose first exchange also allocates its workspace and
residuals (one timed run follows); the timed runs stop at the budget; and a candidate whose
estimate would end past the budget is not tried, unless it is the first of its codec and its estimate is short (each codec's
fixed costs are measured at least once). A ResNet-50 gradient's trials take at most about 2 s
on two busy CPU cores. A candidate not tried keeps the byte estimate (`exchange_s`), the
fallback when a trial is impossible in the time:

    buckets x latency + wire bytes x f / bandwidth  (+ its codec's excess measured at another ratio)

with wire bytes 4 B/param (none), 2 B/param (fp16), int8's payload (1 B/param and a 4-byte
scale per 64) or the top-k payload's exact size (kept values in fp16 plus a 4-byte id per kept
unit, codecs.py); f = 2(N-1)/N for a dense all_reduce of N ranks and N-1 for the int8 and top-k
all_gathers (each rank receives every other rank's payload).
The bandwidth is derived with the same f from the probe, so for 2 ranks both are 1. The excess
is how much longer a tried ratio of the same codec took than its estimate (its fixed costs).
Every decision about which trial runs and how often is taken from figures every rank has
bit for bit (broadcast, or exchanged through an all_reduce), so every rank makes the same
collectives in the same order. One process: none, nothing measured.

The codec is then fixed for the run: error-feedback residuals are only ever produced and
consumed by that one codec, so they stay valid. A resumed run decides again. If it now picks a
dense codec while its checkpoint holds top-k residuals, it runs that codec's top-k form at 100%
(the same bytes on the wire; compressor.carry_residuals), which sends the residuals with the
next gradient instead of dropping them; a top-k ratio that changed keeps them as they are (they
are per parameter); a run that switches from a dense codec to top-k starts with zero residuals,
as nothing is owed. Such a resume is correct but not bit-exact. A new membership generation
decides again the same way (Trainer.decide_again, two steps after the regroup, every rank at the
same step boundary; at a regroup every rank takes rank 0's codec, so a departure in the middle
of a decision cannot leave two codecs in one generation), and so does a fleet step time that
stays far from what it was after the last decision (trainer._StepWatch: a slower link or a
throttling Mac).
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
TOPK_STEPS = 2.0
"""A top-k candidate at TOPK_REFERENCE_RATIO counts this many steps in `step_cost`: top-k leaves
values out each step and needs more steps to the same accuracy than a codec that sends every
value (none, fp16, int8). model=mlp on digits at 1 Gbit/s (benchmark --type convergence):
topk_fp16 at 10% ran at up to 1.6x int8's samples/s and reached 0.95 in 2 epochs in every run,
where none, fp16 and int8 took 1."""
TOPK_REFERENCE_RATIO = 0.1
TOPK_RATIO_EXPONENT = 0.5
"""A sparser ratio costs more steps still: a top-k step counts
TOPK_STEPS x (TOPK_REFERENCE_RATIO / ratio) ** TOPK_RATIO_EXPONENT, at least 1 (10%: 2, 5%: 2.8,
2%: 4.5, 1%: 6.3). Measured (model=mlp on digits, 2 nodes, `trainer.epochs=6`, epochs to 0.95):
10% 2, 5% 4, 2% 4 (0.77 after 2 epochs, 0.90 after 3); none 1. With a flat 2x, auto picked 2% on
a 16-core host's 8-core nodes at 1 Gbit/s (backward 9.8 ms), which ended 2 epochs at 0.85 where
int8 reached 0.95 in one."""
TIMED_RUNS = 2
"""Timed trial exchanges per candidate, after one warm-up."""
SLOW_TRIAL_S = 0.5
"""A candidate whose warm-up exchange took longer is measured by that one exchange."""
FAR = 2.0
"""A codec whose warm-up exchange took more than this many backwards cannot fit behind backward:
one exchange measures it, the warm-up itself for none and fp16, one timed run after the warm-up
for int8 and top-k (whose warm-up also allocates their buffers)."""
HOPELESS = 4.0
"""`none` is not tried when its byte estimate (a lower bound) is over this many backwards and
over SLOW_TRIAL_S: fp16, tried next, sends half its bytes."""
TRIAL_BUDGET_S = 2.5
"""The trials start nothing that would end past this many seconds (the slowest rank's clock).
At 1.5 s, int8's trial (0.93 s for ResNet-50 at 250 Mbit/s) left no time for the top-k ratios
below the configured one, and auto ran 10% where it had measured and picked 2% before."""


@dataclass(frozen=True)
class Link:
    """One collective's latency (s) and the bandwidth one rank sends and receives at (bytes/s)."""

    latency_s: float
    bandwidth: float


@dataclass(frozen=True)
class Candidate:
    """A codec auto may pick: its wire bytes per rank per step and its encode + decode seconds
    (the latter only for the byte estimate; 0 when unknown)."""

    name: str
    ratio: float | None
    wire_bytes: int
    codec_s: float = 0.0

    @property
    def label(self) -> str:
        return self.name if self.ratio is None else f"{self.name} at {_percent(self.ratio)}"

    @property
    def sparse(self) -> bool:
        """A top-k candidate: it leaves values out (and costs steps, see steps_factor)."""
        return self.ratio is not None

    @property
    def gathered(self) -> bool:
        """Its payloads are all_gathered (top-k, int8), not all_reduced."""
        return self.sparse or self.name == "int8"


@dataclass(frozen=True)
class Choice:
    """What `choose` decided, and the one line that says why."""

    name: str
    ratio: float | None
    reason: str
    estimates: dict
    """Seconds of each candidate's exchange, by label: measured, or estimated where not tried."""


def _percent(r: float) -> str:
    return f"{100 * r:.3g}%"


def exchange_s(c: Candidate, link: Link, world_size: int, dense_bytes: int) -> float:
    """Estimated seconds of `c`'s exchange per step from its bytes (see the module docstring)."""
    n = max(2, world_size)
    buckets = max(1, math.ceil(dense_bytes / BUCKET_BYTES))
    factor = (n - 1) if c.gathered else 2 * (n - 1) / n
    return c.codec_s + buckets * link.latency_s + c.wire_bytes * factor / max(link.bandwidth, 1.0)


def _dense_bytes(cands: list[Candidate]) -> int:
    return next((c.wire_bytes for c in cands if c.name == "none"), cands[0].wire_bytes if cands else 0)


def exchange_times(cands: list[Candidate], link: Link, world_size: int,
                   measured: dict | None = None) -> list[tuple[Candidate, float, bool]]:
    """(candidate, seconds, measured?) for each of `cands`: its measured time (`measured`, by
    label) or else its byte estimate plus its codec's smallest excess of measured over estimated
    time at the ratios that were measured (none: no codec of that name measured)."""
    measured = measured or {}
    dense = _dense_bytes(cands)
    est = {c.label: exchange_s(c, link, world_size, dense) for c in cands}
    excess: dict[str, float] = {}
    for c in cands:
        if c.label in measured:
            extra = max(0.0, measured[c.label] - est[c.label])
            excess[c.name] = min(excess.get(c.name, extra), extra)
    return [(c, measured[c.label], True) if c.label in measured else (c, est[c.label] + excess.get(c.name, 0.0), False)
            for c in cands]


def steps_factor(c: Candidate, topk_steps: float = TOPK_STEPS) -> float:
    """How many steps `c` takes for one step of a codec that sends every value (see
    TOPK_RATIO_EXPONENT; `topk_steps` is compression.topk_steps, the count at 10%): 1 for none,
    fp16 and int8."""
    if not c.sparse:
        return 1.0
    return max(1.0, topk_steps * (TOPK_REFERENCE_RATIO / c.ratio) ** TOPK_RATIO_EXPONENT)


def step_cost(c: Candidate, exchange: float, backward_s: float, forward_s: float = 0.0,
              topk_steps: float = TOPK_STEPS) -> float:
    """What `c` costs a run per step of progress: forward + backward + the part of its exchange
    that backward does not hide, times `steps_factor` (top-k's extra steps to the same
    accuracy)."""
    step = forward_s + backward_s + max(0.0, exchange - backward_s)
    return step * steps_factor(c, topk_steps)


def choose(candidates: list[Candidate], link: Link, backward_s: float, world_size: int,
           margin: float = MARGIN, measured: dict | None = None, forward_s: float = 0.0,
           topk_steps: float = TOPK_STEPS) -> Choice:
    """The least lossy of `candidates` (given least lossy first, dense "none" first) whose
    `step_cost` is within `margin` of the lowest: where an exchange fits within `backward_s`,
    the least lossy that fits; a top-k step counts `steps_factor` times. `measured` maps a
    candidate's label to its measured exchange seconds (the slowest rank's); a candidate without
    one is estimated (`exchange_times`). Once anything was measured, int8 and a top-k ratio below
    the configured one (the first top-k candidate's) are picked only on their own measured time,
    never on an estimate (see `_eligible`). One process: none."""
    if world_size <= 1:
        return Choice("none", None, "compression=auto: one process, nothing to exchange: none", {})
    times = exchange_times(candidates, link, world_size, measured)
    eligible = _eligible(times)
    cost = [(c, t, step_cost(c, t, backward_s, forward_s, topk_steps)) for c, t, _ in eligible]
    lowest = min(k for _, _, k in cost)
    pick, t, k = next((c, t, k) for c, t, k in cost if k <= lowest * (1 + margin))
    fits = [c for c, t, _ in cost if t <= backward_s]
    if t <= backward_s:
        why = "fits behind backward"
    else:
        why = ("nothing fits behind backward: " if not fits else "") + "the fastest"
        why += ("" if k == lowest else f" within {margin:.0%}")
        if any(c.sparse for c, _, _ in cost) and any(not c.sparse for c, _, _ in cost):
            why += (f", top-k steps counted {topk_steps:g}x at {_percent(TOPK_REFERENCE_RATIO)} and more below it "
                    "for their extra steps to the same accuracy, compression.topk_steps")
    if len(eligible) < len(times):
        why += "; int8 and top-k below the configured ratio only on a measured exchange"
    reason = (f"compression=auto: {_listed(times)}; backward {1e3 * backward_s:.1f} ms; "
              f"link {link.bandwidth / 1e6:.0f} MB/s, {1e3 * link.latency_s:.2f} ms: {pick.label} ({why})")
    return Choice(pick.name, pick.ratio, reason, {c.label: t for c, t, _ in times})


def _eligible(times: list[tuple[Candidate, float, bool]]) -> list[tuple[Candidate, float, bool]]:
    """The candidates `choose` may pick. A ratio below the configured one costs accuracy per step,
    so it must earn its place on a measured time: its estimate extrapolates the fixed costs
    measured at another ratio and was optimistic where it mattered (digits on a wide CNN at
    1 Gbit/s: auto took an untried 2% on an estimate of 37.5 ms against a measured 50.8 ms at
    10%, ran at the same samples/s as 10% and needed twice the epochs). With nothing measured at
    all, bytes alone decide, at every ratio."""
    if not any(m for _, _, m in times):
        return times
    top = next((c.ratio for c, _, _ in times if c.sparse), None)
    # int8 likewise: its byte estimate leaves out the codec's work, which costs it more than its
    # bytes on a CPU (a 17M-parameter bucket on one core: ~100 ms of encode and sum a step).
    return [(c, t, m) for c, t, m in times if m or not c.gathered or (c.sparse and c.ratio >= top)]


def _listed(times: list[tuple[Candidate, float, bool]]) -> str:
    """'measured exchanges none 38.1 ms, fp16 21.0 ms, topk_fp16 10% 24.5 ms, 1% 22.9 ms'; a
    time estimated, not measured, is marked ~ (all of them: 'estimated exchanges ...')."""
    every = {m for _, _, m in times}
    items, last = [], None
    for c, t, m in times:
        name = c.name if c.name != last else ""
        what = " ".join(s for s in (name, _percent(c.ratio) if c.sparse else "") if s)
        mark = "~" if every == {True, False} and not m else ""
        items.append(f"{what} {mark}{1e3 * t:.1f} ms")
        last = c.name
    head = ("measured exchanges" if every == {True} else "estimated exchanges" if every == {False}
            else "exchanges (~ estimated, not tried)")
    return f"{head} {', '.join(items)}"


def candidates(numels: list[int], cfg: CompressionConfig, codec_s: dict | None = None) -> list[Candidate]:
    """none, fp16, int8, then topk_fp16 at cfg.ratio x RATIO_STEPS, with their wire bytes for a model
    whose parameters have `numels` elements; `codec_s` maps a codec name to its encode + decode
    seconds for the byte estimate (top-k's is taken for every ratio), 0 if absent."""
    from macfleet.compression.codecs import TopKCodec

    from macfleet.compression.codecs import Int8Codec

    codec_s = codec_s or {}
    n = sum(numels)
    int8 = Int8Codec(cfg.block_size).plan(tuple(numels), 1.0, torch.device("cpu"), torch.int8).nbytes
    out = [Candidate("none", None, 4 * n), Candidate("fp16", None, 2 * n, codec_s.get("fp16", 0.0)),
           Candidate("int8", None, int8, codec_s.get("int8", 0.0))]
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
                     repeats: int = 3) -> tuple[float, torch.Tensor, list[tuple[str, int, int]], float]:
    """(backward seconds, the gradient as one flat tensor on `device`, its (parameter name,
    offset, numel) segments, forward seconds) of a copy of `model` on `batch`; RNG states and
    the model are left as they were."""
    from macfleet import checkpoint as ckpt
    from macfleet.device import synchronize

    rng = ckpt.rng_state()
    try:
        work = copy.deepcopy(model).to(device).train()
        x, y = (t.to(device) for t in batch)
        times, forwards = [], []
        for i in range(repeats + 1):  # the first pass warms allocators and kernels up
            work.zero_grad(set_to_none=True)
            synchronize(device)
            t_fwd = time.perf_counter()
            out = loss(work(x), y)
            synchronize(device)
            t0 = time.perf_counter()
            out.backward()
            synchronize(device)
            if i:
                times.append(time.perf_counter() - t0)
                forwards.append(t0 - t_fwd)
        params = [(n, p) for n, p in work.named_parameters() if p.requires_grad]
        flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device)
                          for _, p in params]).detach()
        segments, off = [], 0
        for name, p in params:
            segments.append((name, off, p.numel()))
            off += p.numel()
    finally:
        ckpt.set_rng_state(rng)
    # The fastest pass: what the model costs here, not what another process on the same cores took.
    return min(times), flat, segments, min(forwards)


def buckets(segments: list[tuple[str, int, int]], cap_bytes: int = BUCKET_BYTES,
            element_size: int = 4) -> list[tuple[int, int, list[tuple[str, int, int]]]]:
    """(start, end, segments from 0) of each bucket of a flat gradient laid out as `segments`,
    grouped as MacFleetDDP's flat path groups parameters: reverse order, at most `cap_bytes`."""
    out: list[list[tuple[str, int, int]]] = []
    size = cap_bytes
    for seg in reversed(segments):
        nbytes = seg[2] * element_size
        if size + nbytes > cap_bytes and (not out or out[-1]):
            out.append([])
            size = 0
        out[-1].append(seg)
        size += nbytes
    result = []
    for group in out:
        start = min(off for _, off, _ in group)
        end = max(off + k for _, off, k in group)
        result.append((start, end, [(name, off - start, k) for name, off, k in sorted(group, key=lambda s: s[1])]))
    return result


def _slowest(group, rank: int, world_size: int, values: list[float]) -> list[float]:
    """Each of `values`' maximum over the ranks, the same bits on every rank (one all_reduce:
    each rank fills its own row, the sum of zeros and one value is exact)."""
    rows = torch.zeros(world_size, len(values), dtype=torch.float32)
    rows[rank] = torch.tensor(values, dtype=torch.float32)
    group.all_reduce(rows, "sum")
    return [float(v) for v in rows.max(dim=0).values]


def _trial_cfg(cfg: CompressionConfig, c: Candidate) -> CompressionConfig:
    # The codec as the run would use it from its first step (no sparsity warm-up); DGC's momentum
    # correction only exists for top-k.
    return dataclasses.replace(cfg, name=c.name, ratio=c.ratio if c.ratio is not None else cfg.ratio,
                               warmup_steps=0, momentum_correction=cfg.momentum_correction and c.sparse)


def trial_exchanges(group, rank: int, grad: torch.Tensor, segments: list[tuple[str, int, int]],
                    cfg: CompressionConfig, cands: list[Candidate], link: Link, backward_s: float,
                    device: torch.device, budget_s: float = TRIAL_BUDGET_S,
                    clock: Callable[[], float] = time.perf_counter, forward_s: float = 0.0) -> tuple[dict, int]:
    """({label: seconds}, how many of `cands` count) from real exchanges of `grad` on `group`,
    the slowest rank's time per candidate (see the module docstring). Every rank must call it
    with the same `cands`, `link`, `backward_s` and `budget_s`: it makes collectives, and which
    and how many follow from those and from figures exchanged on `group`. A candidate not tried
    (its estimate would end past the budget) is absent from the dict; after one that fits behind
    backward the rest are not tried nor counted."""
    from macfleet.ddp import make_reducer
    from macfleet.device import synchronize

    n = int(group.world_size)
    parts = buckets(segments, element_size=grad.element_size())

    def once(reducer, step: int) -> float:
        bufs = [grad[start:end].clone() for start, end, _ in parts]
        synchronize(device)
        t0 = clock()
        futures = [reducer.reduce(buf, segs, step) for buf, (_, _, segs) in zip(bufs, parts)]
        for fut in futures:
            fut.wait()
        synchronize(device)
        return clock() - t0

    measured: dict[str, float] = {}
    start, elapsed = clock(), 0.0  # elapsed: the slowest rank's, as last exchanged (equal on every rank)
    done: set[int] = set()  # candidates tried or skipped, by index in `cands`
    fitted: int | None = None  # the least lossy tried so far that fits behind backward

    def settled() -> bool:
        # Everything less lossy than the one that fits was tried or ruled out: the rest cannot win.
        return fitted is not None and all(k in done for k in range(fitted))

    for i in _trial_order(cands, link, n, backward_s):
        if fitted is not None and i > fitted:
            continue
        done.add(i)
        c = cands[i]
        guess = next(t for d, t, _ in exchange_times(cands, link, n, measured) if d is c)
        # A codec not measured at any ratio yet is tried past the budget if its estimate is short:
        # its estimate misses its fixed costs, so only a trial can show them.
        fresh = not any(d.name == c.name and d.label in measured for d in cands)
        if elapsed + guess > budget_s and not (fresh and guess <= SLOW_TRIAL_S):
            continue
        best = min(step_cost(d, measured[d.label], backward_s, forward_s, cfg.topk_steps)
                   for d in cands if d.label in measured) if measured else None
        if best is not None and guess > backward_s \
                and step_cost(c, guess, backward_s, forward_s, cfg.topk_steps) > best * (1 + MARGIN):
            # It cannot fit, and even at its estimate it cannot come within the margin of what
            # was measured: `choose` could not pick it (a top-k ratio below a slow measured one).
            continue
        if c.name == "none" and guess > max(SLOW_TRIAL_S, HOPELESS * backward_s):
            # Its bytes alone take far longer than backward, and fp16 (tried next) sends half of
            # them: it keeps its estimate (model=mlp at 1 Gbit/s: 0.6 s of a 3.6 s probe saved).
            continue
        reducer = make_reducer(_trial_cfg(cfg, c), group)
        warm, elapsed = _slowest(group, rank, n, [once(reducer, 0), clock() - start])
        far = warm > FAR * backward_s  # cannot fit: one exchange is enough (int8 and top-k: one after the warm-up)
        runs = 0 if warm > SLOW_TRIAL_S or far else \
            min(TIMED_RUNS, max(0, int((budget_s - elapsed) / max(warm, 1e-6))))
        if c.gathered and not runs:
            # A top-k (or int8) codec's first exchange also allocates its workspace and error-feedback
            # residuals (68 MB each for a 17M-parameter model). Taken as the measurement, that
            # warm-up read 704 ms where training then ran the codec at 427 ms a step, compute
            # included (model=mlp at 1 Gbit on 2 cores); the timed run read 415 ms.
            runs = 1
        took = warm
        if runs:
            took, elapsed = _slowest(group, rank, n, [min(once(reducer, s) for s in range(1, runs + 1)),
                                                       clock() - start])
        measured[c.label] = took
        del reducer
        if took <= backward_s and (fitted is None or i < fitted):
            fitted = i
        if settled():
            return measured, fitted + 1
    if fitted is not None:
        return measured, fitted + 1
    return measured, len(cands)


def _trial_order(cands: list[Candidate], link: Link, world_size: int, backward_s: float) -> list[int]:
    """Indices of `cands` in the order their trials run: least lossy first, except that int8 goes
    before fp16 when fp16's byte estimate (a lower bound) already cannot fit behind backward. int8
    sends half fp16's bytes, and once it is measured, fp16 is tried only if it could still come
    within the margin of it (model=mlp on one core at 1 Gbit/s: fp16's trial took 0.4 s of auto's
    2.2 s probe, and int8 won)."""
    order = list(range(len(cands)))
    names = [c.name for c in cands]
    if "fp16" in names and "int8" in names:
        f, q = names.index("fp16"), names.index("int8")
        times = {c.label: t for c, t, _ in exchange_times(cands, link, world_size)}
        if f < q and times[cands[f].label] > backward_s:
            order[f], order[q] = order[q], order[f]
    return order


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
        backward_s, grad, segments, forward_s = measure_backward(model, loss, batch, device)
        link = probe_link(world.group, world.world_size)
        every = world.gather_object({"latency_s": link.latency_s, "bandwidth": link.bandwidth,
                                     "backward_s": backward_s, "forward_s": forward_s})
        worst = None
        if world.rank == 0:
            # The slowest figures count: a step waits for the slowest rank and the slowest link.
            worst = {"latency_s": max(r["latency_s"] for r in every), "bandwidth": min(r["bandwidth"] for r in every),
                     "backward_s": max(r["backward_s"] for r in every),
                     "forward_s": max(r["forward_s"] for r in every)}
        worst = world.broadcast_object(worst)  # every rank plans the same trials from the same figures
        slowest_link = Link(worst["latency_s"], worst["bandwidth"])
        cands = candidates([k for _, _, k in segments], cfg)
        measured, counted = trial_exchanges(world.group, world.rank, grad, segments, cfg, cands, slowest_link,
                                            worst["backward_s"], device, forward_s=worst["forward_s"])
        del grad
        decided = None
        if world.rank == 0:
            choice = choose(cands[:counted], slowest_link, worst["backward_s"], world.world_size, measured=measured,
                            forward_s=worst["forward_s"], topk_steps=cfg.topk_steps)
            decided = {"name": choice.name, "ratio": choice.ratio, "reason": choice.reason}
        decided = world.broadcast_object(decided)
        choice = Choice(decided["name"], decided["ratio"], decided["reason"], {})
    log.info("%s", choice.reason)
    chosen = dataclasses.replace(cfg, name=choice.name, ratio=choice.ratio if choice.ratio is not None else cfg.ratio)
    return chosen, {"compression_auto_reason": choice.reason}


__all__ = ["Link", "Candidate", "Choice", "choose", "candidates", "exchange_s", "exchange_times", "steps_factor",
           "step_cost", "buckets", "probe_link", "measure_backward", "trial_exchanges", "resolve"]
