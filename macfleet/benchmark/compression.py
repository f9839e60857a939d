"""`macfleet benchmark --type compression`: what each codec costs and what it saves, measured.

Two tables from one run (every figure a median of `--repeats` timed runs after a warm-up):
1. Codec cost, on `--device` with one CPU thread: per model parameter count (ResNet-50 25.6M,
   ViT-Base 86M, GPT-2 124M) and codec, the wire ratio (payload bytes / dense fp32 bytes), the
   compress time (selection + packing, i.e. `codec.encode`) and the decompress time (zero a
   reused buffer + `codec.decode_add` without validation, what each node's device does per
   received payload; validation runs on the host copy, off the device).
2. all_reduce time on a local fleet (`--nodes` processes on this machine, one CPU thread each,
   gradients on `--device`, a GPU per rank where there are several): per model and codec,
   ResNet-50 as DDP's hook sees it (its real parameters in 25 MB buckets, issued back to back),
   the others as one bucket, one `GradientCompressor.reduce` of the whole gradient as one bucket,
   dense (`none`) beside compressed, timed on rank 0 between barriers.
Codecs are listed as name[:granularity], e.g. `--codecs none,fp16,int8,topk,topk_fp16,topk:element`;
the gradient is synthetic (normal values with a log-normal scale per 64-element block, so block
norms differ as they do across a real layer). JSON rows: {"table", "codec", "granularity",
"model", "params", "ratio", "wire_ratio", "compress_s", "decompress_s", "allreduce_s",
"dense_allreduce_s", "nodes", "device"}.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from macfleet.errors import ConfigError

MODELS = {"resnet50": 25_557_032, "vit_base": 86_567_656, "gpt2": 124_439_808}
"""Parameter counts (torchvision resnet50, timm vit_base_patch16_224, HF gpt2)."""


BUCKET_CAP = 25 << 20
"""PyTorch DDP's default bucket_cap_mb, in bytes of fp32 gradient."""


def model_buckets(model: str, n: int) -> list[tuple[int, int, list]]:
    """(start, end, segments) of the gradient's buckets as DDP's hook sees them: for resnet50 its
    real parameters (CIFAR stem, shapes built on the meta device, no memory), last layer first,
    in buckets of at most BUCKET_CAP; any other model is one bucket of one segment."""
    if model != "resnet50":
        return [(0, n, [(model, 0, n)])]
    from macfleet.models.resnet import resnet50

    with torch.device("meta"):
        net = resnet50(num_classes=1000, in_channels=3, cifar_stem=True)
    params = [(name, p.numel()) for name, p in net.named_parameters()][::-1]
    total = sum(k for _, k in params)
    scale = n / total  # MODELS counts torchvision's 7x7 stem; the CIFAR stem is a little smaller
    out, start, segs, size = [], 0, [], 0
    for name, k in params:
        if segs and (size + k) * 4 > BUCKET_CAP:
            out.append((start, start + size, segs))
            start, segs, size = start + size, [], 0
        segs.append((name, size, k))
        size += k
    out.append((start, start + size, segs))
    assert abs(scale - 1) < 0.05, scale
    last_start, last_end, last_segs = out[-1]
    if last_end < n:  # pad the last bucket's last segment so the buckets cover all n elements
        name, off, k = last_segs[-1]
        last_segs[-1] = (name, off, k + n - last_end)
        out[-1] = (last_start, n, last_segs)
    return out


def parse_codecs(text: str, ratio: float) -> list:
    """'none,topk:element' -> CompressionConfigs (granularity defaults to block)."""
    from macfleet.config import CompressionConfig

    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, _, gran = item.partition(":")
        out.append(CompressionConfig(name=name, ratio=ratio, granularity=gran or "block"))
    if not out:
        raise ConfigError("--codecs is empty; e.g. --codecs none,fp16,topk,topk_fp16")
    return out


def parse_models(text: str) -> dict[str, int]:
    out = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item in MODELS:
            out[item] = MODELS[item]
        elif item.replace("_", "").isdigit():
            out[item] = int(item)
        else:
            raise ConfigError(f"--models item {item!r}: use {', '.join(MODELS)} or a parameter count")
    return out


def label(cfg) -> str:
    return cfg.name if cfg.name in ("none", "fp16", "int8") or cfg.granularity == "block" else f"{cfg.name}:{cfg.granularity}"


