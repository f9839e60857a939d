"""Top-k selection: which units (64-element blocks, or single elements) of a gradient to send.

Three granularities (`CompressionConfig.granularity`):
- block (default): score each `block_size`-element block by its L2 norm, keep the best blocks.
  Norms of 25.6M elements cost ~5 ms on one CPU thread and the kept values are one contiguous
  index_select, so the whole selection stays ~10 ms where element-wise compaction alone is ~50 ms.
- element: score each element by |x|.
- exact: torch.topk over |x| (slow on CPU: ~0.5-0.9 s per 25.6M elements; the reference).

Block and element modes estimate the k-th largest score from a strided sample of the scores
(`sample_fraction`), mask, and correct: if the mask keeps more than 5% too many units they are
trimmed to exactly k with topk over the candidates; if too few, a lower sampled threshold is
tried, then exact topk. So the kept fraction is within 5% of the target unless the rest of the
tensor is exactly zero (zeros are never worth sending).

Determinism: the sample's start comes from a hash of (step, parameter name), never from a
global RNG, and everything is per parameter segment, so the result does not depend on how
parameters are grouped into buckets (PyTorch rebuilds its buckets after the first step, and a
resumed process starts with the initial layout again).
"""

from __future__ import annotations

import zlib

import torch

TOLERANCE = 0.05
"""Relative deviation from k accepted from the sampled threshold before correcting."""
MIN_SAMPLE = 256
"""Below this many sampled scores the threshold estimate is too noisy: use exact topk."""


def keep_count(units: int, ratio: float) -> int:
    """How many of `units` to keep at `ratio`: at least one, so no parameter starves forever."""
    if units == 0:
        return 0
    return min(units, max(1, int(round(ratio * units))))


def sample_seed(step: int, name: str) -> int:
    """A deterministic per-(step, parameter) seed; no global RNG is touched."""
    return zlib.crc32(f"{step}:{name}".encode())


def _exact(score: torch.Tensor, k: int) -> torch.Tensor:
    idx = torch.topk(score, k, sorted=False).indices
    return torch.sort(idx).values


def _mask(score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    if float(threshold) <= 0.0:
        # ties at zero would select every zero; zeros carry nothing, so keep only non-zeros.
        return torch.nonzero(score > 0).squeeze(1)
    return torch.nonzero(score >= threshold).squeeze(1)


def top_units(score: torch.Tensor, k: int, sample_fraction: float, seed: int) -> torch.Tensor:
    """Sorted int64 indices of (about) the k largest entries of the 1-D non-negative `score`."""
    n = score.numel()
    if k >= n:
        return torch.arange(n, device=score.device)
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=score.device)
    stride = max(1, int(round(1.0 / sample_fraction)))
    if n // stride < MIN_SAMPLE:
        return _exact(score, k)
    sample = score[seed % stride :: stride]
    s = sample.numel()
    lo, hi = (1.0 - TOLERANCE) * k, (1.0 + TOLERANCE) * k
    # rank in the sample that corresponds to rank k in the whole tensor; the second try
    # reaches lower so that it over-selects, and the trim below brings it back to k.
    for rank in (k * s / n, 1.3 * k * s / n + 3):
        r = min(s, max(1, int(round(rank))))
        threshold = torch.kthvalue(sample, s - r + 1).values
        idx = _mask(score, threshold)
        count = idx.numel()
        if count > hi:
            keep = torch.topk(score[idx], k, sorted=False).indices
            return torch.sort(idx[keep]).values
        if count >= lo or float(threshold) <= 0.0:
            return idx
    return _exact(score, k)


def block_scores(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """L2 norm of each block of the 1-D `x`; the last (partial) block gets its own norm."""
    n = x.numel()
    full = n // block_size
    norms = torch.linalg.vector_norm(x[: full * block_size].view(full, block_size), dim=1)
    if n % block_size:
        tail = torch.linalg.vector_norm(x[full * block_size :]).reshape(1)
        norms = torch.cat([norms, tail])
    return norms
