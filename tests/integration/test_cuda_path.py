"""The accelerator path, in 2 real processes over the engine: DDP on cuda equals DDP on cpu for
every codec, the flat path on cuda equals the DDP path, and the comm hook never synchronises the
host with the device. Needs a CUDA GPU: CI has none, the GPU hosts run it (README, Benchmarks)."""

from __future__ import annotations

import pytest
import torch

from macfleet.comm.launch import spawn_local

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU host)")

CODECS = ("none", "fp16", "int8", "topk", "topk_fp16")
STEPS = 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                               torch.nn.ReLU(), torch.nn.Linear(512, 10))


def _train(group, device: str, path: str, codec: str, rank: int, sync_debug: bool, encoder: str = "auto") -> dict:
    from macfleet.config import CompressionConfig
    from macfleet.ddp import MacFleetDDP

    dev = torch.device(device)
    model = _model().to(dev)
    ddp = MacFleetDDP(model, group, share=0.5, compression=CompressionConfig(name=codec, ratio=0.25, encoder=encoder),
                      device=dev, use_torch_ddp=path == "torch", bucket_cap_mb=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(11 + rank)
    batches = [(torch.randn(32, 64, generator=g).to(dev), torch.randint(0, 10, (32,), generator=g).to(dev))
               for _ in range(STEPS)]
    for step, (x, y) in enumerate(batches):
        ddp.set_step(step)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        if sync_debug and step > 0:  # step 0: DDP rebuilds its buckets (host work of its own)
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ddp.finish_gradients()
        opt.step()
    if path == "torch":  # on a device a codec encodes on its own thread unless told otherwise
        assert bool(getattr(ddp.reducer, "_encoder", False)) == (device != "cpu" and codec != "none"
                                                                   and encoder == "auto"), (device, codec, encoder)
    ddp.retire()
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _ranks(rank, world_size, addrs):
    import torch.distributed as dist

    from macfleet.comm import Group
    from macfleet.comm.backend import init_process_group_from_group

    group = Group(rank, world_size, addrs, timeout=60)
    init_process_group_from_group(group)
    device = f"cuda:{rank % torch.cuda.device_count()}"
    torch.cuda.set_device(device)
    # Two async all_reduces of one device tensor: the second reads the first's result (as on one
    # CUDA stream), although its copy to the host could have been issued before the first ran.
    t = torch.full((3000,), float(rank + 1), device=device)
    first, second = group.all_reduce_async(t), group.all_reduce_async(t)
    second.wait()
    chained = (first.wait() is t, t.cpu().unique().tolist())
    # The same with a tensor big enough for the data lanes (a GPU host's cores give it several):
    # the two all_reduces run on different lanes, and the second still reads the first's result.
    big = torch.full((1 << 19,), float(rank + 1), device=device)
    futs = [group.all_reduce_async(big) for _ in range(3)]
    futs[-1].wait()
    chained_lanes = (group.lanes, all(f.done() for f in futs), big.cpu().unique().tolist())
    parts = group.all_gather(torch.arange(4, device=device) + 10 * rank, check=lambda p: None)
    gathered = [(p.device.type, p.tolist()) for p in parts]
    out = {}
    for codec in CODECS:
        out[("cpu", "torch", codec)] = _train(group, "cpu", "torch", codec, rank, False)
        out[(device, "torch", codec)] = _train(group, device, "torch", codec, rank, True)
        out[(device, "flat", codec)] = _train(group, device, "flat", codec, rank, False)
        out[(device, "torch-inline", codec)] = _train(group, device, "torch", codec, rank, True, encoder="inline")
    if dist.is_initialized():
        dist.destroy_process_group()
    group.close()
    return {"device": device, "states": out, "chained": chained, "chained_lanes": chained_lanes,
            "gathered": gathered}


def test_cuda_equals_cpu_for_every_codec_without_host_sync_in_the_hook():
    results = spawn_local(_ranks, 2, timeout=300)
    for rank in range(2):
        device, states = results[rank]["device"], results[rank]["states"]
        assert results[rank]["chained"] == (True, [6.0])
        lanes, all_done, values = results[rank]["chained_lanes"]
        assert all_done and values == [12.0], (lanes, values)  # 1 + 2 = 3, then 6, then 12
        assert results[rank]["gathered"] == [("cuda", [0, 1, 2, 3]), ("cuda", [10, 11, 12, 13])]
        for codec in CODECS:
            ref = states[("cpu", "torch", codec)]
            for path in ("torch", "flat", "torch-inline"):
                got = states[(device, path, codec)]
                for key, value in ref.items():
                    torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5,
                                               msg=lambda m, k=key, p=path, c=codec: f"{c} {p} {k}: {m}")
