"""`macfleet benchmark --type convergence`: wall time to a target test accuracy, per codec.

The figure that decides whether compression is worth it: a codec that sends fewer bytes makes
steps faster but may need more of them. Every run is the real product, as in `--type scaling`
(whose nodes, cores, CPU quotas, namespaces and shaped links this reuses): a fleet of `--nodes`
runs `python train.py` (node 0 the master) for `trainer.epochs` epochs (a trailing override,
default 10), once per codec (`--codecs`, default none,fp16,topk_fp16,auto), with the same
seed, model, data and global batch. Every epoch ends with a test evaluation; its time is read
from rank 0's train.log (the "epoch N: ... test accuracy A" line) and counted from the line
that says the fleet is formed ("rank 0 of N"), so a node's start-up and join do not count and
auto's probe does. Time to target = the first evaluation at or above `--target`.
Before the fleet, the peers (`--backends`, as in `--type scaling`: default gloo, nccl,gloo on
cuda) train the same job under torchrun (`train.py cluster=torchrun`, compression none) on the
same nodes, timed the same way from rank 0's train.log; a peer whose run fails is a line, and
the fleet runs without it.

JSON rows, one per peer ("run": "torchrun", "backend": its name, "codec": "none"), then one per
codec ("run": "fleet", "backend": "macfleet"): {"type", "run", "backend", "model", "dataset",
"global_batch", "epochs", "device", "link", "nodes", "target", "codec", "ran" (the codec that
ran: auto's choice), "auto_reason",
"reached", "time_to_target_s", "epochs_to_target", "final_accuracy", "best_accuracy",
"train_s" (to the last evaluation), "startup_s" (launch to the fleet formed, rank 0),
"samples_per_s", "wire_ratio", "curve": [{"epoch", "wall_s", "accuracy"}]}.
"""

from __future__ import annotations

import contextlib
import re
from datetime import datetime

from macfleet.benchmark.scaling import (CpuQuotas, Run, _compose, _namespaces, _overrides, _wait, bench_dir,
                                        check_can_run, fleet_run, parse_codecs, parse_overrides, parse_peers,
                                        peer_overrides, peer_run, plan_nodes, removed_unless_failed, report,
                                        run_label, run_name, wait_peer)
from macfleet.errors import ConfigError, MacFleetError

CONTROLLED = {
    "cluster": "--nodes / --netns", "compression": "--codecs", "trainer.device": "--device",
    "trainer.resume": "(always none)", "trainer.max_steps": "trainer.epochs", "hydra.run.dir": "(a benchmark folder)",
    "cluster.role": "--nodes", "cluster.mode": "--nodes", "cluster.nodes": "--nodes", "cluster.master_addr": "--netns",
    "cluster.master_port": "--netns", "cluster.tensor_port": "--netns", "cluster.host": "--netns",
}
DEFAULTS = {"trainer.progress": "false", "trainer.checkpoint_every": "0", "trainer.checkpoint_every_steps": "0",
            "logger": "none", "cluster.weights": "null", "cluster.heartbeat_interval": "2.0"}
_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
_EPOCH = re.compile(r"\] - epoch (\d+): .*test accuracy ([0-9.]+)")


