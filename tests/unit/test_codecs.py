"""Codecs on the flat path: round trips, index coding, selection quality, wire ratios, validation."""

import pytest
import torch

from macfleet.compression import build_codec
from macfleet.compression.codecs import HEADER_FIELDS, TopKCodec
from macfleet.compression.indexcode import decode_indices, encode_indices
from macfleet.compression.select import keep_count
from macfleet.errors import ConfigError, FrameError

SIZES = [0, 1, 2, 63, 64, 65, 1000, 4097]
SPARSE = [("topk", "block"), ("topk", "element"), ("topk", "exact"),
          ("topk_fp16", "block"), ("topk_fp16", "element"), ("topk_fp16", "exact")]


def gen(n: int, seed: int = 0, heavy: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if heavy:
        # log-normal scale per element: a few huge entries, like real gradients.
        x = x * torch.exp(2.0 * torch.randn(n, generator=g))
    return x


@pytest.mark.parametrize("ids", [[], [0], [5], [0, 1, 2], [254, 255, 256], [255], [510, 511, 766],
                                 [0, 100_000, 100_001, 10_000_000]])
def test_index_code_round_trip(ids):
    t = torch.tensor(ids, dtype=torch.int64)
    code = encode_indices(t)
    assert code.dtype == torch.uint8
    assert torch.equal(decode_indices(code, len(ids)), t)


def test_index_code_is_about_one_byte_per_index():
    g = torch.Generator().manual_seed(1)
    for density in (0.1, 0.01):
        ids = torch.nonzero(torch.rand(1_000_000, generator=g) < density).squeeze(1)
        code = encode_indices(ids)
        assert torch.equal(decode_indices(code, ids.numel()), ids)
        assert code.numel() / ids.numel() < 1.1


def test_index_code_rejects_corrupt_input():
    code = encode_indices(torch.tensor([3, 700]))
    with pytest.raises(FrameError):
        decode_indices(code, 3)
    with pytest.raises(FrameError):
        decode_indices(torch.cat([code, torch.zeros(1, dtype=torch.uint8)]), 2)
    with pytest.raises(FrameError):
        decode_indices(code.to(torch.int32), 2)


@pytest.mark.parametrize("n", SIZES)
def test_dense_codecs_round_trip(n):
    x = gen(n)
    assert torch.equal(build_codec("none").decode(build_codec("none").encode(x), n), x)
    fp16 = build_codec("fp16")
    payload = fp16.encode(x)
    assert fp16.payload_nbytes(payload) == 2 * n
    assert torch.equal(fp16.decode(payload, n), x.half().float())


def test_fp16_saturates_instead_of_inf():
    x = torch.tensor([1e6, -1e6, 3.0])
    out = build_codec("fp16").decode(build_codec("fp16").encode(x), 3)
    assert out.tolist() == [65504.0, -65504.0, 3.0]


@pytest.mark.parametrize("name,gran", SPARSE)
@pytest.mark.parametrize("n", SIZES)
def test_sparse_round_trip_sends_exact_values(name, gran, n):
    x = gen(n, seed=n)
    codec = build_codec(name, ratio=0.1, granularity=gran, block_size=8)
    out = codec.decode(codec.encode(x), n)
    sent = out != 0
    ref = x if name == "topk" else x.half().float()
    assert torch.equal(out[sent], ref[sent])
    if n:
        assert sent.any(), "every non-empty tensor sends at least one unit"


@pytest.mark.parametrize("name,gran", SPARSE)
def test_ratio_one_sends_everything(name, gran):
    x = gen(1001, seed=3)
    codec = build_codec(name, ratio=1.0, granularity=gran, block_size=16)
    out = codec.decode(codec.encode(x), x.numel())
    assert torch.equal(out, x if name == "topk" else x.half().float())


@pytest.mark.parametrize("gran", ["block", "element"])
@pytest.mark.parametrize("ratio", [0.1, 0.01])
@pytest.mark.parametrize("heavy", [False, True])
def test_kept_fraction_within_ten_percent(gran, ratio, heavy):
    n = 2_000_000
    x = gen(n, seed=7, heavy=heavy)
    codec = build_codec("topk", ratio=ratio, granularity=gran)
    kept = (codec.decode(codec.encode(x, step=3), n) != 0).sum().item() / n
    assert abs(kept - ratio) <= 0.1 * ratio, kept


@pytest.mark.parametrize("gran", ["block", "element"])
def test_selection_keeps_the_largest(gran):
    # elements / blocks far above the rest must all be chosen, the rest mostly not.
    n = 640_000
    x = gen(n, seed=11) * 0.01
    big = torch.arange(0, n, 97)[:500] if gran == "element" else (torch.arange(0, n // 64, 37)[:1000] * 64)
    if gran == "block":
        big = (big[:, None] + torch.arange(64)).reshape(-1)
    x[big] = 5.0
    ratio = big.numel() / n
    codec = build_codec("topk", ratio=ratio, granularity=gran)
    out = codec.decode(codec.encode(x), n)
    assert (out[big] == 5.0).all()
    assert (out != 0).sum().item() <= 1.05 * big.numel()


def test_exact_mode_equals_torch_topk():
    x = gen(50_000, seed=5)
    codec = build_codec("topk", ratio=0.03, granularity="exact")
    out = codec.decode(codec.encode(x), x.numel())
    idx = torch.topk(x.abs(), keep_count(x.numel(), 0.03)).indices
    ref = torch.zeros_like(x)
    ref[idx] = x[idx]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("gran", ["block", "element"])
def test_wire_ratio_targets(gran):
    n = 2_000_000
    x = gen(n, seed=2, heavy=True)
    for ratio, bound in ((0.1, 0.15), (0.01, 0.015)):
        codec = build_codec("topk_fp16", ratio=ratio, granularity=gran)
        wire = codec.payload_nbytes(codec.encode(x)) / (4 * n)
        assert wire <= bound, (ratio, wire)
        assert wire >= ratio * 2 / 4 * 0.9, "values alone need ratio * 2 bytes per element"


@pytest.mark.parametrize("name,gran", SPARSE)
def test_encode_is_deterministic_and_leaves_input_alone(name, gran):
    x = gen(300_000, seed=9, heavy=True)
    before = x.clone()
    codec = build_codec(name, ratio=0.05, granularity=gran)
    rng = torch.get_rng_state()
    a, b = codec.encode(x, step=4), codec.encode(x, step=4)
    assert torch.equal(a, b)
    assert torch.equal(x, before)
    assert torch.equal(torch.get_rng_state(), rng), "selection must not use torch's global RNG"


def test_payload_validation():
    codec = build_codec("topk", ratio=0.1)
    x = gen(10_000)
    payload = codec.encode(x)
    with pytest.raises(FrameError):
        codec.decode(payload[:-1], x.numel())
    with pytest.raises(FrameError):
        codec.decode(payload[:20], x.numel())
    bad = payload.clone()
    bad[:8].view(torch.int64)[0] = 12345
    with pytest.raises(FrameError, match="version"):
        codec.decode(bad, x.numel())
    with pytest.raises(FrameError, match="same compression config"):
        build_codec("topk_fp16", ratio=0.1).decode(payload, x.numel())
    with pytest.raises(FrameError):
        codec.decode(payload, x.numel() + 1)
    bad = payload.clone()
    bad[8 * HEADER_FIELDS : 8 * HEADER_FIELDS + 8].view(torch.int64)[0] = 100
    with pytest.raises(FrameError):
        codec.decode(bad, 100)
    with pytest.raises(FrameError, match="segments differ"):
        codec.unpack(payload, [5000, 5000])


def test_build_codec_checks_names():
    assert isinstance(build_codec("topk_fp16"), TopKCodec)
    with pytest.raises(ConfigError, match="choose one of"):
        build_codec("int8")
