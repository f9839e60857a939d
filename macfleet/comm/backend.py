"""The "macfleet" torch.distributed backend: a Python ProcessGroup over a MacFleet Group.

`import macfleet` registers the backend (comm/registration.py; this module is only imported
when the first group is created), so plain PyTorch code runs over MacFleet unchanged:

    import macfleet  # noqa: F401
    dist.init_process_group("macfleet", init_method="tcp://127.0.0.1:29500", rank=r, world_size=n)
    model = torch.nn.parallel.DistributedDataParallel(model)

Rendezvous: each rank publishes its data-plane address ("host:port") in the torch Store under
`macfleet/addr/<rank>` and reads everyone else's. The host is the local address that routes to
the store's host (or MACFLEET_TENSOR_HOST), the port a free one (or MACFLEET_TENSOR_PORT).
Rank 0 draws a random 64-bit session and publishes it under `macfleet/session`; every rank
stamps its frames with it, so a stale socket of another run aimed at a reused port is rejected.
Rank 0 also publishes the all_reduce algorithm under `macfleet/algorithm`, from its
MACFLEET_ALLREDUCE (auto, ring or direct; see collectives.py), so every rank runs the same one
(mixed algorithms would mis-file chunks). Each rank's TCP connections per peer come from its own
MACFLEET_STRIPES (transport.py, "Striping"; default 1).
Cluster code that already knows every address calls `init_process_group_from_group(group)`
instead: the default group then uses that Group, with no second rendezvous port.

Collectives: allreduce (sum, avg), allreduce_coalesced, broadcast, allgather (also into one
tensor), gather, scatter, barrier. cuda/mps tensors are staged asynchronously through pooled
host buffers by the Group (comm/staging.py).
"""

from __future__ import annotations

import datetime
import os
import socket
import threading

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import (
    AllgatherOptions,
    AllreduceCoalescedOptions,
    AllreduceOptions,
    BarrierOptions,
    BroadcastOptions,
    GatherOptions,
    ReduceOp,
    ScatterOptions,
    _create_work_from_future,
)

from macfleet.comm.framing import random_session
from macfleet.comm.group import Group
from macfleet.comm.launch import free_ports
from macfleet.comm.registration import BACKEND_NAME, register
from macfleet.errors import MacFleetError

SESSION_KEY = "macfleet/session"
ALGORITHM_KEY = "macfleet/algorithm"
_lock = threading.Lock()
_pending_group: Group | None = None


def _op_name(op) -> str:
    if op == ReduceOp.SUM:
        return "sum"
    if op == ReduceOp.AVG:
        return "avg"
    raise MacFleetError(f"the macfleet backend reduces with SUM or AVG only, not {op}; use one of those")


def _work(futures: list, value):
    """One Work whose future completes, with `value`, when every future in `futures` has."""
    if len(futures) == 1:
        fut = futures[0].then(lambda f: (f.value(), value)[1])
    else:
        fut = torch.futures.collect_all(futures).then(lambda fs: ([f.value() for f in fs.value()], value)[1])
    return _create_work_from_future(fut)


