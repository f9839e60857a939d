"""The trainer's view of the cluster: rank, weights, the engine Group, and small collectives.

`connect(cluster_cfg, ...)` returns a SoloWorld for one process, or a ClusterWorld built from
the coordinator's membership (ranks, weights, generation, peers) and the engine's Group.
"""

from __future__ import annotations

import logging

import torch

from macfleet import statepack
from macfleet.config import ClusterConfig

log = logging.getLogger("macfleet")


class SoloWorld:
    """One process: rank 0 of 1."""

    rank = 0
    world_size = 1
    generation = 0
    group = None

    def __init__(self, weights=None, run: dict | None = None):
        self.weights = [1.0]
        self.run = dict(run or {})

    def check(self) -> None:
        pass

    def report(self, step: int, samples_per_s: float) -> None:
        pass

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def weighted_mean(self, value: float, share: float) -> float:
        return value

    def broadcast_object(self, obj):
        return obj

    def gather_object(self, obj) -> list:
        return [obj]

    def close(self) -> None:
        pass


def connect(cfg: ClusterConfig, fingerprint: dict, seed: int = 0, config_dict: dict | None = None):
    """Join (or form) the cluster `cfg` describes; returns the world the trainer runs in."""
    if cfg.mode == "single" or (cfg.nodes == 1 and cfg.role.value == "master" and cfg.mode != "agent"):
        return SoloWorld(run={"run_id": (config_dict or {}).get("run_id"), "seed": seed})
    from macfleet.cluster.world import ClusterWorld

    return ClusterWorld.connect(cfg, fingerprint, seed=seed, config_dict=config_dict)
