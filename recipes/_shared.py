"""What every recipe shares: the cluster flags (role, master address, ports) and the result line.

Kept apart so a forked recipe stays about its model and data; copy this file along with it.
"""

from __future__ import annotations

import argparse
import json
import sys

from macfleet import ClusterConfig, NodeRole


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """--role/--master-addr/--nodes...: one process alone, or one node of a fleet of Macs."""
    group = parser.add_argument_group("cluster (omit all for one process on this machine)")
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
        # A worker listens on all interfaces only if it is the master.
        host="0.0.0.0",
    )


def report(metrics: dict) -> None:
    """The last stdout line: `RESULT {json}` (what scripts and the recipe test read)."""
    keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    print("RESULT " + json.dumps(keep, sort_keys=True))
    sys.stdout.flush()