class MacFleetProcessGroup(dist.ProcessGroup):
    """torch.distributed ProcessGroup whose collectives run on a macfleet.comm.Group."""

    def __init__(self, group: Group, owns_group: bool = True):
        """`owns_group`: shutdown (destroy_process_group) closes `group`. False for a Group the
        caller made and keeps (init_process_group_from_group): a trainer that rebuilds its DDP
        within a generation (compression=auto deciding again) keeps training on that Group."""
        super().__init__(group.rank, group.world_size)
        self.group = group
        self.owns_group = owns_group

    def getBackendName(self) -> str:
        return BACKEND_NAME

    def allreduce(self, tensors, opts=AllreduceOptions()):
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        op = _op_name(opts.reduceOp)
        return _work([self.group.all_reduce_async(t, op) for t in tensors], tensors)

    def allreduce_coalesced(self, tensors, opts=AllreduceCoalescedOptions()):
        op = _op_name(opts.reduceOp)
        return _work([self.group.all_reduce_async(t, op) for t in tensors], tensors)

    def broadcast(self, tensors, opts=BroadcastOptions()):
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        return _work([self.group.broadcast_async(t, opts.rootRank) for t in tensors], tensors)

    def allgather(self, output_tensors, input_tensors, opts=AllgatherOptions()):
        futures = []
        for outs, inp in zip(output_tensors, input_tensors):
            def copy_out(f, outs=outs):
                for dst, src in zip(outs, f.value()):
                    dst.copy_(src.reshape(dst.shape))
                return outs
            futures.append(self.group.all_gather_async(inp, equal=True).then(copy_out))  # torch: equal sizes
        return _work(futures, output_tensors)

    def _allgather_base(self, output_tensor, input_tensor, opts=AllgatherOptions()):
        outs = list(output_tensor.view(self.group.world_size, -1).unbind(0))
        return self.allgather([outs], [input_tensor.reshape(-1)], opts)

    def allgather_into_tensor_coalesced(self, output_tensors, input_tensors, opts=AllgatherOptions()):
        works = [self._allgather_base(o, i, opts) for o, i in zip(output_tensors, input_tensors)]
        return works[-1] if works else _work([torch.futures.Future()], None)

    def gather(self, output_tensors, input_tensors, opts=GatherOptions()):
        result = self.group.gather(input_tensors[0], dst=opts.rootRank)
        if result is not None:
            for dst, src in zip(output_tensors[0], result):
                dst.copy_(src)
        return _done(output_tensors)

    def scatter(self, output_tensors, input_tensors, opts=ScatterOptions()):
        chunks = input_tensors[0] if self.group.rank == opts.rootRank else None
        output_tensors[0].copy_(self.group.scatter(chunks, src=opts.rootRank))
        return _done(output_tensors)

    def barrier(self, opts=BarrierOptions()):
        timeout = opts.timeout.total_seconds() if opts.timeout and opts.timeout.total_seconds() > 0 else None
        self.group.barrier(timeout=timeout)
        return _done([])

    def size(self) -> int:
        return self.group.world_size

    def rank(self) -> int:
        return self.group.rank

    def shutdown(self) -> None:
        if self.owns_group:
            self.group.close()

    def __repr__(self) -> str:
        return f"MacFleetProcessGroup(rank={self.group.rank}, world_size={self.group.world_size})"


def _done(value):
    fut = torch.futures.Future()
    fut.set_result(value)
    return _create_work_from_future(fut)


def _store_host(store) -> str | None:
    # PrefixStore wraps the TCPStore that init_method created; its host is the master's address.
    while store is not None:
        host = getattr(store, "host", None)
        if host:
            return host
        store = getattr(store, "underlying_store", None)
    return os.environ.get("MASTER_ADDR")


def _local_host_towards(remote: str | None) -> str:
    if os.environ.get("MACFLEET_TENSOR_HOST"):
        return os.environ["MACFLEET_TENSOR_HOST"]
    if not remote or remote in ("localhost", "127.0.0.1"):
        return "127.0.0.1"
    # A UDP connect sends nothing; it only asks the kernel which local address routes there.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((socket.gethostbyname(remote), 9))
        return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


def create_process_group(store, rank: int, world_size: int, timeout: datetime.timedelta) -> MacFleetProcessGroup:
    """The backend's creator: torch.distributed calls it (through registration.py) for each new group."""
    global _pending_group
    with _lock:
        group, _pending_group = _pending_group, None
    owns = group is None
    if group is None:
        host = _local_host_towards(_store_host(store))
        port = int(os.environ.get("MACFLEET_TENSOR_PORT", "0")) or free_ports(1, host)[0]
        store.set(f"macfleet/addr/{rank}", f"{host}:{port}")
        if rank == 0:
            store.set(SESSION_KEY, str(random_session()))
            store.set(ALGORITHM_KEY, os.environ.get("MACFLEET_ALLREDUCE", "").strip() or "auto")
        # store.get blocks until rank 0 has published (within the store's timeout).
        session = int(store.get(SESSION_KEY).decode())
        algorithm = store.get(ALGORITHM_KEY).decode()
        addrs = [store.get(f"macfleet/addr/{r}").decode() for r in range(world_size)]
        group = Group(rank, world_size, addrs, timeout=timeout.total_seconds(), session=session, algorithm=algorithm)
    elif (group.rank, group.world_size) != (rank, world_size):
        raise MacFleetError(
            f"init_process_group(rank={rank}, world_size={world_size}) does not match the Group "
            f"(rank={group.rank}, world_size={group.world_size}); pass the Group's own rank and size"
        )
    return MacFleetProcessGroup(group, owns_group=owns)


def init_process_group_from_group(group: Group) -> None:
    """Make torch.distributed's default group run on an existing Group (no second rendezvous)."""
    global _pending_group
    register_backend()
    with _lock:
        _pending_group = group
    # A HashStore is local to this process: nothing waits on it, the Group already connected.
    dist.init_process_group(BACKEND_NAME, store=dist.HashStore(), rank=group.rank, world_size=group.world_size,
                            timeout=datetime.timedelta(seconds=group.timeout))


def register_backend() -> None:
    """Register "macfleet" with torch.distributed (idempotent; `import macfleet` already did)."""
    register(dist)


register_backend()
