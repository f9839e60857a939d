"""Weighted split of each global batch across nodes.

At step s of epoch e, the global batch is `perm_e[s*B:(s+1)*B]`, where `perm_e` is a permutation
of the training set drawn from (seed, epoch). Node i takes the contiguous slice of b_i samples
that starts after the b_j of the ranks before it. The union over nodes is exactly the batch one
process would take at that step, which is what makes N nodes compute what one process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from macfleet.errors import ConfigError


def split_counts(total: int, weights: list[float]) -> list[int]:
    """Split `total` items by `weights` (largest remainder; ties go to the lower rank).

    Every node gets at least one item, so no node runs an empty forward.
    """
    n = len(weights)
    if n == 0:
        raise ConfigError("no weights given")
    if total < n:
        raise ConfigError(f"a batch of {total} cannot be split across {n} nodes; raise trainer.batch_size to >= {n}")
    s = float(sum(weights))
    if s <= 0:
        raise ConfigError(f"node weights {weights} must be positive")
    exact = [total * w / s for w in weights]
    counts = [max(1, int(x)) for x in exact]
    # Hand out (or take back) the difference by largest (smallest) fractional part.
    order = sorted(range(n), key=lambda i: (-(exact[i] - int(exact[i])), i))
    diff = total - sum(counts)
    k = 0
    while diff > 0:
        counts[order[k % n]] += 1
        diff -= 1
        k += 1
    k = n - 1
    while diff < 0:
        i = order[k % n]
        if counts[i] > 1:
            counts[i] -= 1
            diff += 1
        k -= 1
    return counts


@dataclass
class WeightedBatchSampler:
    """Yields this rank's index lists for one epoch; resumable at any step."""

    dataset_size: int
    global_batch: int
    weights: list[float]
    rank: int = 0
    seed: int = 0
    epoch: int = 0
    start_step: int = 0

    def __post_init__(self) -> None:
        self.counts = split_counts(self.global_batch, list(self.weights))
        self.offset = sum(self.counts[: self.rank])
        if self.dataset_size < self.global_batch:
            raise ConfigError(
                f"trainer.batch_size={self.global_batch} is larger than the training set ({self.dataset_size}); lower it"
            )

    @property
    def local_batch(self) -> int:
        return self.counts[self.rank]

    @property
    def share(self) -> float:
        """This rank's fraction of the global batch: the factor its gradient is scaled by."""
        return self.counts[self.rank] / self.global_batch

    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch  # the last partial batch is dropped

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.start_step = start_step

    def permutation(self) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.dataset_size, generator=g)

    def __len__(self) -> int:
        return self.steps_per_epoch() - self.start_step

    def __iter__(self):
        perm = self.permutation()
        b = self.global_batch
        lo, hi = self.offset, self.offset + self.local_batch
        for step in range(self.start_step, self.steps_per_epoch()):
            yield perm[step * b + lo : step * b + hi].tolist()


def shard_range(n: int, weights: list[float], rank: int) -> tuple[int, int]:
    """Contiguous [start, end) of n evaluation items for `rank`, split by weights (may be empty)."""
    if n <= 0:
        return 0, 0
    counts = split_counts(n, weights) if n >= len(weights) else [1 if i < n else 0 for i in range(len(weights))]
    start = sum(counts[:rank])
    return start, start + counts[rank]