def _when(line: str) -> float | None:
    m = _STAMP.match(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def read_curve(log_text: str) -> tuple[float, list[dict]]:
    """(the time the fleet formed, [{"epoch", "wall_s", "accuracy"}]) from rank 0's train.log;
    wall_s counts from the fleet's forming, epoch is the number of epochs done."""
    formed, curve = None, []
    for line in log_text.splitlines():
        if formed is None and " | rank 0 of " in line:
            formed = _when(line)
            continue
        m = _EPOCH.search(line)
        if m and formed is not None:
            curve.append({"epoch": int(m.group(1)), "wall_s": round(_when(line) - formed, 3),
                          "accuracy": float(m.group(2))})
    if formed is None:
        raise MacFleetError("rank 0's train.log has no 'rank 0 of N' line: the fleet never formed")
    return formed, curve


def convergence_row(setup: dict, codec: str, target: float, metrics: dict, curve: list[dict],
                    startup_s: float, run: str = "fleet", backend: str = "macfleet") -> dict:
    """One JSON row (see the module docstring) from a run's metrics.json and its curve."""
    hit = next((p for p in curve if p["accuracy"] >= target), None)
    accs = [p["accuracy"] for p in curve]
    return {**setup, "run": run, "backend": backend, "target": target, "codec": codec, "ran": metrics.get("compression"),
            "auto_reason": metrics.get("compression_auto_reason"), "reached": hit is not None,
            "time_to_target_s": hit["wall_s"] if hit else None, "epochs_to_target": hit["epoch"] if hit else None,
            "final_accuracy": accs[-1] if accs else None, "best_accuracy": max(accs) if accs else None,
            "train_s": curve[-1]["wall_s"] if curve else None, "startup_s": startup_s,
            "samples_per_s": metrics.get("samples_per_s"), "wire_ratio": metrics.get("wire_ratio"), "curve": curve}


def run_convergence_benchmark(args) -> int:
    import time

    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    codecs = parse_codecs(args.codecs or "none,fp16,topk_fp16,auto")
    target = float(args.target)
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"--target {args.target}: give a test accuracy in (0, 1], e.g. 0.95")
    check_can_run(args, "convergence")
    user = parse_overrides(list(args.overrides or []), CONTROLLED, "convergence")
    peers = parse_peers(getattr(args, "backends", None), args.device, False)
    nodes = plan_nodes(args)
    n = len(nodes)
    fixed = {"trainer.device": args.device, "trainer.resume": "none"}
    cfg = _compose(_overrides(DEFAULTS, user, fixed, {"cluster": "pro_air", "cluster.nodes": str(n),
                                                      "compression": "none"}))
    choices = cfg.hydra.runtime.choices
    if choices.dataset == "text":
        raise ConfigError("--type convergence measures test accuracy: use a classification dataset "
                          "(dataset=digits, the default, dataset=shapes or dataset=cifar10)")
    if cfg.cluster.weight == "auto":
        raise ConfigError("cluster.weight=auto: give the fleet's shares as cluster.weights=[...]")
    if cfg.cluster.weights is not None and len(cfg.cluster.weights) != n:
        raise ConfigError(f"cluster.weights has {len(cfg.cluster.weights)} values for --nodes {n}: give one per node")
    link = ("veth" + (f" shaped to {args.rate}" if args.rate else "")) if args.netns else "loopback"
    epochs = int(cfg.trainer.epochs)
    setup = {"type": "convergence", "model": choices.model, "dataset": choices.dataset,
             "global_batch": int(cfg.trainer.batch_size), "epochs": epochs, "device": args.device, "link": link,
             "nodes": n}
    console.print(f"[bold]convergence[/bold]: {choices.model} on {choices.dataset}, global batch "
                  f"{setup['global_batch']}, {epochs} epochs, {args.device}, {n} nodes on {link}; time to test "
                  f"accuracy {target:g} per codec ({', '.join(codecs)})")
    for node in nodes:
        console.print(f"  {node.describe()}")
    if peers:
        console.print(f"  peers: {', '.join(peers)} (train.py cluster=torchrun, compression none, on the same nodes)")

    bench, logs = bench_dir("macfleet-convergence-")
    rows = []
    with removed_unless_failed(bench, console) as keep:
        with CpuQuotas(nodes), (_namespaces(nodes, args) if args.netns else contextlib.nullcontext()):
            for j, peer in enumerate(peers):
                run = peer_run(bench / f"torchrun-{run_label(peer)}", nodes, peer, j, args.netns,
                               [DEFAULTS, peer_overrides(user), fixed])
                launched = time.time()
                m = wait_peer(run, logs, console, keep)
                if isinstance(m, str):
                    continue
                formed, curve = read_curve((run.out / "train.log").read_text(errors="replace"))
                row = convergence_row(setup, "none", target, m, curve, round(formed - launched, 3), "torchrun", peer)
                rows.append(row)
                to = f"{row['time_to_target_s']:.1f} s" if row["reached"] else "not reached"
                console.print(f"  {run.label}: {target:g} in {to}, final {row['final_accuracy']:.4f}")
            for k, codec in enumerate(codecs):
                run: Run = fleet_run(bench / f"fleet-{run_label(codec)}", nodes, codec, k, args.netns,
                                     [DEFAULTS, user, fixed])
                launched = time.time()
                m = _wait([run], logs, console)[0]
                formed, curve = read_curve((run.out / "train.log").read_text(errors="replace"))
                row = convergence_row(setup, codec, target, m, curve, round(formed - launched, 3))
                rows.append(row)
                ran = f" (ran {row['ran']})" if row["ran"] != codec.split(":")[0] else ""
                to = f"{row['time_to_target_s']:.1f} s" if row["reached"] else "not reached"
                console.print(f"  fleet-{codec}{ran}: {target:g} in {to}, final {row['final_accuracy']:.4f}")
                if row["auto_reason"]:  # why auto ran what it ran, as its train.log says
                    console.print(f"    {row['auto_reason']}", highlight=False, soft_wrap=True)
    report(console, args, rows, convergence_table, plot_convergence)
    return 0


