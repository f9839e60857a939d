"""`cluster=torchrun`: the same `train.py` under torchrun, on torch's stock backends.

    torchrun --nproc-per-node 2 train.py cluster=torchrun                  # nccl on cuda, gloo on cpu
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 train.py cluster=torchrun

A user who outgrows the Macs moves the job to a GPU cluster without rewriting it. torchrun owns
the rendezvous and the restarts; the trainer sees a `TorchrunWorld`, which has the face of the
MacFleet world (rank, weights, run, the object collectives) with a `TorchGroup` underneath: the
collective calls the reducers make (`all_reduce_async`, `all_gather_async`, `broadcast`, ...),
issued on a torch ProcessGroup. So weighted shares and every codec work on nccl and gloo too.

The run id: rank 0 draws it before Hydra makes the run dir and publishes it in torchrun's own
store (the agent's TCPStore at MASTER_ADDR:MASTER_PORT); the other ranks read it there, so the
run has one id, and only rank 0 writes the run dir.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch

from macfleet.cluster.fleet import GroupWorld
from macfleet.errors import ConfigError, MacFleetError

log = logging.getLogger("macfleet")

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


def agree_run_id(draw, timeout_s: float = 300.0) -> str:
    """One run id for every rank of a torchrun job: rank 0's `draw()`, read by the others from
    torchrun's store. Keyed by torchrun's run id and restart count, so a restarted job gets a new one."""
    from torch.distributed import TCPStore

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise ConfigError("cluster=torchrun needs torchrun's shared store (TORCHELASTIC_USE_AGENT_STORE=True, "
                          "torchrun's default); or pass run_id=<the same id> on every rank")
    key = "macfleet/run_id/{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", "none"),
                                         os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=datetime.timedelta(seconds=timeout_s))
    if int(os.environ["RANK"]) == 0:
        store.set(key, draw())
    return store.get(key).decode()


def pick_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise ConfigError(f"cluster.backend=nccl needs CUDA tensors, but the trainer runs on {device.type}: "
                          "use cluster.backend=gloo (or auto)")
    if name not in ("nccl", "gloo", "macfleet"):
        raise ConfigError(f"cluster.backend={name!r}: choose auto, nccl, gloo or macfleet")
    return name


class TorchGroup:
    """The collectives MacFleet's reducers and world call, on a torch ProcessGroup.

    Futures complete with what the engine's Group returns (the reduced tensor; a list of parts
    for all_gather). A backend that only takes device tensors (nccl) gets host tensors moved
    there and back."""

    def __init__(self, device: torch.device, pg=None):
        import torch.distributed as dist

        self.dist = dist
        self.pg = pg
        self.rank = dist.get_rank(pg)
        self.world_size = dist.get_world_size(pg)
        self.device_only = dist.get_backend(pg) == "nccl"
        self.device = device
        self.timeout = 1800.0

    def _on(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.device_only and t.device.type == "cpu" else t

    def all_reduce_async(self, t: torch.Tensor, op: str = "sum") -> torch.futures.Future:
        if op not in ("sum", "avg"):
            raise MacFleetError(f"all_reduce op={op!r} is not supported; use 'sum' or 'avg'")
        work_t = self._on(t)
        red = self.dist.ReduceOp.SUM if op == "sum" else self.dist.ReduceOp.AVG
        fut = self.dist.all_reduce(work_t, op=red, group=self.pg, async_op=True).get_future()

        def done(_):
            if work_t is not t:
                t.copy_(work_t)
            return t

        return fut.then(done)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return self.all_reduce_async(t, op).wait()

    def all_gather_async(self, t: torch.Tensor, check=None, *, equal: bool = True) -> torch.futures.Future:
        """Every rank's `t`, in rank order. Parts must have the same size on every rank (the
        codecs' payloads do: their size is fixed by the layout; `equal` is accepted for Group's
        signature). `check` runs on CPU parts only:
        validating device parts would make the host wait for the GPU every step."""
        src = self._on(t.contiguous())
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        fut = self.dist.all_gather(parts, src, group=self.pg, async_op=True).get_future()

        def done(_):
            if check is not None and parts[0].device.type == "cpu":
                for p in parts:
                    check(p)
            return [p.to(t.device) for p in parts] if src is not t and t.device != src.device else parts

        return fut.then(done)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        work_t = self._on(t)
        self.dist.broadcast(work_t, src=src, group=self.pg)
        if work_t is not t:
            t.copy_(work_t)
        return t

    def gather(self, t: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        """Every rank's 1-D `t` (sizes may differ) on `dst`: sizes first, then one padded
        all_gather (nccl has no gather)."""
        n = torch.tensor([t.numel()], dtype=torch.int64)
        sizes = self.all_gather_async(n).wait()
        width = int(max(int(s[0]) for s in sizes))
        padded = torch.zeros(width, dtype=t.dtype)
        padded[: t.numel()] = t.reshape(-1).cpu()
        parts = self.all_gather_async(padded).wait()
        if self.rank != dst:
            return None
        return [p.cpu()[: int(s[0])] for p, s in zip(parts, sizes)]

    def check(self) -> None:
        pass

    def abort(self, exc: BaseException) -> None:
        pass

    def close(self) -> None:
        pass


class TorchrunWorld(GroupWorld):
    """The trainer's world under torchrun: torch's rendezvous and process group, MacFleet's
    weighted shares and codecs. Membership is fixed for the life of the process (torchrun
    restarts the job when a rank fails)."""

    generation = 1

    def __init__(self, cfg, device: torch.device, run: dict):
        import torch.distributed as dist

        self.backend = pick_backend(cfg.backend, device)
        if self.backend == "macfleet":
            import macfleet.comm.backend  # noqa: F401 - registers "macfleet"
        if not dist.is_initialized():
            dist.init_process_group(self.backend, device_id=device if device.type == "cuda" else None)
        self.group = TorchGroup(device)
        self.rank, self.world_size = self.group.rank, self.group.world_size
        if cfg.weights is not None:
            if len(cfg.weights) != self.world_size:
                raise ConfigError(f"cluster.weights has {len(cfg.weights)} entries for torchrun's {self.world_size} "
                                  "ranks; give one weight per rank or drop cluster.weights")
            raw = [float(w) for w in cfg.weights]
        else:
            raw = [1.0] * self.world_size
        self.weights = [w / sum(raw) for w in raw]
        self.run = dict(run)
        log.info("torchrun: rank %d of %d on %s (backend %s)", self.rank, self.world_size, device, self.backend)

    def check(self) -> None:
        pass

    def report(self, step: int, samples_per_s: float) -> None:
        pass

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
