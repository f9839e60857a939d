"""`macfleet benchmark --type ddp`: plain PyTorch DDP under torchrun, per backend, beside one node.

The question a user with an existing DDP script asks: "is the macfleet backend as fast as the
stock ones?". Each run is the real thing: `torchrun --nproc-per-node N -m macfleet.benchmark.ddp`
starts N processes of an unmodified DDP training loop (ResNet with the CIFAR stem on 32x32
synthetic batches already on the device, SGD with momentum); only the backend name changes.
Every rank gets its own GPU (`--device cuda`, rank i on GPU i mod count) and, with
`--cores-per-node`, its own cores. The reference is the same loop in one process (world size 1).
Runs are interleaved over `--repeats` rounds and the median is reported, so drift hits every
backend alike. A backend may carry engine settings, measured as one more backend of the same run:
`macfleet:stripes=2` (MACFLEET_STRIPES), `macfleet:allreduce=direct` (MACFLEET_ALLREDUCE),
`macfleet:transport=zmq` (MACFLEET_TRANSPORT), or
both, `macfleet:stripes=2:allreduce=direct`; `--train-py` runs the plain names only. JSON rows: {"backend", "nodes", "device", "model", "batch_per_rank",
"samples_per_s", "step_s", "vs_one_node", "vs_gloo", "repeats", "interrupted"}.

Ctrl-C or SIGTERM (a `timeout` around a long run; see `sigterm_interrupts`) stops the run in
progress with all its ranks and reports the rounds that completed (the exit status is still
130); before any round completed there is nothing to report.
"""

from __future__ import annotations

import argparse
import json
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from macfleet.errors import ConfigError

