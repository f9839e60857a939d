"""Error feedback for the lossy codecs: what a node does not send this step is added to its
next gradient, so nothing is lost, only delayed (invariant: sent + residual == input).

State is kept per parameter NAME, never per bucket: PyTorch's reducer rebuilds its buckets
after the first step and a resumed process starts with the initial layout again, so per-name
state is what keeps a resumed run bit-exact.

Options from Deep Gradient Compression (Lin et al., 2018), off by default:
- momentum correction: accumulate the velocity u = m*u + g instead of g (v += u), and zero u
  where v was sent ("momentum factor masking"). With it on, run the optimizer WITHOUT momentum
  (SGD momentum=0): the momentum is already applied here, before compression.
- sparsity warm-up (`warmup_ratio`): the kept ratio falls exponentially from 1.0 at step 0 to
  the target at `warmup_steps`, so early, fast-changing gradients are sent (almost) densely.
"""

from __future__ import annotations

from typing import Optional

import torch

from macfleet.config import CompressionConfig
from macfleet.errors import CheckpointError

STATE_VERSION = 1


def warmup_ratio(cfg: CompressionConfig, step: int) -> float:
    """The kept ratio at `step`: ratio ** (step / warmup_steps) during warm-up, then ratio."""
    if cfg.warmup_steps <= 0 or step >= cfg.warmup_steps:
        return float(cfg.ratio)
    return float(cfg.ratio) ** (max(step, 0) / cfg.warmup_steps)


class ErrorFeedback:
    """Per-parameter residuals (and DGC velocities) of one node."""

    def __init__(self, cfg: CompressionConfig):
        self.momentum = float(cfg.momentum) if cfg.momentum_correction else 0.0
        self.residuals: dict[str, torch.Tensor] = {}
        self.velocities: dict[str, torch.Tensor] = {}
        """DGC's u (momentum-corrected gradient) per parameter; empty without momentum correction."""
        self._bound: dict = {}
        self._owner: dict[str, object] = {}
        """name -> the key of the bucket buffers its residual (and velocity) is a view of."""

    # -- a whole bucket at once (the hot path) --------------------------------------------------
    def bind(self, names: tuple[str, ...], starts: tuple[int, ...], numels: tuple[int, ...], padded: int,
             like: torch.Tensor) -> "Bound":
        """The residuals (and velocities) of a bucket's parameters as ONE buffer laid out like the
        codec's padded workspace (segment i at starts[i]), so accumulate and commit are one kernel
        each instead of one per parameter. Per-name state stays the truth: `residuals[name]` is a
        view of the buffer, and a parameter met in another bucket (PyTorch rebuilds its buckets
        after the first step) moves its values into that bucket's buffer."""
        key = (names, starts, numels, padded, like.device, like.dtype)
        b = self._bound.get(key)
        if b is not None and all(self._owner.get(n) is key for n in names):
            return b
        r = torch.zeros(padded, dtype=like.dtype, device=like.device)
        u = torch.zeros_like(r) if self.momentum else None
        for name, start, n in zip(names, starts, numels):
            for store, buf in ((self.residuals, r), (self.velocities, u)):
                if buf is None:
                    continue
                view = buf[start : start + n]
                old = store.get(name)
                if old is not None and old.numel() == n:
                    view.copy_(old.reshape(-1))
                store[name] = view
            self._owner[name] = key
        b = self._bound[key] = Bound(r, u, self.momentum)
        live = set(self._owner.values())
        for stale in [k for k in self._bound if k not in live]:
            del self._bound[stale]
        return b

    def accumulate(self, name: str, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = residual of `name` + this step's `grad` (with momentum correction: + the velocity
        u = m*u + grad); select from `out`. The residual itself changes only in `commit`.
        `out` may be `grad` itself; the buffers stay on the gradient's device."""
        grad = grad.reshape(-1)
        if self.momentum:
            u = self._buffer(self.velocities, name, grad)
            u.mul_(self.momentum).add_(grad)
            grad = u
        return torch.add(self._buffer(self.residuals, name, grad), grad, out=out)

    def commit(self, name: str, residual: torch.Tensor, sent: Optional[torch.Tensor] = None) -> None:
        """The residual of `name` becomes `residual` (what was accumulated and not sent, exactly);
        with momentum correction also zero the velocity where `sent` (a bool mask; None: everywhere)."""
        self.residuals[name].copy_(residual)
        if self.momentum:
            u = self.velocities[name]
            if sent is None:
                u.zero_()
            else:
                u.masked_fill_(sent, 0.0)

    def _buffer(self, store: dict, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = store.get(name)
        if buf is None or buf.shape != like.shape:
            buf = store[name] = torch.zeros_like(like)
            self._owner.pop(name, None)
        elif buf.device != like.device or buf.dtype != like.dtype:
            buf = store[name] = buf.to(like.device, like.dtype)
            self._owner.pop(name, None)
        return buf

    def state_dict(self) -> dict:
        # copies: the live buffers change in place next step, maybe while a checkpoint is written.
        return {
            "version": STATE_VERSION,
            "residuals": {k: v.detach().clone() for k, v in self.residuals.items()},
            "velocities": {k: v.detach().clone() for k, v in self.velocities.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CheckpointError(f"error-feedback state has version {state.get('version') if isinstance(state, dict) else None}, "
                                  f"expected {STATE_VERSION}: resume with the MacFleet version that wrote the checkpoint")
        # buffers move to the gradient's device/dtype on first use (accumulate or bind).
        self.residuals = {k: v.detach().clone() for k, v in state.get("residuals", {}).items()}
        self.velocities = {k: v.detach().clone() for k, v in state.get("velocities", {}).items()}
        self._bound.clear()
        self._owner.clear()


class Bound:
    """One bucket's residual buffer (and DGC velocity buffer) in workspace layout; see bind()."""

    __slots__ = ("residual", "velocity", "momentum")

    def __init__(self, residual: torch.Tensor, velocity: Optional[torch.Tensor], momentum: float):
        self.residual, self.velocity, self.momentum = residual, velocity, momentum

    def accumulate(self, work: torch.Tensor) -> torch.Tensor:
        """work (this step's gradient, in workspace layout) becomes residual + gradient, or with
        momentum correction residual + (u = m*u + gradient)."""
        if self.velocity is not None:
            self.velocity.mul_(self.momentum).add_(work)
            return torch.add(self.residual, self.velocity, out=work)
        return work.add_(self.residual)

    def commit(self, unsent: torch.Tensor, sent: Optional[torch.Tensor] = None) -> None:
        """The residual becomes `unsent`; the velocity is zeroed where `sent` (a bool mask)."""
        self.residual.copy_(unsent)
        if self.velocity is not None:
            if sent is None:
                self.velocity.zero_()
            else:
                self.velocity.masked_fill_(sent, 0.0)
