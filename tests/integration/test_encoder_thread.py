"""compression.encoder=thread: backward's hook hands each bucket to an encoder thread and returns.

Over 2 real processes and the engine's sockets, every codec gives the same bits, residuals and
trained weights with the encoder thread as encoding in the hook, buckets issued back to back
keep their order, the encoding runs on the encoder's thread, and an error in it reaches the
caller through the bucket's future. (On an accelerator `auto` picks the thread; CI has none, so
these force it on CPU. tests/integration/test_cuda_path.py covers auto on CUDA.)"""

from __future__ import annotations

import threading

import pytest
import torch

from macfleet.comm.launch import spawn_local

CODECS = ("fp16", "int8", "topk", "topk_fp16")
BUCKETS = [[("a.weight", 0, 20_000), ("a.bias", 20_000, 7)], [("b.weight", 0, 4_097)],
           [("c.weight", 0, 9_000), ("c.bias", 9_000, 64)]]
STEPS = 3


def _grad(rank: int, step: int, b: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + b)
    return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 4))


def _train(group, rank: int, codec: str, encoder: str, flat_path: bool) -> dict:
    from macfleet.config import CompressionConfig
    from macfleet.ddp import MacFleetDDP

    model = _model()
    ddp = MacFleetDDP(model, group, share=0.5, compression=CompressionConfig(name=codec, ratio=0.25, encoder=encoder),
                      device=torch.device("cpu"), use_torch_ddp=not flat_path, bucket_cap_mb=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(7 + rank)
    for step in range(STEPS):
        ddp.set_step(step)
        opt.zero_grad(set_to_none=True)
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        ddp.finish_gradients()
        opt.step()
    threaded = bool(getattr(ddp.reducer, "_encoder", False))
    ddp.retire()
    return {"weights": {k: v.numpy().copy() for k, v in model.state_dict().items()}, "threaded": threaded}


def _rank(rank, world_size, addrs):
    from macfleet.comm.group import Group
    from macfleet.compression import GradientCompressor
    from macfleet.config import CompressionConfig

    out = {}
    with Group(rank, world_size, addrs, timeout=60.0) as group:
        for codec in CODECS:
            for encoder in ("inline", "thread"):
                comp = GradientCompressor(CompressionConfig(name=codec, ratio=0.05, encoder=encoder), group)
                ran_on = []
                inner = comp.reduce_now

                def recorded(*args, inner=inner, ran_on=ran_on):
                    ran_on.append(threading.get_ident())
                    return inner(*args)

                comp.reduce_now = recorded
                results = []
                for step in range(STEPS):
                    group.set_step(step)
                    flats = [_grad(rank, step, b, segs[-1][1] + segs[-1][2]) * 0.5 for b, segs in enumerate(BUCKETS)]
                    futures = [comp.reduce(f, segs, step) for f, segs in zip(flats, BUCKETS)]  # back to back
                    results.append([fut.wait().numpy().copy() for fut in futures])
                state = comp.state_dict()
                residuals = {k: v.numpy().copy() for k, v in ((state["feedback"] or {}).get("residuals") or {}).items()}
                encoder_ident = comp._encoder.ident if comp._encoder else None
                comp.close()
                out[(codec, encoder)] = {"results": results, "residuals": residuals, "ran_on": set(ran_on),
                                         "caller": threading.get_ident(), "encoder": encoder_ident}
        # An error while encoding reaches the caller through the future, with its own message.
        comp = GradientCompressor(CompressionConfig(name="topk", encoder="thread"), group)
        try:
            comp.reduce(torch.ones(100), [("w", 0, 60)], 0).wait()
            out["error"] = None
        except ValueError as exc:
            out["error"] = str(exc)
        for codec in ("topk_fp16", "int8"):
            for encoder in ("inline", "thread"):
                for flat_path in (False, True):  # PyTorch DDP's path starts its process group, retire() ends it
                    out[("train", codec, encoder, flat_path)] = _train(group, rank, codec, encoder, flat_path)
    return out


@pytest.mark.timeout(240)
def test_the_encoder_thread_gives_the_hooks_bits_in_bucket_order():
    got = spawn_local(_rank, 2, timeout=200.0)
    for rank in range(2):
        r = got[rank]
        for codec in CODECS:
            inline, thread = r[(codec, "inline")], r[(codec, "thread")]
            assert inline["ran_on"] == {inline["caller"]} and inline["encoder"] is None
            assert thread["encoder"] is not None and thread["ran_on"] == {thread["encoder"]} != {thread["caller"]}
            for step in range(STEPS):
                for b in range(len(BUCKETS)):
                    assert (thread["results"][step][b] == inline["results"][step][b]).all(), (codec, step, b, rank)
                    assert (thread["results"][step][b] == got[0][(codec, "thread")]["results"][step][b]).all()
            assert inline["residuals"].keys() == thread["residuals"].keys()
            if codec != "fp16":
                assert inline["residuals"], codec  # lossy codecs keep what they did not send
            for name, res in inline["residuals"].items():
                assert (thread["residuals"][name] == res).all(), (codec, name)
        assert r["error"] is not None and "segments cover 60 of the bucket's 100 elements" in r["error"]
        for codec in ("topk_fp16", "int8"):
            for flat_path in (False, True):
                inline, thread = r[("train", codec, "inline", flat_path)], r[("train", codec, "thread", flat_path)]
                assert not inline["threaded"] and thread["threaded"]
                for key, value in inline["weights"].items():
                    assert (thread["weights"][key] == value).all(), (codec, flat_path, key, rank)
                    assert (thread["weights"][key] == got[0][("train", codec, "thread", flat_path)]["weights"][key]).all()


def _redo_rank(rank, world_size, addrs):
    from macfleet.comm.group import Group
    from macfleet.compression import GradientCompressor
    from macfleet.config import CompressionConfig

    def residuals(comp):
        return {k: v.numpy().copy() for k, v in comp.feedback.residuals.items()}

    def step(comp, group, s, wait=True):
        group.set_step(s)
        flats = [_grad(rank, s, b, segs[-1][1] + segs[-1][2]) * 0.5 for b, segs in enumerate(BUCKETS)]
        futures = [comp.reduce(f, segs, s) for f, segs in zip(flats, BUCKETS)]
        return [f.wait().numpy().copy() for f in futures] if wait else futures

    out = {}
    with Group(rank, world_size, addrs, timeout=60.0) as group:
        for encoder in ("inline", "thread"):
            comp = GradientCompressor(CompressionConfig(name="topk", ratio=0.05, encoder=encoder), group, redoable=True)
            step(comp, group, 0)
            comp.settle()
            before = residuals(comp)
            futures = step(comp, group, 1, wait=False)
            comp.rollback()  # at once: the buckets may still be queued on the encoder thread
            for f in futures:
                f.wait()
            after_rollback = residuals(comp)
            redone = step(comp, group, 1)  # the step again, from the same residuals
            comp.settle()
            out[encoder] = {"before": before, "after_rollback": after_rollback, "redone": redone,
                            "final": residuals(comp)}
            comp.close()
    return out


@pytest.mark.timeout(120)
def test_a_rollback_waits_for_buckets_still_queued_on_the_encoder():
    got = spawn_local(_redo_rank, 2, timeout=100.0)
    for rank in range(2):
        inline, thread = got[rank]["inline"], got[rank]["thread"]
        for name, value in thread["before"].items():
            # Step 1's residual updates were undone, even those of buckets encoded after rollback() was called.
            assert (thread["after_rollback"][name] == value).all(), name
            assert (thread["final"][name] == inline["final"][name]).all(), name
        for b in range(len(BUCKETS)):
            assert (thread["redone"][b] == inline["redone"][b]).all(), b
