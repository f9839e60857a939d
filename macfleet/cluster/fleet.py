"""The trainer's view of the cluster: rank, weights, the engine Group, and small collectives.

`connect(cluster_cfg, ...)` returns a SoloWorld for one process, or a ClusterWorld built from
the coordinator's membership (ranks, weights, generation, peers) and the engine's Group.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from macfleet import statepack
from macfleet.config import ClusterConfig, new_run_id
from macfleet.errors import MacFleetError
from macfleet.cluster.local import LocalFleet, local_master

log = logging.getLogger("macfleet")


class FixedMembership:
    """A world whose membership never changes mid-run (one process, torchrun): nobody joins, and
    a departure ends the run. ClusterWorld overrides all four."""

    elastic = False
    running = False

    def joiners(self) -> int:
        return 0

    def recoverable(self, exc: BaseException) -> bool:
        return False


class SoloWorld(FixedMembership):
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


def connect(cfg: ClusterConfig, fingerprint: dict, seed: int = 0, config_dict: dict | None = None,
            samples_per_s: float | None = None, device: torch.device | None = None):
    """Join (or form) the cluster `cfg` describes; returns the world the trainer runs in."""
    if cfg.mode == "torchrun":
        from macfleet.cluster.torchrun import TorchrunWorld

        return TorchrunWorld(cfg, device or torch.device("cpu"),
                             run={"run_id": (config_dict or {}).get("run_id"), "seed": seed})
    if cfg.mode == "single" or (cfg.nodes == 1 and cfg.role.value == "master" and cfg.mode != "agent"):
        return SoloWorld(run={"run_id": (config_dict or {}).get("run_id"), "seed": seed})
    return ClusterWorld.connect(cfg, fingerprint, seed=seed, config_dict=config_dict, samples_per_s=samples_per_s)


class GroupWorld(FixedMembership):
    """What a multi-process world computes with its `group` (rank, world_size set by the subclass)."""

    group = None
    rank = 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        buf = t.to(torch.float32) if t.dtype == torch.float64 else t
        self.group.all_reduce(buf, op="sum")
        return buf.to(t.dtype)

    def weighted_mean(self, value: float, share: float) -> float:
        t = torch.tensor([value * share], dtype=torch.float32)
        return float(self.group.all_reduce(t, op="sum")[0])

    def broadcast_object(self, obj, src: int = 0):
        """Rank `src`'s `obj` on every rank (packed without pickle, see statepack)."""
        blob = statepack.pack(obj) if self.rank == src else None
        n = torch.tensor([blob.numel() if blob is not None else 0], dtype=torch.int64)
        self.group.broadcast(n, src=src)
        if blob is None:
            blob = torch.empty(int(n[0]), dtype=torch.uint8)
        self.group.broadcast(blob, src=src)
        return obj if self.rank == src else statepack.unpack(blob)

    def gather_object(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        parts = self.group.gather(statepack.pack(obj), dst=0)
        return [statepack.unpack(p) for p in parts] if parts is not None else None


class ClusterWorld(GroupWorld):
    """A node of a multi-node run: its Membership (control plane) and Group (data plane).

    A peer lost by the heartbeats, or one that left (its bye), aborts the Group, so a step
    blocked in a collective raises PeerLostError at once instead of waiting out the collective's
    timeout. `close` says bye with the reason this node leaves (the exception propagating, if any).
    """

    def __init__(self, membership, group, coordinator=None, fleet=None, cfg: ClusterConfig | None = None):
        self.membership = membership
        self.group = group
        self.coordinator = coordinator
        self.fleet = fleet
        self.cfg = cfg
        self.rank = membership.rank
        self.world_size = membership.world_size
        self.generation = membership.generation
        self.weights = [float(w) for w in membership.weights]
        self.run = dict(membership.run)
        self.elastic = bool(self.run.get("elastic"))
        self.running = bool(membership.running)
        """This node joined a run in progress: the others send it the training state."""
        membership.track(lambda: self.group.collectives)
        membership.on_lost(self._lost)
        self._closed = False

    def _lost(self, exc) -> None:
        self.group.abort(exc)

    # -- generations (elastic) ------------------------------------------------------------------
    def joiners(self) -> int:
        """Rank 0: nodes waiting to join at the next step boundary."""
        return self.coordinator.joiners() if self.coordinator is not None else 0

    def recoverable(self, exc: BaseException) -> bool:
        """Whether this node goes on after `exc` in the next generation: a worker lost or gone in an
        elastic run. The master's loss, or this node being dropped, ends the run here."""
        from macfleet.errors import NodeDroppedError, PeerLostError

        return (self.elastic and isinstance(exc, PeerLostError) and not isinstance(exc, NodeDroppedError)
                and exc.rank not in (None, 0))

    def regroup(self, admit: bool = False) -> dict:
        """Move to the next generation at a step boundary, or after a step failed: wait for the
        master to announce it (`admit`, on rank 0: form it now with the waiting joiners), close
        this generation's data plane, take the new rank, size and shares, and open the next one.
        Returns the generation's record (its `joined` peers need the training state)."""
        from macfleet.comm import Group, session_id

        hb = self.cfg.heartbeat_interval if self.cfg is not None else 1.0
        timeout = max(10.0, 6 * hb)
        if self.cfg is not None and int(self.run.get("min_nodes", self.cfg.min_nodes)) > 1:
            timeout += self.cfg.wait_timeout  # the run may wait for nodes to join (cluster.min_nodes)
        old = self.generation
        if self.coordinator is not None:
            if admit and self.coordinator.joiners() == 0:
                admit = False
            world = self.coordinator.advance(timeout) if admit else self.coordinator.next_world(old, timeout)
        else:
            def master_gone():
                exc = self.membership._lost_exc
                return exc if exc is not None and not self.recoverable(exc) else None

            world = self.membership.next_world(old, timeout, give_up=master_gone)
        if not self.group.settled:
            self.group.abort(MacFleetError(f"generation {old} ended"))
        self.group.close()
        self.membership.advance(world)
        m = self.membership
        self.rank, self.world_size, self.generation = m.rank, m.world_size, m.generation
        self.weights = [float(w) for w in m.weights]
        session = session_id(self.run.get("run_id"), m.generation)
        self.group = Group(m.rank, m.world_size, m.addrs, generation=m.generation,
                           timeout=self.cfg.comm_timeout if self.cfg is not None else 60.0, session=session,
                           algorithm=self.run.get("allreduce", "auto"))
        self.running = False
        return world

    @classmethod
    def connect(cls, cfg: ClusterConfig, fingerprint: dict, seed: int = 0, config_dict: dict | None = None,
                samples_per_s: float | None = None):
        from macfleet.cluster.facts import node_facts
        from macfleet.comm import Group, session_id
        from macfleet.comm.launch import free_ports

        facts = node_facts()
        if samples_per_s:
            facts["samples_per_s"] = float(samples_per_s)
        rank_hint = os.environ.get("MACFLEET_RANK")
        if rank_hint is not None:
            facts["rank"] = int(rank_hint)
        tensor_port = cfg.tensor_port or free_ports(1)[0]
        tensor_addr = f":{tensor_port}"
        coordinator, fleet = None, None
        if cfg.role.value == "master":
            from macfleet.cluster.coordinator import Coordinator

            if cfg.mode == "local":
                local_master(cfg)
            # The master names the run and picks the all_reduce algorithm; every worker takes both
            # from the WELCOME (ranks running different algorithms would wait on each other).
            run = {"run_id": (config_dict or {}).get("run_id") or new_run_id(), "seed": seed,
                   "allreduce": cfg.allreduce}
            coordinator = Coordinator(cfg, fingerprint, facts, run).start()
            log.info("join token: %s", "required" if cfg.token else "none (any node that reaches this port may join)")
            if cfg.mode == "local":
                fleet = LocalFleet.take_early(cfg)
                if fleet is None:
                    fleet = LocalFleet(cfg, config_dict or {})
                    fleet.start()
            try:
                membership = coordinator.wait_for_nodes(tensor_addr)
            except BaseException:
                if fleet is not None:
                    fleet.stop()
                coordinator.stop()
                raise
        else:
            from macfleet.cluster.macos import check_route
            from macfleet.cluster.membership import join

            if cfg.master_addr not in ("", "auto"):
                warning = check_route(cfg.master_addr)  # None off macOS or on the Thunderbolt bridge
                if warning:
                    log.warning("%s", warning)
            membership = join(cfg, fingerprint, facts, tensor_addr)
        try:
            # Every rank of this run and generation derives the same session; another run's frames
            # (a dead rank's socket still retrying a reused tensor port) carry another and are dropped.
            session = session_id(membership.run.get("run_id"), membership.generation)
            group = Group(membership.rank, membership.world_size, membership.addrs,
                          generation=membership.generation, timeout=cfg.comm_timeout, session=session,
                          algorithm=membership.run.get("allreduce", "auto"))
        except BaseException:
            membership.close()
            if coordinator is not None:
                coordinator.stop()
            raise
        return cls(membership, group, coordinator, fleet, cfg)

    # -- what the trainer uses
    def check(self) -> None:
        self.membership.check()
        self.group.check()

    def report(self, step: int, samples_per_s: float) -> None:
        self.membership.report(step, samples_per_s)

    def close(self, reason: str | None = None) -> None:
        """Leave the run, saying why in the bye: `reason`, else the exception propagating
        (Ctrl-C, an error), else "finished its run". Leaving in the middle of a collective aborts
        the group, so neither this node nor its peers wait it out (membership.py says when the
        others count this node as gone)."""
        if self._closed:
            return
        self._closed = True
        import torch.distributed as dist

        from macfleet.cluster.membership import leave_reason

        reason = reason or leave_reason(sys.exc_info()[1])
        settled = self.group.settled
        if not settled:
            self.group.abort(MacFleetError(f"this node is leaving the run ({reason or 'finished'})"))
        self.membership.close(reason, settled=settled)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.group.close()
        if self.fleet is not None:
            members = None
            if self.elastic and self.coordinator is not None:
                members = {int(n["facts"]["pid"]) for n in self.coordinator.members() if "pid" in n["facts"]}
            self.fleet.stop(members=members)
        if self.coordinator is not None:
            self.coordinator.stop()
