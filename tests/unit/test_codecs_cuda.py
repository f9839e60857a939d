"""Codecs on CUDA: the same bits as on CPU, and no host synchronisation in the hot path.

Skipped without CUDA. `torch.cuda.set_sync_debug_mode("error")` makes any op that synchronises
the host with the device (.item(), nonzero, a blocking copy, ...) raise, so a clean run of
GradientCompressor.reduce under it shows the bucket's encode + decode queue kernels only.
"""

import math

import pytest
import torch

from macfleet.compression import GradientCompressor, build_codec
from macfleet.config import CompressionConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# several segments, partial blocks, a 1-element and an empty parameter
PARAMS = [("conv.weight", 4608), ("conv.bias", 10), ("empty", 0), ("fc.weight", 70_000), ("fc.bias", 1),
          ("head.weight", 12_345)]
CODECS = [dict(name="none"), dict(name="fp16"), dict(name="int8"), dict(name="int8", error_feedback=False),
          dict(name="topk", granularity="block"), dict(name="topk", granularity="element"),
          dict(name="topk_fp16", granularity="block"), dict(name="topk_fp16", granularity="element"),
          dict(name="topk", granularity="block", momentum_correction=True),
          dict(name="topk_fp16", granularity="element", error_feedback=False),
          dict(name="topk", granularity="block", warmup_steps=3)]
IDS = [",".join(f"{k}={v}" for k, v in c.items()) for c in CODECS]


def bucket(step: int, device: str) -> tuple[torch.Tensor, list]:
    g = torch.Generator().manual_seed(step)
    parts, segs, off = [], [], 0
    for i, (name, n) in enumerate(PARAMS):
        x = torch.randn(n, generator=g) * math.exp(0.3 * i)
        if step == 1:
            x = x.round()  # many ties
        if step == 2 and name == "fc.weight":
            x.zero_()
        parts.append(x)
        segs.append((name, off, n))
        off += n
    return torch.cat(parts).to(device), segs


def run(cfg: CompressionConfig, device: str, steps: int = 5):
    comp = GradientCompressor(cfg, None)
    outs = []
    for step in range(steps):
        flat, segs = bucket(step, device)
        outs.append(comp.reduce(flat, segs, step).wait().cpu())
    state = comp.state_dict()["feedback"]
    return outs, state, comp


@pytest.mark.parametrize("kw", CODECS, ids=IDS)
def test_cuda_equals_cpu(kw):
    cfg = CompressionConfig(ratio=0.05, **kw)
    cpu, cpu_state, cpu_comp = run(cfg, "cpu")
    cuda, cuda_state, cuda_comp = run(cfg, "cuda")
    for step, (a, b) in enumerate(zip(cpu, cuda)):
        assert torch.equal(a, b), (kw, step)
    if cpu_state is not None:
        for key in ("residuals", "velocities"):
            assert cpu_state[key].keys() == cuda_state[key].keys()
            for name in cpu_state[key]:
                assert torch.equal(cpu_state[key][name], cuda_state[key][name].cpu()), (kw, key, name)
    assert cpu_comp.stats["bytes_sent"] == cuda_comp.stats["bytes_sent"]


@pytest.mark.parametrize("name,gran", [("topk", "block"), ("topk", "element"), ("topk_fp16", "block"),
                                       ("topk_fp16", "element")])
def test_flat_encode_decode_cuda_equals_cpu(name, gran):
    x = torch.randn(100_003, generator=torch.Generator().manual_seed(3))
    x[:5000] = x[:5000].round()
    codec = build_codec(name, ratio=0.03, granularity=gran)
    payload_cpu, payload_cuda = codec.encode(x), codec.encode(x.cuda())
    assert payload_cuda.device.type == "cuda"
    assert torch.equal(payload_cpu, payload_cuda.cpu())
    assert torch.equal(codec.decode(payload_cpu, x.numel()), codec.decode(payload_cuda, x.numel()).cpu())


@pytest.mark.parametrize("kw", CODECS, ids=IDS)
def test_reduce_has_no_host_sync(kw):
    cfg = CompressionConfig(ratio=0.05, **kw)
    comp = GradientCompressor(cfg, None)
    flats = [bucket(step, "cuda") for step in range(6)]
    # step 0 builds the layout and the residuals; later steps (a new ratio each during a
    # warm-up, hence new plans) must not synchronise.
    comp.reduce(*flats[0], 0).wait()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 6):
            flat, segs = flats[step]
            comp.reduce(flat, segs, step).wait()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
