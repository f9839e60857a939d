"""compression=auto's decision (macfleet/compression/auto.py) on numbers, its candidates' wire
bytes, the config group, and a one-process run through the Python API."""

from __future__ import annotations

import pytest
import torch

from macfleet.compression.auto import Candidate, Link, candidates, choose, exchange_s
from macfleet.config import CompressionConfig
from macfleet.errors import ConfigError

DIGITS_CNN = [288, 32, 9216, 32, 18432, 64, 65536, 64, 640, 10] + [32, 32, 64, 64]  # ~0.15M, like conf's
GIGABIT, MBIT100, LOOPBACK = 125e6, 12.5e6, 1.5e9


def _cands(numels, ratio=0.1):
    return candidates(numels, CompressionConfig(name="auto", ratio=ratio))


def test_candidates_are_least_lossy_first_with_their_wire_bytes():
    n = 25_600_000
    cs = _cands([n])
    assert [c.label for c in cs] == ["none", "fp16", "topk_fp16 at 10%", "topk_fp16 at 5%", "topk_fp16 at 2%",
                                     "topk_fp16 at 1%"]
    assert cs[0].wire_bytes == 4 * n and cs[1].wire_bytes == 2 * n
    # Blocks of 64: a 4-byte id and 64 fp16 values per kept block, about ratio x 2.06 B/param.
    for c in cs[2:]:
        assert c.wire_bytes == pytest.approx(c.ratio * n * (2 + 4 / 64), rel=0.01)
    element = candidates([n], CompressionConfig(name="auto", ratio=0.1, granularity="element"))
    assert element[2].wire_bytes == pytest.approx(0.1 * n * 6, rel=0.01)  # 2 B value + 4 B id per element


def test_fast_link_keeps_dense():
    got = choose(_cands(DIGITS_CNN), Link(0.0005, LOOPBACK), backward_s=0.010, world_size=2)
    assert (got.name, got.ratio) == ("none", None)
    assert got.reason.startswith("compression=auto: link 1500 MB/s, 0.50 ms; backward 10.0 ms; dense would take")
    assert got.reason.endswith(": none (fits behind backward)")


def test_slow_link_compresses_as_little_as_fits():
    # ResNet-50 at 1 Gbit/s with 300 ms of backward: dense 820 ms, fp16 410 ms, top-k 10% 43 ms.
    cs = _cands([25_600_000])
    got = choose(cs, Link(0.0003, GIGABIT), backward_s=0.300, world_size=2)
    assert (got.name, got.ratio) == ("topk_fp16", 0.1)
    assert got.reason.endswith("dense would take 820.4 ms: topk_fp16 at 10% (43.4 ms, fits behind backward)")
    # A longer backward hides fp16, then dense.
    assert choose(cs, Link(0.0003, GIGABIT), backward_s=0.5, world_size=2).name == "fp16"
    assert choose(cs, Link(0.0003, GIGABIT), backward_s=1.0, world_size=2).name == "none"
    # A very short one needs a smaller ratio.
    got = choose(cs, Link(0.0003, GIGABIT), backward_s=0.025, world_size=2)
    assert (got.name, got.ratio) == ("topk_fp16", pytest.approx(0.05))


def test_digits_cnn_on_100mbit_compresses():
    got = choose(_cands(DIGITS_CNN), Link(0.0005, MBIT100), backward_s=0.010, world_size=2)
    assert got.name == "topk_fp16", got.reason


def test_nothing_fits_takes_the_least_lossy_within_the_margin_of_the_fastest():
    link = Link(0.010, MBIT100)  # latency dominates: 10 ms per collective
    cs = [Candidate("none", None, 4_000), Candidate("fp16", None, 2_000),
          Candidate("topk_fp16", 0.1, 400, codec_s=0.001)]
    got = choose(cs, link, backward_s=0.001, world_size=2)
    # none 10.32 ms, fp16 10.16 ms, top-k 11.03 ms: nothing fits in 1 ms; fp16 is fastest and none within 10%.
    assert got.name == "none" and "nothing fits behind backward: the fastest within 10%" in got.reason
    assert choose(cs, link, backward_s=0.001, world_size=2, margin=0.0).name == "fp16"
    # A codec too slow to encode never wins on its small payload alone.
    slow = cs[:2] + [Candidate("topk_fp16", 0.1, 400, codec_s=1.0)]
    assert choose(slow, Link(0.0, MBIT100), backward_s=0.0001, world_size=2).name == "fp16"


def test_more_ranks_cost_more_for_the_gather_than_for_the_all_reduce():
    link = Link(0.0, 1e6)
    dense, sparse = Candidate("none", None, 1_000_000), Candidate("topk_fp16", 0.1, 100_000)
    assert exchange_s(dense, link, 2, 1_000_000) == pytest.approx(1.0)
    assert exchange_s(sparse, link, 2, 1_000_000) == pytest.approx(0.1)
    assert exchange_s(dense, link, 4, 1_000_000) == pytest.approx(1.5)  # 2(N-1)/N of the bytes
    assert exchange_s(sparse, link, 4, 1_000_000) == pytest.approx(0.3)  # every other rank's payload
    # One latency per 25 MB bucket.
    assert exchange_s(Candidate("none", None, 100 << 20), Link(0.01, 1e30), 2, 100 << 20) == pytest.approx(0.04)


def test_one_process_is_none():
    got = choose([], Link(0.0, 1.0), 0.0, world_size=1)
    assert got.name == "none" and "one process" in got.reason


def test_auto_config_group_and_the_codec_it_is_not(compose_cfg):
    cfg = compose_cfg(["compression=auto"])
    assert cfg.compression.name == "auto" and cfg.trainer.compression == "auto"
    from macfleet.compression.codecs import build_codec

    with pytest.raises(ConfigError, match="compression=auto is not a codec"):
        build_codec("auto")


def test_python_api_alone_runs_none_and_says_why(tmp_path):
    from torch.utils.data import TensorDataset

    from macfleet import Trainer, TrainingConfig

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    trainer = Trainer(torch.nn.Linear(4, 3), data, TrainingConfig(epochs=1, batch_size=8, compression="auto",
                                                                   progress=False, output_dir=str(tmp_path)))
    metrics = trainer.fit()
    assert metrics["compression"] == "none"
    assert metrics["compression_auto_reason"] == "compression=auto: one process, nothing to exchange: none"
