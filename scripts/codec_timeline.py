"""When each bucket of a compressed all_reduce is handed over and when its result is back.

    python scripts/codec_timeline.py --device cuda --codecs none,fp16,topk_fp16
    python scripts/codec_timeline.py --device cuda --encoder inline

Starts 2 local ranks (one GPU each where there are several). Each reduces ResNet-50's
gradient in DDP's buckets, as `macfleet benchmark --type compression` does, every bucket issued
back to back and then all waited for. For the last --show iterations, rank 0 prints per bucket
the milliseconds from the first issue to `reduce` returning ("issued") and to its future
completing ("done"), and each bucket's size and parameter count. On an encoder thread, "done"
rising by a fixed step per bucket, whatever the bucket's size, means a cost per bucket on the
host (kernel launches, Python), not bytes. `--trace DIR` also records rank 0's last iteration
of each codec with torch.profiler (a Chrome trace per codec in DIR) and prints how many CUDA
runtime calls each thread made and how long the GPU was busy.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _rank(rank, world_size, addrs, device, codecs, encoder, iters, show, trace):
    from macfleet.benchmark.compression import model_buckets, parse_models, synthetic_gradient
    from macfleet.comm.group import Group
    from macfleet.compression import GradientCompressor
    from macfleet.config import CompressionConfig
    from macfleet.device import synchronize

    if device == "cuda":
        device = f"cuda:{rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    n = parse_models("resnet50")["resnet50"]
    buckets = model_buckets("resnet50", n)
    lines = [f"buckets: {[f'{(b - a) * 4 / 1e6:.1f} MB, {len(segs)} params' for a, b, segs in buckets]}"]
    with Group(rank, world_size, addrs, timeout=300.0) as group:
        src = synthetic_gradient(n, device, seed=rank).mul_(1.0 / world_size)
        flat = torch.empty_like(src)
        for name in codecs:
            comp = GradientCompressor(CompressionConfig(name=name, encoder=encoder), group)
            for i in range(iters):
                flat.copy_(src)
                synchronize(torch.device(device))
                group.barrier()
                prof = _profiler() if trace and rank == 0 and i == iters - 1 else None
                t0 = time.perf_counter()
                issued, marks = [], []
                for a, b, segs in buckets:
                    fut = comp.reduce(flat[a:b], segs, step=i)
                    issued.append(1e3 * (time.perf_counter() - t0))
                    # completes once the stamp is taken, so waiting for it sees every stamp
                    marks.append(fut.then(lambda f: (f.value(), 1e3 * (time.perf_counter() - t0))[1]))
                done = [m.wait() for m in marks]
                synchronize(torch.device(device))
                total = 1e3 * (time.perf_counter() - t0)
                if prof is not None:
                    prof.__exit__(None, None, None)
                    lines.append(_trace_summary(prof, f"{trace}/codec-{name}-{encoder}.json", name))
                if i >= iters - show:
                    fmt = lambda xs: " ".join(f"{x:6.2f}" for x in xs)  # noqa: E731
                    lines.append(f"{name:>10} #{i}: issued {fmt(issued)} | done {fmt(done)} | all {total:6.2f} ms")
    return lines


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities)
    prof.__enter__()
    return prof


def _trace_summary(prof, path: str, name: str) -> str:
    import collections
    import json

    prof.export_chrome_trace(path)
    with open(path) as fh:
        events = [e for e in json.load(fh)["traceEvents"] if e.get("ph") == "X"]
    calls = collections.Counter(e.get("tid") for e in events if e.get("cat") == "cuda_runtime")
    busy = sum(e["dur"] for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")) / 1e3
    per_thread = ", ".join(f"thread {tid}: {n}" for tid, n in calls.most_common())
    return f"{name:>10} traced ({path}): GPU busy {busy:.2f} ms; CUDA runtime calls by thread: {per_thread or 'none'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda", "mps"))
    p.add_argument("--codecs", default="none,fp16,topk_fp16")
    p.add_argument("--encoder", default="auto", choices=("auto", "thread", "inline"))
    p.add_argument("--iters", type=int, default=8, help="iterations per codec, the first ones warm-up")
    p.add_argument("--show", type=int, default=2, help="print the last SHOW iterations")
    p.add_argument("--trace", default=None, metavar="DIR", help="write a torch.profiler trace of the last iteration here")
    args = p.parse_args()
    if not 1 <= args.show <= args.iters:
        p.error("--show must be between 1 and --iters")
    from macfleet.comm.launch import spawn_local

    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
    out = spawn_local(_rank, 2, (args.device, codecs, args.encoder, args.iters, args.show, args.trace), timeout=600.0)
    print(f"rank 0, {args.device}, encoder={args.encoder}, ms from the first bucket's issue")
    print("\n".join(out[0]))


if __name__ == "__main__":
    main()