MODELS = ("resnet18", "resnet50")
VARIANT_ENV = {"stripes": "MACFLEET_STRIPES", "allreduce": "MACFLEET_ALLREDUCE", "transport": "MACFLEET_TRANSPORT",
               "lanes": "MACFLEET_LANES"}
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ----------------------------------------------------------------------------- the DDP script
def _worker(argv: list[str]) -> None:
    """One rank of a plain DDP loop (what a user's script does); rank 0 writes the result."""
    p = argparse.ArgumentParser()
    p.add_argument("--backend", required=True)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cores-per-node", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if a.cores_per_node:
        first = local_rank * a.cores_per_node
        os.sched_setaffinity(0, range(first, first + a.cores_per_node))
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from macfleet.models import resnet

    if a.cores_per_node:
        torch.set_num_threads(a.cores_per_node)
    if a.device == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device(a.device)
    dist.init_process_group(a.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = getattr(resnet, a.model)(num_classes=10, in_channels=3, cifar_stem=True).to(device)
    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(a.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            sync()
            dist.barrier()
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    sync()
    elapsed = time.perf_counter() - start
    times = [None] * world
    dist.all_gather_object(times, elapsed)
    if rank == 0:
        slowest = max(times)
        engine = {}
        if a.backend == "macfleet":  # what this rank's pinned cores and the environment gave the engine
            from macfleet.comm.group import default_lanes
            from macfleet.comm.tcp import default_transport

            engine = {"transport": default_transport(), "lanes": default_lanes()}
        Path(a.out).write_text(json.dumps({"samples_per_s": a.batch * world * a.steps / slowest,
                                           "step_s": slowest / a.steps, **engine}))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the driver
def backend_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'macfleet:stripes=2:allreduce=direct' -> ('macfleet', {'MACFLEET_STRIPES': '2', 'MACFLEET_ALLREDUCE': 'direct'})."""
    name, *opts = spec.split(":")
    env = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if name != "macfleet" or not sep or key not in VARIANT_ENV or not value:
            raise ConfigError(f"--backends item {spec!r}: engine settings go as macfleet:stripes=N, "
                              "macfleet:allreduce=auto|ring|direct, macfleet:transport=tcp|zmq, macfleet:lanes=N, or several "
                              "(macfleet:stripes=2:allreduce=direct)")
        env[VARIANT_ENV[key]] = value
    return name, env


def _check(args) -> list[str]:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else (
        ["nccl", "gloo", "macfleet"] if args.device == "cuda" else ["gloo", "macfleet"])
    names = [backend_spec(b)[0] for b in backends]
    if args.model not in MODELS:
        raise ConfigError(f"--model {args.model!r}: choose one of {', '.join(MODELS)}")
    if args.nodes < 2:
        raise ConfigError("--nodes must be at least 2 (one node is the reference every backend is compared with)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but PyTorch sees no CUDA GPU here; use --device cpu")
    elif "nccl" in names:
        raise ConfigError("the nccl backend needs --device cuda")
    if args.cores_per_node and args.cores_per_node * args.nodes > (os.cpu_count() or 1):
        raise ConfigError(f"--cores-per-node {args.cores_per_node} x {args.nodes} nodes needs "
                          f"{args.cores_per_node * args.nodes} cores; this machine has {os.cpu_count()}")
    return backends


def _run_once(args, backend: str, nodes: int, workdir: Path, port: int) -> dict:
    name, variant = backend_spec(backend)
    out = workdir / f"{name}-{nodes}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nodes),
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "macfleet.benchmark.ddp",
           "--backend", name, "--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(10 if args.warmup_steps is None else args.warmup_steps), "--device", args.device, "--cores-per-node", str(args.cores_per_node or 0),
           "--out", str(out)]
    env = {**os.environ, **NCCL_ENV, "OMP_NUM_THREADS": str(args.cores_per_node or 1), **variant}
    proc = _run_child(cmd, env, args.timeout, f"the {backend} run on {nodes} node(s)")
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ConfigError(f"the {backend} run on {nodes} node(s) failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def _run_child(cmd: list[str], env: dict, timeout: float, what: str) -> subprocess.CompletedProcess:
    """Run a torchrun (or train.py) in a process group of its own, so that stopping it (the
    benchmark interrupted, or past --timeout) stops every rank it started, not torchrun alone."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        raise ConfigError(f"{what} took longer than --timeout {timeout:g} s; it was stopped (give a larger "
                          "--timeout, or fewer --steps)") from None
    except BaseException:
        _stop_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's whole process group (torchrun forwards it to its ranks), then
    SIGKILL to whatever is left after 10 s or outlived torchrun."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10.0)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run_train_py(args, backend: str, nodes: int, workdir: Path, port: int) -> dict:
    """`torchrun train.py cluster=torchrun` with the plain loop's model, global batch and steps."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nodes),
                "--master-addr", "127.0.0.1", "--master-port", str(port)]
    return run_train_py(args, workdir, torchrun, ["cluster=torchrun", f"cluster.backend={backend}",
                                                  f"trainer.batch_size={args.batch * nodes}", "trainer.num_workers=4"])


def write_synthetic_cifar(args, workdir: Path, global_batch: int) -> None:
    """Enough CIFAR-format images (never a download) for every step of one run in one epoch."""
    from macfleet.data.cifar10 import write_cifar_format

    steps = (10 if args.warmup_steps is None else args.warmup_steps) + args.steps
    write_cifar_format(workdir / "data", train_per_batch=-(-global_batch * steps // 5), test_size=64)


def run_train_py(args, workdir: Path, prefix: list[str], overrides: list[str]) -> dict:
    """train.py on the synthetic CIFAR data in `workdir`, `args.steps` timed after the warm-up;
    metrics.json's samples/s and step time. `prefix` launches it (torchrun, or plain python)."""
    from macfleet.benchmark.scaling import ROOT

    run_dir = workdir / f"train-{time.monotonic_ns()}"
    warmup = 10 if args.warmup_steps is None else args.warmup_steps
    total = warmup + args.steps
    cmd = [*prefix, str(ROOT / "train.py"), f"model={args.model}", "dataset=cifar10",
           f"dataset.root={workdir / 'data'}", "dataset.download=false", "dataset.verify_checksums=false",
           "compression=none", "logger=none", f"trainer.max_steps={total}", f"trainer.epochs={total}",
           f"trainer.log_every={total}", f"trainer.timing_warmup_steps={warmup}", f"trainer.device={args.device}",
           "trainer.resume=none", "trainer.progress=false", "trainer.checkpoint_every=0", f"hydra.run.dir={run_dir}",
           *overrides]
    env = {**os.environ, **NCCL_ENV, "OMP_NUM_THREADS": str(args.cores_per_node or 1)}
    proc = _run_child(cmd, env, args.timeout, f"train.py {' '.join(overrides)}")
    metrics = run_dir / "metrics.json"
    if proc.returncode != 0 or not metrics.exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ConfigError(f"train.py {' '.join(overrides)} failed (exit {proc.returncode}):\n{tail}")
    m = json.loads(metrics.read_text())
    return {"samples_per_s": m["samples_per_s"], "step_s": m["step_s"]}


def run_ddp_benchmark(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from macfleet.comm.launch import free_ports

    backends = _check(args)
    console = Console()
    runs = [("gloo", 1)] + [(b, args.nodes) for b in backends]
    if getattr(args, "train_py", False):
        runs += [(f"train.py:{b}", args.nodes) for b in backends if ":" not in b]
    got: dict[tuple[str, int], list[dict]] = {r: [] for r in runs}
    rounds, interrupted = 0, False
    with tempfile.TemporaryDirectory(prefix="macfleet-bench-ddp-") as tmp:
        try:
            if getattr(args, "train_py", False):
                write_synthetic_cifar(args, Path(tmp), args.batch * args.nodes)
            for rep in range(args.repeats):
                for backend, nodes in runs:
                    if backend.startswith("train.py:"):
                        res = _run_train_py(args, backend.split(":", 1)[1], nodes, Path(tmp), free_ports(1)[0])
                    else:
                        res = _run_once(args, backend, nodes, Path(tmp), free_ports(1)[0])
                    got[(backend, nodes)].append(res)
                    console.print(f"[dim]round {rep + 1}/{args.repeats}: {backend} x{nodes}: "
                                  f"{res['samples_per_s']:.0f} samples/s[/dim]")
                rounds += 1
        except KeyboardInterrupt:
            interrupted = True
            if not rounds:
                console.print("interrupted before a round completed: nothing to report")
                return 130
            console.print(f"interrupted in round {rounds + 1} of {args.repeats}: the table has the {rounds} "
                          "complete round(s) (a partial round would favour the backends that ran first)",
                          soft_wrap=True)
            for r in got:
                del got[r][rounds:]
    med = {r: statistics.median(x["samples_per_s"] for x in v) for r, v in got.items()}
    one = med[("gloo", 1)]
    gloo = med.get(("gloo", args.nodes))
    rows = []
    for backend, nodes in runs:
        sps = med[(backend, nodes)]
        label = f"train.py cluster=torchrun, {backend[9:]}" if backend.startswith("train.py:") else backend
        engine = got[(backend, nodes)][0]
        if "lanes" in engine:
            label += f" ({engine['transport']}" + (f" + {engine['lanes']} tcp lanes)" if engine["lanes"] > 1 else ")")
        rows.append({"backend": "none (1 process)" if nodes == 1 else label, "nodes": nodes, "device": args.device,
                     "model": args.model, "batch_per_rank": args.batch, "samples_per_s": sps,
                     "step_s": statistics.median(x["step_s"] for x in got[(backend, nodes)]),
                     "vs_one_node": sps / one, "vs_gloo": (sps / gloo) if gloo and nodes > 1 else None,
                     "vs_plain_ddp": (sps / med[(backend[9:], nodes)]) if backend.startswith("train.py:") else None,
                     "repeats": rounds, "interrupted": interrupted, "transport": engine.get("transport"),
                     "lanes": engine.get("lanes")})
    table = Table(title=f"plain DDP under torchrun: {args.model}, {args.batch} per rank, {args.device}, "
                        f"median of {rounds}" + (f" (interrupted: {rounds} of {args.repeats} rounds)" if interrupted
                                                 else ""))
    for col in ("backend", "nodes", "samples/s", "vs 1 node", "vs gloo", "vs plain DDP, same backend"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r in rows:
        table.add_row(r["backend"], str(r["nodes"]), f"{r['samples_per_s']:.0f}", f"{r['vs_one_node']:.2f}x",
                      "" if r["vs_gloo"] is None else f"{r['vs_gloo']:.2f}x",
                      "" if r["vs_plain_ddp"] is None else f"{r['vs_plain_ddp']:.2f}x")
    code = print_and_save(console, table, rows, args.json)
    return 130 if interrupted else code


def print_and_save(console, table, rows: list[dict], path: str | None) -> int:
    """Print the table; write the rows as JSON when asked."""
    console.print(table)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rows, indent=2))
        console.print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    _worker(sys.argv[1:])
