"""The flat path (no PyTorch DDP, as on MPS) overlaps its reductions with backward and computes
what the PyTorch DDP path computes, in 2 real processes over the engine."""

from __future__ import annotations

import torch

from macfleet.comm.launch import spawn_local

STEPS = 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )


def _train(group, path: str, codec: str, rank: int) -> dict:
    from macfleet.config import CompressionConfig
    from macfleet.ddp import MacFleetDDP

    model = _model()
    share = (0.25, 0.75)[rank]
    # 0.2 MB buckets: each 256x256 layer is a bucket of its own, so backward produces 4+.
    ddp = MacFleetDDP(model, group, share=share, compression=CompressionConfig(name=codec, ratio=0.25),
                      device=torch.device("cpu"), use_torch_ddp=path == "torch", bucket_cap_mb=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(7)
    launched_in_backward, buckets = [], None
    for step in range(STEPS):
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        lo, hi = (0, 4) if rank == 0 else (4, 16)  # the shares of one global batch of 16
        ddp.set_step(step)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(ddp(x[lo:hi]), y[lo:hi])
        loss.backward()
        if path == "flat":
            buckets = len(ddp._buckets.buckets)
            launched_in_backward.append(len(ddp._buckets.launch_times))
        ddp.finish_gradients()
        opt.step()
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "launched_in_backward": launched_in_backward, "buckets": buckets}


def _ranks(rank, world_size, addrs):
    import torch.distributed as dist

    from macfleet.comm import Group
    from macfleet.comm.backend import init_process_group_from_group

    group = Group(rank, world_size, addrs, timeout=60)
    init_process_group_from_group(group)
    out = {}
    for codec in ("none", "topk_fp16"):
        for path in ("flat", "torch"):
            out[(path, codec)] = _train(group, path, codec, rank)
    dist.destroy_process_group()
    group.close()
    return out


def _one_process(codec: str) -> dict:
    from macfleet.config import CompressionConfig
    from macfleet.ddp import MacFleetDDP

    model = _model()
    ddp = MacFleetDDP(model, None, share=1.0, compression=CompressionConfig(name=codec, ratio=0.25),
                      device=torch.device("cpu"), bucket_cap_mb=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(7)
    for step in range(STEPS):
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        ddp.set_step(step)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        ddp.finish_gradients()
        opt.step()
    return model.state_dict()


def test_flat_path_overlaps_backward_and_equals_torch_ddp():
    results = spawn_local(_ranks, 2, timeout=180)
    for rank in range(2):
        for codec in ("none", "topk_fp16"):
            flat = results[rank][("flat", codec)]
            # Every bucket was handed to the engine while backward ran, none by finish_gradients.
            assert flat["buckets"] >= 4
            assert flat["launched_in_backward"] == [flat["buckets"]] * STEPS
            ref = results[rank][("torch", codec)]["state"]
            for key, value in ref.items():
                torch.testing.assert_close(flat["state"][key], value, rtol=1e-6, atol=1e-7, msg=f"{rank} {codec} {key}")
            other = results[1 - rank][("flat", codec)]["state"]
            assert all(torch.equal(flat["state"][k], other[k]) for k in ref), "replicas differ"
    # Dense: the fleet equals one process on the global batch of 16.
    single = _one_process("none")
    for key, value in single.items():
        torch.testing.assert_close(results[0][("flat", "none")]["state"][key], value, rtol=1e-5, atol=1e-6)
