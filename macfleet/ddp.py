"""MacFleetDDP: PyTorch's DistributedDataParallel over the `macfleet` backend, plus a comm hook.

PyTorch's reducer owns bucketing, the initial parameter broadcast, buffer broadcast and the
overlap of communication with backward; MacFleet only supplies the hook, registered with
`register_comm_hook` (the mechanism of PyTorch's fp16 and PowerSGD hooks):

    hook(bucket): buffer *= b_i / B  ->  compressor.reduce(buffer, segments, step)  ->  Future

so the all_reduce sum over ranks is the global-batch mean gradient. Where DDP cannot run on the
device (MPS with a third-party backend is unproven) or there is only one process, the fallback
flattens the gradients after backward and sends them through the same reduce path.
"""

from __future__ import annotations

import logging

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


def make_reducer(cfg: CompressionConfig, group):
    if cfg.name == "none":
        return _DenseReducer(group)
    from macfleet.compression import GradientCompressor

    return GradientCompressor(cfg, group)


class MacFleetDDP(torch.nn.Module):
    """Wraps `module` for data-parallel training over a macfleet Group (None: one process)."""

    def __init__(self, module: torch.nn.Module, group, share: float, compression: CompressionConfig,
                 device: torch.device, use_torch_ddp: bool | None = None, bucket_cap_mb: float = 25.0):
        super().__init__()
        self.module = module
        self.group = group
        self.share = float(share)
        self.step = 0
        self.world_size = group.world_size if group is not None else 1
        self.reducer = make_reducer(compression, group)
        self._names = {id(p): n for n, p in module.named_parameters()}
        self._segments_cache: dict[tuple, list] = {}
        self.ddp = None
        if self.world_size > 1:
            if use_torch_ddp is None:
                use_torch_ddp = device.type in ("cpu", "cuda")
            if use_torch_ddp:
                self._wrap_torch_ddp(device, bucket_cap_mb)
            else:
                log.info("MacFleetDDP: flat path on %s (PyTorch DDP not used): all gradients go through the comm hook after backward", device.type)
                self._broadcast_state()
        self.needs_fallback = self.ddp is None and (self.world_size > 1 or compression.name != "none")

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
                                           gradient_as_bucket_view=True, **{sync: True})
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

    # -- fallback path
    def _broadcast_state(self) -> None:
        with torch.no_grad():
            for t in list(self.module.parameters()) + list(self.module.buffers()):
                self._broadcast_tensor(t)

    def _broadcast_tensor(self, t: torch.Tensor) -> None:
        cpu = t.detach().to("cpu").contiguous()
        self.group.broadcast(cpu, src=0)
        t.copy_(cpu)

    def forward(self, *args, **kwargs):
        if self.ddp is not None:
            return self.ddp(*args, **kwargs)
        if self.module.training:
            self.sync_buffers()  # DDP's broadcast_buffers: rank 0's BatchNorm statistics win
        return self.module(*args, **kwargs)

    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank. Both paths sync them before each
        training forward, so after the last one every rank holds its own batch's update: call
        this before evaluating or checkpointing, so all ranks evaluate and save the same model."""
        if self.world_size > 1:
            with torch.no_grad():
                for b in self.module.buffers():
                    self._broadcast_tensor(b)

    def finish_gradients(self) -> None:
        """Fallback: reduce all gradients at once through the hook's path (no-op under torch DDP)."""
        if not self.needs_fallback:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        flat.mul_(self.share)
        out = self.reducer.reduce(flat, self._segments(params), self.step).wait()
        off = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(out[off : off + n].view_as(p.grad))
            off += n

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
        return {"comm/wire_ratio": s.get("bytes_sent", 0) / dense, "comm/bytes_sent": float(s.get("bytes_sent", 0))}

    def state_dict(self, *args, **kwargs):  # the compressor's per-rank state (error-feedback residuals)
        return self.reducer.state_dict()

    def load_state_dict(self, state, strict: bool = True):
        self.reducer.load_state_dict(state or {})
