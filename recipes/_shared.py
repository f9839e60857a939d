"""What every recipe shares: the common flags (training, cluster), the TrainingConfig they
fill, and the run-and-report step. A forked recipe keeps only its model, data and
hyperparameters; copy this file along with it.
"""

from __future__ import annotations

import argparse
import json
import sys

from macfleet import ClusterConfig, MacFleetError, NodeRole, Trainer, TrainingConfig


def add_common_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float,
                    compression: str) -> None:
    """--epochs/--batch-size/--lr/... with this recipe's defaults, plus the cluster flags."""
    p = parser
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size, help="global batch, split across nodes by weight")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (warm-up, then cosine decay)")
    p.add_argument("--compression", default=compression, choices=["none", "fp16", "topk", "topk_fp16"])
    p.add_argument("--topk-ratio", type=float, default=0.1, help="fraction of the gradient kept by top-k")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "mps", "cuda"])
    p.add_argument("--output-dir", default=None, help="run dir for metrics.json and checkpoints")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: all epochs)")
    p.add_argument("--smoke", action="store_true", help="tiny offline data and model, a few steps")

    group = p.add_argument_group("cluster (omit all for one process on this machine)")
    group.add_argument("--role", choices=["master", "worker"], default="master",
                       help="master runs the coordinator and is rank 0; worker joins it")
    group.add_argument("--master-addr", default="127.0.0.1",
                       help="master's address, e.g. its Thunderbolt bridge IP 10.0.0.1")
    group.add_argument("--master-port", type=int, default=50051, help="control-plane port")
    group.add_argument("--tensor-port", type=int, default=50052, help="gradient (data-plane) port")
    group.add_argument("--nodes", type=int, default=1, help="how many nodes the master waits for, itself included")
    group.add_argument("--weight", default="1.0", help="this node's share of the global batch, or 'auto'")
    group.add_argument("--discovery", action="store_true", help="find the master with Bonjour instead of --master-addr")


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    """One process when alone (master, one node); otherwise join or host over the network."""
    alone = args.role == "master" and args.nodes == 1
    return ClusterConfig(
        role=NodeRole(args.role),
        master_addr=args.master_addr,
        master_port=args.master_port,
        tensor_port=args.tensor_port,
        discovery_enabled=args.discovery,
        mode="single" if alone else "direct",
        nodes=args.nodes,
        weight=args.weight if args.weight == "auto" else float(args.weight),
    )


def training_config(args: argparse.Namespace, **recipe) -> TrainingConfig:
    """The flags' fields plus the recipe's own (optimizer, schedule, ...)."""
    return TrainingConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        compression=args.compression,
        topk_ratio=args.topk_ratio,
        device=args.device,
        max_steps=args.max_steps,
        output_dir=args.output_dir,
        progress=not args.smoke,  # smoke output is read by scripts; keep it to log lines
        **recipe,
    )


def fit_and_report(model, data, config: TrainingConfig, args: argparse.Namespace) -> int:
    """Train; print `RESULT {json}` as the last stdout line (scripts and tests read it).

    Returns the exit status: 1 with a one-line message for errors the user can fix.
    """
    try:
        metrics = Trainer(model, data, config, cluster_config(args)).fit()
    except MacFleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    print("RESULT " + json.dumps(keep, sort_keys=True), flush=True)
    return 0
