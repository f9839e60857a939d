"""GradientCompressor and error feedback in one process (world_size 1, group None)."""

import math

import pytest
import torch

from macfleet.compression import GradientCompressor, warmup_ratio
from macfleet.config import CompressionConfig
from macfleet.errors import CheckpointError, ConfigError, FrameError
from tests.unit.test_comm_group import _each, _groups

# parameter sizes with partial blocks and tiny tensors, like a real model's weights and biases
PARAMS = [("conv.weight", 4608), ("conv.bias", 10), ("fc.weight", 70_000), ("fc.bias", 1), ("head.weight", 12_345)]
LOSSY = [("topk", "block"), ("topk", "element"), ("topk", "exact"),
         ("topk_fp16", "block"), ("topk_fp16", "element")]


def grads(step: int, params=PARAMS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {name: torch.randn(n, generator=g) * math.exp(0.3 * i) for i, (name, n) in enumerate(params)}


def bucket(g: dict[str, torch.Tensor], names: list[str]):
    flat = torch.cat([g[n] for n in names])
    segs, off = [], 0
    for n in names:
        segs.append((n, off, g[n].numel()))
        off += g[n].numel()
    return flat, segs


def reduce_all(comp: GradientCompressor, g: dict, layout: list[list[str]], step: int) -> dict[str, torch.Tensor]:
    """Run every bucket of `layout` and return the per-parameter results."""
    out = {}
    for names in layout:
        flat, segs = bucket(g, names)
        res = comp.reduce(flat, segs, step).wait()
        for name, off, n in segs:
            out[name] = res[off : off + n].clone()
    return out


ONE_BUCKET = [[n for n, _ in PARAMS]]
SPLIT = [["head.weight", "fc.bias"], ["fc.weight"], ["conv.bias", "conv.weight"]]


@pytest.mark.parametrize("name,gran", LOSSY)
def test_error_feedback_invariant_sent_plus_residual_is_input(name, gran):
    comp = GradientCompressor(CompressionConfig(name=name, ratio=0.05, granularity=gran), None)
    residual = {n: torch.zeros(k) for n, k in PARAMS}
    for step in range(3):
        g = grads(step)
        sent = reduce_all(comp, g, ONE_BUCKET, step)
        state = comp.state_dict()["feedback"]["residuals"]
        for n, _ in PARAMS:
            expected_input = residual[n] + g[n]
            assert torch.equal(sent[n] + state[n], expected_input), (n, step)
            assert (sent[n] != 0).any(), "every parameter sends at least one unit"
            if g[n].numel() > 1000:
                assert (sent[n] != 0).float().mean() < 0.1
        residual = state


@pytest.mark.parametrize("name,dense", [("topk", "none"), ("topk_fp16", "fp16")])
def test_ratio_one_equals_the_dense_codec(name, dense):
    # with error feedback topk_fp16 carries fp16's rounding into the next step (fp16 drops it),
    # so the two agree on every step only without it.
    sparse = GradientCompressor(CompressionConfig(name=name, ratio=1.0, error_feedback=name == "topk"), None)
    ref = GradientCompressor(CompressionConfig(name=dense), None)
    for step in range(3):
        g = grads(step)
        a, b = reduce_all(sparse, g, ONE_BUCKET, step), reduce_all(ref, g, ONE_BUCKET, step)
        for n, _ in PARAMS:
            assert torch.equal(a[n], b[n])
    if name == "topk":
        assert all((r == 0).all() for r in sparse.state_dict()["feedback"]["residuals"].values())


def test_dense_codecs():
    g = grads(0)
    assert torch.equal(reduce_all(GradientCompressor(CompressionConfig(name="none"), None), g, ONE_BUCKET, 0)["fc.weight"],
                       g["fc.weight"])
    comp = GradientCompressor(CompressionConfig(name="fp16"), None)
    assert torch.equal(reduce_all(comp, g, ONE_BUCKET, 0)["fc.weight"], g["fc.weight"].half().float())
    assert comp.wire_ratio == 0.5
    assert comp.state_dict()["feedback"] is None


@pytest.mark.parametrize("name,gran", LOSSY)
@pytest.mark.parametrize("momentum_correction", [False, True])
def test_result_does_not_depend_on_bucket_layout(name, gran, momentum_correction):
    # PyTorch rebuilds buckets after step 0, and a resumed run starts from the initial layout
    # again: per-parameter results must be the same whatever the grouping.
    cfg = CompressionConfig(name=name, ratio=0.05, granularity=gran, momentum_correction=momentum_correction)
    fixed, rebuilt = GradientCompressor(cfg, None), GradientCompressor(cfg, None)
    for step in range(3):
        g = grads(step)
        a = reduce_all(fixed, g, ONE_BUCKET, step)
        b = reduce_all(rebuilt, g, ONE_BUCKET if step == 0 else SPLIT, step)
        for n, _ in PARAMS:
            assert torch.equal(a[n], b[n]), (n, step)


def test_state_dict_round_trip_resumes_exactly():
    cfg = CompressionConfig(name="topk_fp16", ratio=0.02, momentum_correction=True, warmup_steps=3)
    first = GradientCompressor(cfg, None)
    for step in range(2):
        reduce_all(first, grads(step), ONE_BUCKET, step)
    state = first.state_dict()
    # a copy: the live buffers change next step, the checkpoint must not.
    snapshot = {k: v.clone() for k, v in state["feedback"]["residuals"].items()}
    resumed = GradientCompressor(cfg, None)
    resumed.load_state_dict(state)
    for step in range(2, 5):
        g = grads(step)
        a = reduce_all(first, g, ONE_BUCKET, step)
        b = reduce_all(resumed, g, SPLIT, step)  # the resumed process has the other layout
        for n, _ in PARAMS:
            assert torch.equal(a[n], b[n])
    for k, v in snapshot.items():
        assert torch.equal(state["feedback"]["residuals"][k], v)
    with pytest.raises(CheckpointError, match="version"):
        resumed.load_state_dict({"feedback": {"version": 99}})


def test_warmup_ramp():
    cfg = CompressionConfig(name="topk", ratio=0.01, warmup_steps=4, granularity="exact")
    ratios = [warmup_ratio(cfg, s) for s in range(6)]
    assert ratios[0] == 1.0
    assert all(a > b for a, b in zip(ratios[:4], ratios[1:5]))
    assert ratios[4] == ratios[5] == 0.01
    assert ratios[2] == pytest.approx(0.1)  # exponential: halfway in steps is sqrt(ratio)
    comp = GradientCompressor(cfg, None)
    n = 100_000
    for step in range(6):
        flat = torch.randn(n, generator=torch.Generator().manual_seed(step))
        out = comp.reduce(flat.clone(), [("w", 0, n)], step).wait()
        kept = (out != 0).sum().item()
        assert kept == round(ratios[step] * n) or (ratios[step] == 1.0 and kept == n)


def test_momentum_correction_matches_dgc():
    m, ratio = 0.9, 0.1
    cfg = CompressionConfig(name="topk", ratio=ratio, granularity="exact", momentum_correction=True, momentum=m)
    comp = GradientCompressor(cfg, None)
    n = 5000
    k = round(ratio * n)
    u, v = torch.zeros(n), torch.zeros(n)
    for step in range(4):
        g = torch.randn(n, generator=torch.Generator().manual_seed(step))
        out = comp.reduce(g.clone(), [("w", 0, n)], step).wait()
        # Deep Gradient Compression, Algorithm 1 with momentum correction and factor masking
        u = m * u + g
        v = v + u
        sel = torch.topk(v.abs(), k).indices
        expected = torch.zeros(n)
        expected[sel] = v[sel]
        v[sel] = 0
        u[sel] = 0
        assert torch.allclose(out, expected, atol=1e-6), step
        fb = comp.state_dict()["feedback"]
        assert torch.allclose(fb["residuals"]["w"], v, atol=1e-6)
        assert torch.allclose(fb["velocities"]["w"], u, atol=1e-6)


def test_without_error_feedback_nothing_is_kept():
    comp = GradientCompressor(CompressionConfig(name="topk", ratio=0.1, error_feedback=False), None)
    g = grads(0)
    out = reduce_all(comp, g, ONE_BUCKET, 0)
    assert comp.state_dict()["feedback"] is None
    nz = out["fc.weight"] != 0
    assert torch.equal(out["fc.weight"][nz], g["fc.weight"][nz])
    with pytest.raises(ConfigError, match="error_feedback"):
        GradientCompressor(CompressionConfig(name="topk", momentum_correction=True, error_feedback=False), None)


def test_stats_and_segment_checks():
    comp = GradientCompressor(CompressionConfig(name="topk_fp16", ratio=0.1), None)
    reduce_all(comp, grads(0), ONE_BUCKET, 0)
    assert comp.stats["calls"] == 1
    assert comp.stats["dense_bytes"] == 4 * sum(n for _, n in PARAMS)
    assert 0.04 < comp.wire_ratio < 0.1
    assert comp.stats["compress_s"] > 0
    # the payload's size depends on the layout and ratio only: all-zero gradients cost the same
    sent = comp.stats["bytes_sent"]
    reduce_all(comp, {n: torch.zeros(k) for n, k in PARAMS}, ONE_BUCKET, 1)
    assert comp.stats["bytes_sent"] == 2 * sent
    flat = torch.zeros(10)
    with pytest.raises(ValueError, match="gaps"):
        comp.reduce(flat, [("a", 0, 4), ("b", 5, 5)], 0)
    with pytest.raises(ValueError, match="cover"):
        comp.reduce(flat, [("a", 0, 4)], 0)


def test_topk_fp16_ratio_one_with_error_feedback_keeps_the_rounding():
    comp = GradientCompressor(CompressionConfig(name="topk_fp16", ratio=1.0), None)
    g = grads(0)
    out = reduce_all(comp, g, ONE_BUCKET, 0)
    res = comp.state_dict()["feedback"]["residuals"]
    for n, _ in PARAMS:
        assert torch.equal(out[n], g[n].half().float())
        assert torch.equal(out[n] + res[n], g[n])


def test_a_rank_with_another_config_is_a_frame_error():
    # two ranks on real sockets (threads): rank 1 keeps another ratio, so its payload has another
    # size and K; both ranks reject it on the host copy, before decoding anything.
    groups = _groups(2, timeout=20.0)

    def reduce(group):
        comp = GradientCompressor(CompressionConfig(name="topk", ratio=0.1 if group.rank == 0 else 0.2), group)
        flat, segs = bucket(grads(group.rank), ONE_BUCKET[0])
        return comp.reduce(flat, segs, 0).wait()

    try:
        errors = _each(groups, reduce)
    finally:
        for g in groups:
            g.close()
    for exc in errors:
        # torch's Future.then wraps what the callback raised in a RuntimeError naming it
        assert isinstance(exc, (FrameError, RuntimeError)) and "FrameError" in repr(exc) + type(exc).__name__, exc
        assert "same compression config" in str(exc)


@pytest.mark.parametrize("cfg,segs", [
    (CompressionConfig(name="topk_fp16", ratio=0.05), [("a", 0, 300), ("b", 300, 1000)]),
    (CompressionConfig(name="topk", ratio=0.1, granularity="element", momentum_correction=True),
     [("a", 0, 300), ("b", 300, 1000)]),
    # the per-name (ratio 1.0) path first
    (CompressionConfig(name="topk_fp16", ratio=0.05, warmup_steps=2), [("a", 0, 300), ("b", 300, 1000)]),
    (CompressionConfig(name="int8"), [("a", 0, 300), ("b", 300, 1000)]),  # a workspace
    (CompressionConfig(name="int8"), [("a", 0, 320), ("b", 320, 960)]),  # whole blocks: the bucket is the workspace
])
def test_a_rolled_back_step_redone_counts_its_gradient_once(cfg, segs):
    """An elastic fleet redoes a step whose exchange failed: the redone step must start from the
    residuals before it, so the result equals a run where the step never failed."""
    torch.manual_seed(0)
    n = sum(k for _, _, k in segs)
    grads = [torch.randn(n) for _ in range(4)]
    plain = GradientCompressor(cfg, None)
    redo = GradientCompressor(cfg, None, redoable=True)
    for step, g in enumerate(grads):
        want = plain.reduce(g.clone(), segs, step).value()
        if step in (1, 2):  # the first attempt fails after its encode; the step is redone
            redo.reduce(g.clone() * 3.0, segs, step).value()
            redo.rollback()
        got = redo.reduce(g.clone(), segs, step).value()
        assert torch.equal(got, want), step
    a, b = plain.state_dict()["feedback"], redo.state_dict()["feedback"]
    for key in ("residuals", "velocities"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


@pytest.mark.parametrize("saved_codec,dense", [("topk_fp16", "none"), ("topk", "fp16"), ("topk_fp16", "fp16")])
def test_top_k_residuals_are_paid_out_by_a_dense_codec_never_dropped(saved_codec, dense):
    """A resume (or compression=auto deciding again) that moves from top-k to a dense codec: the
    dense codec runs in its top-k form at 100%, so the residual goes out with the next gradient."""
    from macfleet.compression.compressor import carry_residuals

    sparse = GradientCompressor(CompressionConfig(name=saved_codec, ratio=0.05), None)
    for step in range(3):
        reduce_all(sparse, grads(step), ONE_BUCKET, step)
    saved = sparse.state_dict()
    owed = {n: r.clone() for n, r in saved["feedback"]["residuals"].items()}
    assert any((r != 0).any() for r in owed.values())
    cfg = CompressionConfig(name=dense)
    carried = carry_residuals(cfg, saved)
    assert (carried.name, carried.ratio, carried.error_feedback) == ({"none": "topk", "fp16": "topk_fp16"}[dense], 1.0, True)
    resumed = GradientCompressor(carried, None)
    resumed.load_state_dict(saved)
    plain = GradientCompressor(cfg, None)
    plain.load_state_dict(saved)  # a dense codec alone keeps nothing: the residual is gone
    g = grads(3)
    paid, dropped = reduce_all(resumed, g, SPLIT, 3), reduce_all(plain, g, SPLIT, 3)
    left = resumed.state_dict()["feedback"]["residuals"]
    for n, _ in PARAMS:
        expected = owed[n] + g[n]
        if dense == "none":
            assert torch.equal(paid[n], expected) and (left[n] == 0).all()
        else:  # sent in fp16; only the rounding stays behind, as fp16 with error feedback keeps it
            assert torch.equal(paid[n] + left[n], expected)
            assert left[n].abs().max() <= expected.abs().max() * 2 ** -10
        assert not torch.equal(dropped[n], expected)
    # Nothing owed (a dense or feedback-free checkpoint), or a top-k codec now: the config as it is.
    assert carry_residuals(cfg, plain.state_dict()) is cfg
    assert carry_residuals(cfg, None) is cfg
    topk = CompressionConfig(name="topk", ratio=0.1)
    assert carry_residuals(topk, saved) is topk


@pytest.mark.parametrize("redoable", [False, True])
@pytest.mark.parametrize("name", ["topk_fp16", "int8"])
def test_a_bucket_keeps_its_residual_buffers_from_step_to_step(name, redoable):
    # Binding the same bucket again must reuse its buffers: a rebuild costs a zeroed allocation
    # of the whole bucket and a copy per parameter, every step.
    comp = GradientCompressor(CompressionConfig(name=name, ratio=0.1), None, redoable=redoable)
    segs = [("a", 0, 1000), ("b", 1000, 37), ("c", 1037, 4000)]
    seen = set()
    for step in range(6):
        g = torch.randn(5037, generator=torch.Generator().manual_seed(step))
        comp.reduce(g, segs, step).wait()
        comp.settle()
        seen.add(comp.feedback.residuals["a"].data_ptr())
        assert len(comp.feedback._bound) == 1
    # one buffer, or two that swap (a redoable step writes beside the current residuals)
    assert len(seen) == (2 if redoable else 1), seen
