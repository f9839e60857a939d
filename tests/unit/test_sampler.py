import pytest
import torch

from macfleet.errors import ConfigError
from macfleet.sampler import WeightedBatchSampler, shard_range, split_counts


@pytest.mark.parametrize("total,weights", [(64, [0.62, 0.38]), (64, [1, 1, 1]), (7, [0.5, 0.3, 0.2]), (100, [3, 1]), (3, [0.98, 0.01, 0.01])])
def test_split_counts_sum_and_proportion(total, weights):
    counts = split_counts(total, weights)
    assert sum(counts) == total
    assert all(c >= 1 for c in counts)
    s = sum(weights)
    for c, w in zip(counts, weights):
        assert abs(c - total * w / s) <= max(1.0, len(weights) - 1)


def test_split_counts_rejects_tiny_batch():
    with pytest.raises(ConfigError, match="batch_size"):
        split_counts(2, [1, 1, 1])


@pytest.mark.parametrize("weights", [[1.0], [0.62, 0.38], [0.5, 0.3, 0.2], [1, 1, 1, 1]])
def test_union_of_shards_is_the_global_batch(weights):
    n, b = 203, 32
    single = WeightedBatchSampler(n, b, [1.0], rank=0, seed=7, epoch=3)
    parts = [WeightedBatchSampler(n, b, weights, rank=r, seed=7, epoch=3) for r in range(len(weights))]
    steps = [list(p) for p in parts]
    for s, batch in enumerate(single):
        union = [i for r in range(len(weights)) for i in steps[r][s]]
        assert union == batch  # same samples, same order: rank 0's slice first
    assert abs(sum(p.share for p in parts) - 1.0) < 1e-12


def test_resume_mid_epoch_continues_the_same_order():
    full = list(WeightedBatchSampler(100, 10, [1.0], seed=1, epoch=2))
    part = WeightedBatchSampler(100, 10, [1.0], seed=1)
    part.set_epoch(2, start_step=4)
    assert list(part) == full[4:]
    other = WeightedBatchSampler(100, 10, [1.0], seed=1, epoch=3)
    assert list(other) != full  # epochs reshuffle


def test_shard_range_covers_evaluation_set():
    w = [0.62, 0.38]
    ranges = [shard_range(101, w, r) for r in range(2)]
    assert ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] == 101
    assert shard_range(1, [1, 1, 1], 2) == (1, 1)