def convergence_table(rows: list[dict]):
    from rich.table import Table

    first = rows[0]
    base = next((r for r in rows if r["run"] == "fleet" and r["codec"] == "none" and r["reached"]), None)
    table = Table(title=f"macfleet benchmark --type convergence: {first['model']} on {first['dataset']}, global batch "
                        f"{first['global_batch']}, {first['nodes']} nodes, {first['device']}, {first['link']}",
                  caption=f"time to test accuracy {first['target']:g}, from the fleet's forming (start-up and join "
                          f"left out, auto's probe counted); vs none: the fleet's none's time / this one's")
    for col in ("codec", "ran", "time to target", "epochs", "vs none", "final acc", "best acc", "samples/s", "wire"):
        table.add_column(col, justify="left" if col in ("codec", "ran") else "right")
    for r in rows:
        speed = (f"{base['time_to_target_s'] / r['time_to_target_s']:.2f}x" if base and r["reached"]
                 and r["time_to_target_s"] > 0 else "-")
        table.add_row(r["codec"] if r["run"] == "fleet" else run_name(r), r["ran"] or "-", f"{r['time_to_target_s']:.1f} s" if r["reached"] else "not reached",
                      str(r["epochs_to_target"] or "-"), speed, _acc(r["final_accuracy"]), _acc(r["best_accuracy"]),
                      f"{r['samples_per_s']:.0f}" if r["samples_per_s"] else "-",
                      f"{100 * r['wire_ratio']:.1f}%" if r["wire_ratio"] is not None else "-")
    return table


def _acc(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def plot_convergence(rows: list[dict], path: str) -> None:
    """Test accuracy against wall time, one line per codec, the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        label = run_name(r) if r["run"] != "fleet" else \
            r["codec"] + (f" ({r['ran']})" if r["ran"] and r["ran"] != r["codec"] else "")
        ax.plot([p["wall_s"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]],
                "o-" if r["run"] == "fleet" else "s:", label=label, markersize=3)  # peers dotted
    ax.axhline(rows[0]["target"], color="tab:gray", linestyle="--", label=f"target {rows[0]['target']:g}")
    ax.set_xlabel("wall time since the fleet formed (s); a point per epoch's evaluation")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{rows[0]['model']} on {rows[0]['dataset']}, {rows[0]['nodes']} nodes, {rows[0]['link']}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
