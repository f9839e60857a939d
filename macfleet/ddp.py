"""MacFleetDDP: PyTorch's DistributedDataParallel over the `macfleet` backend, plus a comm hook.

PyTorch's reducer owns bucketing, the initial parameter broadcast, buffer broadcast and the
overlap of communication with backward; MacFleet only supplies the hook, registered with
`register_comm_hook` (the mechanism of PyTorch's fp16 and PowerSGD hooks):

    hook(bucket): buffer *= b_i / B  ->  compressor.reduce(buffer, segments, step)  ->  Future

so the all_reduce sum over ranks is the global-batch mean gradient. Where DDP cannot run on the
device (MPS with a third-party backend is unproven) or there is only one process, the flat path
does the same with its own buckets: post-accumulate-grad hooks launch each bucket's reduction
as soon as backward has produced its gradients, and `finish_gradients` only waits (see _Buckets).
"""

from __future__ import annotations

import logging
import time

import torch

from macfleet.compression.compressor import counters_state, load_counters
from macfleet.config import CompressionConfig

log = logging.getLogger("macfleet")


class _DenseReducer:
    """compression=none: one dense all_reduce(sum) per bucket on the engine."""

    def __init__(self, group):
        self.group = group
        self.stats = {"bytes_sent": 0, "dense_bytes": 0}

    def reduce(self, flat: torch.Tensor, segments, step: int) -> torch.futures.Future:
        nbytes = flat.numel() * flat.element_size()
        self.stats["bytes_sent"] += nbytes
        self.stats["dense_bytes"] += nbytes
        if self.group is None or self.group.world_size == 1:
            fut = torch.futures.Future()
            fut.set_result(flat)
            return fut
        return self.group.all_reduce_async(flat, op="sum")

    def state_dict(self) -> dict:
        return {"counters": counters_state(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        load_counters(self.stats, state or {})


def make_reducer(cfg: CompressionConfig, group, redoable: bool = False):
    if cfg.name == "none":
        return _DenseReducer(group)
    from macfleet.compression import GradientCompressor

    return GradientCompressor(cfg, group, redoable=redoable)


class MacFleetDDP(torch.nn.Module):
    """Wraps `module` for data-parallel training over a macfleet Group (None: one process)."""

    def __init__(self, module: torch.nn.Module, group, share: float, compression: CompressionConfig,
                 device: torch.device, use_torch_ddp: bool | None = None, bucket_cap_mb: float = 25.0,
                 redoable: bool = False):
        """`redoable`: a step may be dropped and redone (an elastic fleet): `rollback()` undoes
        its error-feedback updates."""
        super().__init__()
        self.module = module
        self.group = group
        self.share = float(share)
        self.step = 0
        self.world_size = group.world_size if group is not None else 1
        self.device = torch.device(device)
        self.forward_sync = _buffers_steer_training(module)
        """Broadcast rank 0's buffers before every training forward (PyTorch DDP's default). Not
        needed when every buffer is a normalisation layer's running statistics: in training mode
        they never reach the output, and `sync_buffers` (before evaluation and checkpoints) gives
        every rank rank 0's, which evolved the same either way. Skipping it removes a collective
        per step that the host must wait for (on an accelerator it stalls the queue of kernels)."""
        self.reducer = make_reducer(compression, group, redoable)
        self._names = {id(p): n for n, p in module.named_parameters()}
        self._segments_cache: dict[tuple, list] = {}
        self.ddp = None
        if self.world_size > 1:
            if use_torch_ddp is None:
                use_torch_ddp = device.type in ("cpu", "cuda")
            if use_torch_ddp:
                self._wrap_torch_ddp(device, bucket_cap_mb)
            else:
                log.info("MacFleetDDP: flat path on %s (PyTorch DDP not used): gradient buckets are reduced "
                         "as backward produces them", device.type)
                self._broadcast_state()
        self.needs_fallback = self.ddp is None and (self.world_size > 1 or compression.name != "none")
        self._buckets = _Buckets(self, bucket_cap_mb) if self.needs_fallback else None

    # -- torch DDP path
    def _wrap_torch_ddp(self, device, bucket_cap_mb) -> None:
        from torch.nn.parallel import DistributedDataParallel

        import torch.distributed as dist

        from macfleet.comm.backend import init_process_group_from_group

        if not dist.is_initialized():
            init_process_group_from_group(self.group)
        pg = dist.group.WORLD
        import inspect

        # Rank 0's buffers (BatchNorm statistics) win every forward; newer torch renamed the option.
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else "broadcast_buffers")
        self.ddp = DistributedDataParallel(self.module, process_group=pg, bucket_cap_mb=bucket_cap_mb,
                                           gradient_as_bucket_view=True, **{sync: self.forward_sync})
        self.ddp.register_comm_hook(self, MacFleetDDP._hook)

    @staticmethod
    def _hook(state: "MacFleetDDP", bucket):  # no return annotation: DDP checks it literally
        # The reducer's `buf` is reduced in place: the future's value is `buf` holding the sum.
        buf = bucket.buffer()
        buf.mul_(state.share)
        return state.reducer.reduce(buf, state._segments(bucket.parameters()), state.step)

    def _segments(self, params) -> list[tuple[str, int, int]]:
        key = tuple(id(p) for p in params)
        segs = self._segments_cache.get(key)
        if segs is None:
            segs, off = [], 0
            for p in params:
                segs.append((self._names[id(p)], off, p.numel()))
                off += p.numel()
            self._segments_cache[key] = segs
        return segs

    # -- flat path
    def _broadcast_state(self) -> None:
        self._broadcast_tensors(list(self.module.parameters()) + list(self.module.buffers()))

    def _broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of `tensors` on every rank: one broadcast per dtype, staged like any
        collective (a device tensor is copied to the host asynchronously, not per tensor)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for group in by_dtype.values():
                flat = torch.cat([t.detach().reshape(-1) for t in group])
                self.group.broadcast(flat, src=0)
                torch._foreach_copy_(group, [v.view_as(t) for t, v in zip(group, flat.split([t.numel() for t in group]))])

    def forward(self, *args, **kwargs):
        if self.ddp is not None:
            return self.ddp(*args, **kwargs)
        if self.module.training:
            if self.forward_sync:
                self.sync_buffers()  # DDP's broadcast_buffers: rank 0's buffers win
            if self._buckets is not None and torch.is_grad_enabled():
                self._buckets.arm(self.step)
        return self.module(*args, **kwargs)

    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank. Between syncs every rank updates
        its own running statistics from its own batches: call this before evaluating or
        checkpointing, so all ranks evaluate and save the same model (see `forward_sync`)."""
        if self.world_size > 1:
            buffers = list(self.module.buffers())
            if buffers:
                self._broadcast_tensors(buffers)

    def finish_gradients(self) -> None:
        """Flat path: wait for the bucket reductions that backward launched (launching any whose
        gradients never arrived); each `.grad` is then a view of its bucket's result. No-op
        under torch DDP."""
        if self._buckets is not None:
            self._buckets.finish()

    # -- bookkeeping
    def set_step(self, step: int) -> None:
        self.step = step
        if self.group is not None and hasattr(self.group, "set_step"):
            self.group.set_step(step)

    def wire_stats(self) -> dict[str, float]:
        s = getattr(self.reducer, "stats", {}) or {}
        dense = s.get("dense_bytes", 0)
        if not dense:
            return {}
        out = {"comm/wire_ratio": s.get("bytes_sent", 0) / dense, "comm/bytes_sent": float(s.get("bytes_sent", 0))}
        if self.device.type != "cpu" and self.world_size > 1:
            from macfleet.comm.staging import stager_for

            # comm-thread seconds waiting for device<->host copies since the process started
            out["comm/staging_s"] = stager_for(self.device).seconds
        return out

    def rollback(self) -> None:
        """The step in flight failed on some rank (a node was lost): drop its gradients and its
        error-feedback updates, so the step can be redone on the next generation."""
        self._drop_step("rollback")

    def settle(self) -> None:
        """The step in flight completed on every rank after all (another rank finished it): its
        error-feedback updates take effect; its gradients here are dropped."""
        self._drop_step("settle")

    def _drop_step(self, residuals: str) -> None:
        if self._buckets is not None:
            self._buckets.disarm()
        if hasattr(self.reducer, residuals):
            getattr(self.reducer, residuals)()
        for p in self.module.parameters():
            p.grad = None

    def retire(self) -> None:
        """This generation is over: detach from the model (PyTorch DDP's hooks, the flat path's)
        so a MacFleetDDP for the next generation can wrap the same module."""
        if self._buckets is not None:
            self._buckets.retire()
        close = getattr(self.reducer, "close", None)
        if close is not None:  # a compressor's encoder thread
            close()
        if self.ddp is not None:
            import torch.distributed as dist

            self.ddp = None  # its reducer removes its autograd hooks when freed
            if dist.is_initialized():
                dist.destroy_process_group()

    def state_dict(self, *args, **kwargs):  # the compressor's per-rank state (error-feedback residuals)
        return self.reducer.state_dict()

    def load_state_dict(self, state, strict: bool = True):
        self.reducer.load_state_dict(state or {})


def _buffers_steer_training(module: torch.nn.Module) -> bool:
    """True if a buffer outside the normalisation layers (BatchNorm, InstanceNorm) may change
    what a training forward computes, so ranks must share rank 0's before every forward."""
    norm = torch.nn.modules.batchnorm._NormBase
    return any(not isinstance(m, norm) and next(m.buffers(recurse=False), None) is not None
               for m in module.modules())


class _Buckets:
    """The flat path's own bucketing: gradients go out while backward is still running.

    Parameters are grouped in reverse registration order (roughly the order backward produces
    their gradients) into buckets of at most `cap_mb`. A post-accumulate-grad hook counts each
    bucket's arrivals; a complete bucket is flattened, scaled by b_i / B and handed to the
    reducer at once, in bucket order (a bucket that completes early waits for the ones before
    it), so every rank issues the same collectives in the same order. `finish` launches what
    never completed (parameters without a gradient this step count as zeros), waits for the
    futures and makes each `.grad` a view of its bucket's global-mean result.
    """

    def __init__(self, ddp: MacFleetDDP, cap_mb: float):
        self.ddp = ddp
        cap = max(1, int(cap_mb * (1 << 20)))
        params = [p for p in ddp.module.parameters() if p.requires_grad]
        self.buckets: list[list[torch.nn.Parameter]] = []
        size = cap
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            if size + nbytes > cap and (not self.buckets or self.buckets[-1]):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self._index = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self._armed = False
        self._step = 0
        self._reset()
        self.launch_times: list[float] = []
        """perf_counter() of each bucket's launch in the current step (the ordering test reads it)."""
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def _reset(self) -> None:
        self._missing = [len(b) for b in self.buckets]
        self._futures: list = [None] * len(self.buckets)
        self._next = 0

    def arm(self, step: int) -> None:
        """A training forward: the next backward's gradients are this step's."""
        self._reset()
        self.launch_times = []
        self._step = step
        self._armed = True

    def disarm(self) -> None:
        """Forget the step in flight (its futures may never complete: a lost peer)."""
        self._armed = False
        self._reset()

    def retire(self) -> None:
        self.disarm()
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        b = self._index[id(p)]
        self._missing[b] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch(self._next)

    def _launch(self, b: int) -> None:
        params = self.buckets[b]
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                 for p in params]
        flat = torch.cat(grads) if len(grads) > 1 else grads[0].clone()
        flat.mul_(self.ddp.share)
        self._futures[b] = self.ddp.reducer.reduce(flat, self.ddp._segments(params), self._step)
        self._next = b + 1
        self.launch_times.append(time.perf_counter())

    def finish(self) -> None:
        if not self._armed:
            return
        self._armed = False
        while self._next < len(self.buckets):
            self._launch(self._next)
        for params, fut in zip(self.buckets, self._futures):
            out = fut.wait()
            # Each gradient becomes a view of its bucket's result, which no later step reuses
            # (every launch flattens into a fresh buffer): no per-parameter copy, which on a
            # device is a kernel each while the device waits for the host (PyTorch DDP's
            # gradient_as_bucket_view does the same).
            for p, v in zip(params, out.split([p.numel() for p in params])):
                p.grad = v.view_as(p)
