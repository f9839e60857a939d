"""Codecs: round trips, exact per-segment selection against a brute-force reference, fixed
payload sizes, wire ratios, validation of malformed payloads."""

import numpy as np
import pytest
import torch

from macfleet.compression import build_codec, keep_count
from macfleet.compression.codecs import HEADER_BYTES, MAGIC, Int8Codec, TopKCodec
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
def test_kept_count_is_exact(gran, ratio, heavy):
    n = 200_003
    x = gen(n, seed=7, heavy=heavy)
    codec = build_codec("topk", ratio=ratio, granularity=gran)
    out = codec.decode(codec.encode(x, step=3), n)
    kept = (out != 0).sum().item() if gran == "element" else (out[: n // 64 * 64].view(-1, 64) != 0).any(1).sum().item() + bool(out[n // 64 * 64 :].any())
    assert kept == keep_count(-(-n // codec.unit), ratio)


@pytest.mark.parametrize("gran", ["block", "element"])
def test_selection_keeps_the_largest(gran):
    # elements / blocks far above the rest must all be chosen, the rest not.
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
    assert (out != 0).sum().item() == big.numel()


def test_exact_mode_equals_torch_topk():
    x = gen(50_000, seed=5)
    codec = build_codec("topk", ratio=0.03, granularity="exact")
    out = codec.decode(codec.encode(x), x.numel())
    idx = torch.topk(x.abs(), keep_count(x.numel(), 0.03)).indices
    ref = torch.zeros_like(x)
    ref[idx] = x[idx]
    assert torch.equal(out, ref)


# A bucket of segments that are not block-aligned, some tiny, one empty, one all zeros.
NUMELS = (100, 3, 0, 64, 257, 40, 1000)


def bucket_data(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(NUMELS)
    if kind == "random":
        x = torch.randn(n, generator=g)
        x[100:103] = torch.tensor([-0.0, 0.0, float("inf")])
        return x
    if kind == "ties":
        # few distinct magnitudes: scores (|x|, and block sums of squares) are exact and tie a lot.
        return torch.randint(-2, 3, (n,), generator=g).float()
    return torch.zeros(n)


def reference_ids(codec: TopKCodec, x: torch.Tensor, ratio: float) -> list[int]:
    """Brute force: per segment the k best units by score, ties to the lower unit number."""
    out, at, base = [], 0, 0
    for numel in NUMELS:
        seg = x[at : at + numel].double().tolist()
        units = [seg[i : i + codec.unit] for i in range(0, numel, codec.unit)]
        score = [sum(v * v for v in u) if codec.unit > 1 else abs(u[0]) for u in units]
        best = sorted(range(len(units)), key=lambda u: (-score[u], u))[: keep_count(len(units), ratio)]
        out += sorted(base + u for u in best)
        at, base = at + numel, base + len(units)
    return out


def two_sorts(lay) -> None:
    """Make `lay` select as a bucket too large for one 63-bit sort key does (two sorts)."""
    if lay.one_key is not None:
        seg = torch.repeat_interleave(torch.arange(len(lay.numels)), torch.tensor(lay.units))
        lay.segment_key, lay.one_key = (seg << 32).to(lay.device), None


def encode_bucket(codec: TopKCodec, x: torch.Tensor, ratio: float, sorts: int = 1):
    plan = codec.plan(NUMELS, ratio, x.device, codec.wire_dtype(x.dtype))
    if sorts == 2:
        two_sorts(plan.layout)
    work = codec.workspace(plan, x.dtype)
    for at, start, n in zip(plan.layout.offsets, plan.layout.starts, NUMELS):
        work[start : start + n].copy_(x[at : at + n])
    return plan, codec.compress(work, plan)


@pytest.mark.parametrize("name,gran", SPARSE)
@pytest.mark.parametrize("kind", ["random", "ties", "zeros"])
@pytest.mark.parametrize("ratio", [0.02, 0.3, 1.0])
@pytest.mark.parametrize("sorts", [1, 2])
def test_selection_equals_brute_force_and_payload_size_is_fixed(name, gran, kind, ratio, sorts):
    codec = build_codec(name, ratio=ratio, granularity=gran, block_size=8)
    x = bucket_data(kind)
    plan, sent = encode_bucket(codec, x, ratio, sorts)
    assert (plan.layout.one_key is None) == (sorts == 2)
    assert sent.ids.tolist() == reference_ids(codec, x, ratio)
    # the payload's size is a formula of the layout and ratio alone, whatever the data
    units = [-(-n // codec.unit) for n in NUMELS]
    K = sum(keep_count(u, ratio) for u in units)
    itemsize = 2 if name == "topk_fp16" else 4
    assert sent.payload.numel() == plan.nbytes == HEADER_BYTES + 8 * (-(-K // 2)) + K * codec.unit * itemsize
    codec.validate(sent.payload, plan)
    # and it decodes to the kept units' values (wire-rounded), zero elsewhere
    out = codec.add_payloads(torch.zeros_like(x), plan, [sent.payload])
    ref = x.clone() if name == "topk" else x.half().clamp(-65504, 65504).float()
    keep = torch.zeros(sum(units), dtype=torch.bool)
    keep[sent.ids] = True
    mask = torch.cat([keep[b : b + u].repeat_interleave(codec.unit)[:n]
                      for b, u, n in zip(plan.layout.first_units, units, NUMELS)])
    assert torch.equal(out, torch.where(mask, ref, torch.zeros_like(ref)))


@pytest.mark.parametrize("gran", ["block", "element"])
@pytest.mark.parametrize("name", ["topk", "topk_fp16"])
def test_wire_ratio_is_values_plus_int32_ids(gran, name):
    n = 1_000_000
    x = gen(n, seed=2, heavy=True)
    itemsize = 2 if name == "topk_fp16" else 4
    for ratio in (0.1, 0.01):
        codec = build_codec(name, ratio=ratio, granularity=gran)
        wire = codec.payload_nbytes(codec.encode(x)) / (4 * n)
        # per kept element: its value, plus a 4-byte id per kept unit
        assert wire == pytest.approx(ratio * (itemsize + 4 / codec.unit) / 4, rel=0.01), (ratio, wire)


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


def _ids(payload: torch.Tensor, K: int) -> torch.Tensor:
    return payload[HEADER_BYTES : HEADER_BYTES + 4 * K].view(torch.int32)


def test_payload_validation():
    codec = build_codec("topk", ratio=0.1)
    x = gen(10_000)
    payload = codec.encode(x)
    with pytest.raises(FrameError, match="truncated"):
        codec.decode(payload[:-1], x.numel())
    with pytest.raises(FrameError, match="header"):
        codec.decode(payload[:20], x.numel())
    with pytest.raises(FrameError, match="uint8"):
        codec.decode(payload.view(torch.int32), x.numel())
    bad = payload.clone()
    bad[:8].view(torch.int64)[0] = 12345
    with pytest.raises(FrameError, match="version"):
        codec.decode(bad, x.numel())
    assert int(payload[:8].view(torch.int64)) == MAGIC
    with pytest.raises(FrameError, match="same compression config"):
        build_codec("topk_fp16", ratio=0.1).decode(payload, x.numel())
    with pytest.raises(FrameError, match="same compression config"):
        build_codec("topk", ratio=0.2).decode(payload, x.numel())
    with pytest.raises(FrameError, match="segments differ"):
        codec.decode(payload, x.numel() + 1)
    # same element count, other segments: the layout checksum tells
    plan = codec.plan((5000, 5000), 0.1, "cpu", torch.float32)
    with pytest.raises(FrameError, match="segments differ"):
        codec.validate(payload, plan)
    K = codec.plan((x.numel(),), 0.1, "cpu", torch.float32).K
    bad = payload.clone()
    _ids(bad, K)[-1] = 157  # 10_000 elements are 157 blocks: 0..156
    with pytest.raises(FrameError, match="out of range"):
        codec.decode(bad, x.numel())
    bad = payload.clone()
    _ids(bad, K)[0] = -1
    with pytest.raises(FrameError, match="out of range"):
        codec.decode(bad, x.numel())
    bad = payload.clone()
    ids = _ids(bad, K)
    ids[0], ids[1] = ids[1].clone(), ids[0].clone()
    with pytest.raises(FrameError, match="increasing"):
        codec.decode(bad, x.numel())


def test_payload_validation_counts_per_segment():
    codec = build_codec("topk", ratio=0.25, granularity="element")
    numels = (8, 8)
    x = torch.arange(1.0, 17.0)
    plan = codec.plan(numels, 0.25, "cpu", torch.float32)
    work = codec.workspace(plan, torch.float32)
    work.copy_(x)
    sent = codec.compress(work, plan)
    assert sent.ids.tolist() == [6, 7, 14, 15]
    codec.validate(sent.payload, plan)
    bad = sent.payload.clone()
    _ids(bad, 4)[:] = torch.tensor([5, 6, 7, 15], dtype=torch.int32)  # 3 + 1 instead of 2 + 2
    with pytest.raises(FrameError, match="per segment"):
        codec.validate(bad, plan)


def test_build_codec_checks_names():
    assert isinstance(build_codec("topk_fp16"), TopKCodec)
    with pytest.raises(ConfigError, match="choose one of"):
        build_codec("int4")


# --- int8: every block as int8 values with a float32 scale -------------------------------------
@pytest.mark.parametrize("n", SIZES)
def test_int8_round_trip_within_half_a_step(n):
    x = gen(n, seed=3, heavy=True)
    codec = build_codec("int8")
    assert isinstance(codec, Int8Codec)
    y = codec.decode(codec.encode(x), n)
    for a in range(0, n, 64):  # each value within half its block's step (max |x| / 127)
        blk = x[a : a + 64]
        step = blk.abs().max() / 127
        assert (y[a : a + 64] - blk).abs().max() <= step / 2 * (1 + 1e-5) + 1e-30
    if n:
        i = int(x.abs().argmax())
        assert y[i] == pytest.approx(float(x[i]), rel=1e-6), "a block's largest value is sent exactly"


def test_int8_scale_is_max_times_float32_reciprocal():
    # CUDA divides by a host scalar as a multiplication by its reciprocal; the scale is computed
    # that way on every device so that CPU and GPU nodes send the same bits.
    x = gen(64 * 300, seed=5, heavy=True)
    codec = build_codec("int8")
    payload = codec.encode(x)
    plan = codec.plan((x.numel(),), 1.0, x.device, torch.float32)
    scale, q = codec.unpack(payload, plan)
    want = x.view(-1, 64).abs().numpy().max(axis=1) * np.float32(1.0 / 127.0)
    assert np.array_equal(scale.numpy(), want.astype(np.float32))
    assert int(q.abs().max()) == 127


def test_int8_pieces_cover_the_bucket_and_refuse_each_others_payloads():
    codec = build_codec("int8")
    numels = (30_000, 7, 4_097)  # segment ends inside pieces
    plan = codec.plan(numels, 1.0, torch.device("cpu"), torch.int8)
    pieces = plan.pieces(100)
    assert [p.first for p in pieces] == list(range(0, plan.K, 100))
    assert sum(p.K for p in pieces) == plan.K
    assert plan.pieces(plan.K) == [plan]
    runs = [(at, n) for p in pieces for at, _, n in p.spans()]
    covered = torch.zeros(sum(numels), dtype=torch.int64)
    for at, n in runs:
        covered[at : at + n] += 1
    assert bool((covered == 1).all()), "every bucket element in exactly one piece"
    g = gen(sum(numels), seed=7, heavy=True)
    work = codec.fill(codec.workspace(plan, g.dtype), g, plan)
    whole = torch.empty_like(g)
    codec.sum_payloads(whole, plan, [codec.compress(work.clone(), plan).payload])
    pieced = torch.full_like(g, float("nan"))
    for p in pieces:
        part = work[p.first * 64 : (p.first + p.K) * 64].clone()
        sent = codec.compress(part, p)
        codec.validate(sent.payload, p)
        with pytest.raises(FrameError, match="segments differ"):
            codec.validate(sent.payload, pieces[1] if p is pieces[0] else pieces[0])
        codec.sum_payloads(pieced, p, [sent.payload, sent.payload])
    assert torch.equal(pieced, whole * 2)


def test_int8_wire_is_a_quarter_plus_scales():
    n = 1_000_000
    codec = build_codec("int8")
    wire = codec.payload_nbytes(codec.encode(gen(n))) / (4 * n)
    assert wire == pytest.approx((1 + 4 / 64) / 4, rel=0.001), wire
    assert codec.plan((n,), 0.1, "cpu", torch.int8).nbytes == codec.plan((n,), 1.0, "cpu", torch.int8).nbytes, \
        "int8 sends every block: the top-k ratio does not change it"


def test_int8_zero_blocks_and_non_finite_values():
    x = torch.zeros(200)
    x[64:128] = gen(64, seed=1)
    x[130] = float("inf")
    codec = build_codec("int8")
    y = codec.decode(codec.encode(x), 200)
    assert torch.equal(y[:64], torch.zeros(64)), "a block of zeros has scale 0 and sends zeros"
    assert torch.isfinite(y[64:128]).all()
    assert torch.isnan(y[128:192]).all(), "an inf makes its block NaN: never a silently finite sum"
    assert torch.equal(y[192:], torch.zeros(8))


def test_int8_error_feedback_keeps_the_rounding():
    from macfleet.compression import GradientCompressor
    from macfleet.config import CompressionConfig

    comp = GradientCompressor(CompressionConfig(name="int8"))
    segs = [("a", 0, 100), ("b", 100, 130), ("c", 230, 70)]  # partial blocks: a padded workspace
    total = torch.zeros(300)
    sent_total = torch.zeros(300)
    for step in range(5):
        g = gen(300, seed=10 + step)
        total += g
        out = comp.reduce(g.clone(), segs, step).wait()
        sent_total += out
        residual = torch.cat([comp.feedback.residuals[n] for n in "abc"])
        # nothing is lost, only delayed: what was sent plus what is kept is every gradient so far
        assert torch.allclose(sent_total + residual, total, atol=1e-5)
        assert residual.abs().max() > 0
    saved = comp.state_dict()
    again = GradientCompressor(CompressionConfig(name="int8"))
    again.load_state_dict(saved)
    g = gen(300, seed=99)
    assert torch.equal(comp.reduce(g.clone(), segs, 5).wait(), again.reduce(g.clone(), segs, 5).wait())


def test_int8_payload_validation():
    codec = build_codec("int8")
    x = gen(10_000)
    payload = codec.encode(x)
    plan = codec.plan((x.numel(),), 1.0, "cpu", torch.int8)
    codec.validate(payload, plan)
    with pytest.raises(FrameError, match="truncated"):
        codec.decode(payload[:-1], x.numel())
    with pytest.raises(FrameError, match="same compression config"):
        build_codec("topk", ratio=0.1).decode(payload, x.numel())
    with pytest.raises(FrameError, match="same compression config"):
        codec.decode(build_codec("topk_fp16").encode(x), x.numel())
    with pytest.raises(FrameError, match="segments differ"):
        codec.validate(payload, codec.plan((5000, 5000), 1.0, "cpu", torch.int8))
    bad = payload.clone()
    bad[HEADER_BYTES : HEADER_BYTES + 4].view(torch.float32)[0] = -1.0
    with pytest.raises(FrameError, match="negative scale"):
        codec.decode(bad, x.numel())


def test_int8_rejects_momentum_correction():
    from macfleet.compression import GradientCompressor
    from macfleet.config import CompressionConfig

    with pytest.raises(ConfigError, match="top-k codec"):
        GradientCompressor(CompressionConfig(name="int8", momentum_correction=True))


def test_int8_row_of_the_compression_benchmark():
    from macfleet.benchmark.compression import codec_costs, parse_codecs

    threads = torch.get_num_threads()
    try:
        rows = codec_costs({"tiny": 4096}, parse_codecs("int8,topk_fp16", 0.1), repeats=1, device="cpu")
    finally:
        torch.set_num_threads(threads)  # codec_costs times one thread; later tests here keep theirs
    int8, topk = rows
    assert (int8["codec"], int8["ratio"], int8["kept"]) == ("int8", 1.0, 1.0), "int8 sends every value"
    assert int8["wire_ratio"] == pytest.approx((64 + 64 * 4 + 4096) / (4 * 4096))
    assert topk["ratio"] == 0.1 and topk["kept"] == pytest.approx(0.1, abs=0.02)


def test_one_sort_key_is_used_while_it_fits_63_bits():
    from macfleet.compression.codecs import Layout

    lay = Layout((64 * 1000,) * 161, 64, torch.device("cpu"))  # ResNet-50's parameter count per bucket, as blocks
    assert lay.one_key is not None and lay.segment_key is None
    # 2^20 units need 20 bits, 31 for the score: 2^12 segments fit, 2^13 do not.
    assert Layout((256,) * 4096, 1, torch.device("cpu")).one_key is not None
    assert Layout((128,) * 8192, 1, torch.device("cpu")).one_key is None
