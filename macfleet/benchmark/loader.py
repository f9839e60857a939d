"""`macfleet benchmark --type loader`: does the trainer's DataLoader keep the device fed?

`train.py cluster=single` on synthetic CIFAR-format images (the real CIFAR-10 loader with its
random crop and flip per item), once per `--workers` count, rounds interleaved over `--repeats`
and the median kept. Reference: the same run with 0 workers (batches built on the training
thread). JSON rows: {"workers", "model", "batch", "device", "samples_per_s", "step_s", "vs_0_workers"}.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from macfleet.benchmark.ddp import print_and_save, run_train_py, write_synthetic_cifar
from macfleet.errors import ConfigError


def run_loader_benchmark(args) -> int:
    from rich.console import Console
    from rich.table import Table

    try:
        workers = [int(w) for w in (args.workers or "0,2").split(",")]
    except ValueError:
        raise ConfigError(f"--workers {args.workers!r}: give worker counts, e.g. 0,2,4") from None
    if any(w < 0 for w in workers):
        raise ConfigError("--workers: counts must be >= 0")
    if 0 not in workers:
        workers = [0] + workers  # the reference
    console = Console()
    got: dict[int, list[dict]] = {w: [] for w in workers}
    with tempfile.TemporaryDirectory(prefix="macfleet-bench-loader-") as tmp:
        write_synthetic_cifar(args, Path(tmp), args.batch)
        for rep in range(args.repeats):
            for w in workers:
                res = run_train_py(args, Path(tmp), [sys.executable],
                                   ["cluster=single", f"trainer.batch_size={args.batch}", f"trainer.num_workers={w}"])
                got[w].append(res)
                console.print(f"[dim]round {rep + 1}/{args.repeats}: {w} worker(s): {res['samples_per_s']:.0f} samples/s[/dim]")
    med = {w: statistics.median(r["samples_per_s"] for r in v) for w, v in got.items()}
    rows = [{"workers": w, "model": args.model, "batch": args.batch, "device": args.device, "samples_per_s": med[w],
             "step_s": statistics.median(r["step_s"] for r in got[w]), "vs_0_workers": med[w] / med[0],
             "repeats": args.repeats} for w in workers]
    table = Table(title=f"train.py data loading: {args.model} on CIFAR-format data (crop + flip), batch {args.batch}, "
                        f"{args.device}, median of {args.repeats}")
    for col in ("DataLoader workers", "samples/s", "step ms", "vs 0 workers"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["workers"]), f"{r['samples_per_s']:.0f}", f"{1e3 * r['step_s']:.1f}", f"{r['vs_0_workers']:.2f}x")
    return print_and_save(console, table, rows, args.json)