def synthetic_gradient(n: int, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    blocks = -(-n // 64)
    scale = torch.exp(torch.randn(blocks, generator=g)).repeat_interleave(64)[:n]
    return x.mul_(scale).to(device)


def _sync(device: str):
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    if device == "mps":
        return torch.mps.synchronize
    return lambda: None


def _median(fn, repeats: int, sync) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def codec_costs(models: dict[str, int], codecs: list, repeats: int, device: str) -> list[dict]:
    """Table 1 rows."""
    from macfleet.compression import build_codec

    torch.set_num_threads(1)
    sync = _sync(device)
    rows = []
    for model, n in models.items():
        x = synthetic_gradient(n, device)
        out = torch.empty(n, device=device)
        for cfg in codecs:
            codec = build_codec(cfg)
            payload = codec.encode(x)
            # validated once here: a node validates the host copies the engine receives, so the
            # timed decode is the device work alone (check=False).
            codec.decode_add(payload, out.zero_())
            compress_s = _median(lambda: codec.encode(x), repeats, sync)
            decompress_s = _median(lambda: codec.decode_add(payload, out.zero_(), check=False), repeats, sync)
            kept = float((out != 0).sum()) / n if codec.selects else 1.0
            rows.append({"table": "codec", "codec": label(cfg), "granularity": cfg.granularity, "model": model,
                         "params": n, "ratio": cfg.ratio if codec.selects else 1.0, "kept": kept,
                         "wire_ratio": codec.payload_nbytes(payload) / (4 * n),
                         "compress_s": compress_s, "decompress_s": decompress_s, "device": device})
            del payload
        del x, out
    return rows


def _fleet_rank(rank: int, world_size: int, addrs: list[str], models: dict[str, int], codecs: list,
                repeats: int, device: str = "cpu") -> list[dict]:
    from macfleet.comm.group import Group
    from macfleet.compression import GradientCompressor

    if device.startswith("cuda"):
        device = f"cuda:{rank % torch.cuda.device_count()}"  # a GPU per rank where there are several
        torch.cuda.set_device(device)
    sync = _sync(device)
    rows = []
    with Group(rank, world_size, addrs, timeout=300.0) as group:
        for model, n in models.items():
            src = synthetic_gradient(n, device, seed=rank).mul_(1.0 / world_size)
            flat = torch.empty_like(src)
            buckets = model_buckets(model, n)
            for cfg in codecs:
                comp = GradientCompressor(cfg, group)
                times = []
                for i in range(repeats + 1):
                    flat.copy_(src)  # reduce overwrites the buckets in place
                    sync()
                    group.barrier()
                    t0 = time.perf_counter()
                    # every bucket issued back to back, as DDP's hook does, then all waited for
                    futures = [comp.reduce(flat[a:b], segs, step=i) for a, b, segs in buckets]
                    for fut in futures:
                        fut.wait()
                    sync()
                    if i:  # the first run is the warm-up
                        times.append(time.perf_counter() - t0)
                rows.append({"codec": label(cfg), "model": model, "allreduce_s": statistics.median(times),
                             "fleet_wire_ratio": comp.wire_ratio, "buckets": len(buckets),
                             "segments": sum(len(segs) for _, _, segs in buckets)})
            del src, flat
    return rows


def fleet_allreduce(models: dict[str, int], codecs: list, repeats: int, nodes: int,
                    netns: bool = False, rate: str | None = None, device: str = "cpu") -> list[dict]:
    """Table 2 rows (rank 0's timings); with netns, ranks sit in namespaces over veth (root),
    optionally shaped to `rate` - the slow-link case compression is for."""
    from macfleet.comm.launch import Netns, spawn_local

    fn_args = (models, codecs, repeats, device)
    if netns:
        with Netns(nodes, rate=rate) as ns:
            return spawn_local(_fleet_rank, nodes, fn_args, timeout=1800.0, netns=ns, port=29700)[0]
    return spawn_local(_fleet_rank, nodes, fn_args, timeout=1800.0)[0]


def run_compression_benchmark(args) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    models = parse_models(args.models)
    codecs = parse_codecs(args.codecs or "none,fp16,int8,topk,topk_fp16", args.ratio)
    repeats = int(args.repeats)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: no MPS device here; use --device cpu")

    console.print(f"codec cost on {device}, 1 CPU thread, median of {repeats}, top-k ratio {args.ratio}")
    rows = codec_costs(models, codecs, repeats, device)
    t1 = Table(title=f"codec cost ({device}, 1 thread); wire = payload / dense fp32 bytes")
    for col in ("model", "params", "codec", "kept", "wire", "encode ms", "decode ms"):
        t1.add_column(col, justify="left" if col in ("model", "codec") else "right")
    for r in rows:
        t1.add_row(r["model"], f"{r['params'] / 1e6:.1f}M", r["codec"], f"{100 * r['kept']:.2f}%",
                   f"{100 * r['wire_ratio']:.2f}%", f"{1e3 * r['compress_s']:.1f}", f"{1e3 * r['decompress_s']:.1f}")
    console.print(t1)

    nodes = int(args.nodes)
    fleet = {}
    if nodes > 1:
        where = ("network namespaces over veth" + (f" shaped to {args.rate}" if args.rate else "")
                 if args.netns else "127.0.0.1")
        console.print(f"all_reduce on a local fleet of {nodes} ranks ({where}, {device} tensors, 1 CPU thread each)...")
        rows2 = fleet_allreduce(models, codecs, repeats, nodes, netns=args.netns, rate=args.rate, device=device)
        fleet = {(r["codec"], r["model"]): r for r in rows2}
        t2 = Table(title=f"all_reduce of one whole-model bucket, {nodes} ranks on {where} (rank 0, median)")
        for col in ("model", "codec", "all_reduce ms", "vs none"):
            t2.add_column(col, justify="left" if col in ("model", "codec") else "right")
        for model in models:
            dense = fleet.get(("none", model))
            for cfg in codecs:
                r = fleet[(label(cfg), model)]
                speed = f"{dense['allreduce_s'] / r['allreduce_s']:.2f}x" if dense else "-"
                t2.add_row(model, label(cfg), f"{1e3 * r['allreduce_s']:.1f}", speed)
        console.print(t2)
    for r in rows:
        f = fleet.get((r["codec"], r["model"]), {})
        dense = fleet.get(("none", r["model"]), {})
        r.update({"allreduce_s": f.get("allreduce_s"), "dense_allreduce_s": dense.get("allreduce_s"),
                  "nodes": nodes, "link": (args.rate or "veth") if args.netns else "loopback"})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
        console.print(f"wrote {len(rows)} rows to {args.json}")
    return 0
