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
    """Per-parameter residuals (and DGC velocities) of one node.

    Redoable (an elastic fleet): a step's new residuals are written beside the current ones and
    take effect at the next step, unless `rollback()` says the step's exchange failed somewhere.
    A redone step then starts from the same residuals, so no gradient is counted twice. It costs
    a second residual buffer per bucket and no copy (the two swap)."""

    def __init__(self, cfg: CompressionConfig, redoable: bool = False):
        self.redoable = redoable
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bounds: list["Bound"] = []
        self._pending_step: Optional[int] = None
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
        # ==, not `is`: the key is a new tuple on every call.
        if b is not None and all(self._owner.get(n) == key for n in names):
            if b.pending:  # the same bucket again: a new step, so the last one counted
                self.settle()
            return b
        self.settle()
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
        b = self._bound[key] = Bound(r, u, self.momentum, self if self.redoable else None,
                                     [(name, start, n) for name, start, n in zip(names, starts, numels)])
        live = set(self._owner.values())
        for stale in [k for k in self._bound if k not in live]:
            del self._bound[stale]
        return b

    # -- steps that can be redone -----------------------------------------------------------------
    def begin(self, step: int) -> None:
        """A bucket of `step` is about to be reduced: a different step means the last one
        completed everywhere, so its residuals take effect."""
        if self._pending_step is not None and step != self._pending_step:
            self.settle()
        self._pending_step = step

    def settle(self) -> None:
        """The pending step's new residuals become the residuals."""
        for name, value in self._pending.items():
            self.residuals[name].copy_(value)
        for b in self._pending_bounds:
            b.swap()
            for name, start, n in b.names:
                self.residuals[name] = b.residual[start : start + n]
                if b.velocity is not None:
                    self.velocities[name] = b.velocity[start : start + n]
        self._pending.clear()
        self._pending_bounds.clear()

    def rollback(self) -> None:
        """The step's exchange failed on some rank: forget its new residuals (it will be redone)."""
        for b in self._pending_bounds:
            b.pending = False
        self._pending.clear()
        self._pending_bounds.clear()

    def accumulate(self, name: str, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = residual of `name` + this step's `grad` (with momentum correction: + the velocity
        u = m*u + grad); select from `out`. The residual itself changes only in `commit`.
        `out` may be `grad` itself; the buffers stay on the gradient's device."""
        if name in self._pending:  # the same parameter again: a new step
            self.settle()
        grad = grad.reshape(-1)
        if self.momentum:
            u = self._buffer(self.velocities, name, grad)
            u.mul_(self.momentum).add_(grad)
            grad = u
        return torch.add(self._buffer(self.residuals, name, grad), grad, out=out)

    def commit(self, name: str, residual: torch.Tensor, sent: Optional[torch.Tensor] = None) -> None:
        """The residual of `name` becomes `residual` (what was accumulated and not sent, exactly);
        with momentum correction also zero the velocity where `sent` (a bool mask; None: everywhere)."""
        if self.redoable:
            self._pending[name] = residual.detach().clone()
        else:
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
        self.settle()  # a checkpoint is taken at a step boundary, after the step completed
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
        self._pending.clear()
        self._pending_bounds.clear()


class Bound:
    """One bucket's residual buffer (and DGC velocity buffer) in workspace layout; see bind().
    Redoable (`owner` set): commit writes into spare buffers that `swap` makes current."""

    __slots__ = ("residual", "velocity", "momentum", "owner", "names", "pending", "_spare_r", "_spare_u")

    def __init__(self, residual: torch.Tensor, velocity: Optional[torch.Tensor], momentum: float,
                 owner: Optional[ErrorFeedback] = None, names: Optional[list] = None):
        self.residual, self.velocity, self.momentum = residual, velocity, momentum
        self.owner, self.names, self.pending = owner, names or [], False
        self._spare_r = torch.empty_like(residual) if owner is not None else None
        self._spare_u = torch.empty_like(velocity) if owner is not None and velocity is not None else None

    def accumulate(self, work: torch.Tensor) -> torch.Tensor:
        """work (this step's gradient, in workspace layout) becomes residual + gradient, or with
        momentum correction residual + (u = m*u + gradient)."""
        if self.velocity is not None:
            if self._spare_u is not None:  # the new velocity goes beside the current one
                u = torch.mul(self.velocity, self.momentum, out=self._spare_u).add_(work)
            else:
                u = self.velocity.mul_(self.momentum).add_(work)
            return torch.add(self.residual, u, out=work)
        return work.add_(self.residual)

    def next_residual(self) -> torch.Tensor:
        """The buffer `commit` puts the new residual in (the spare one when redoable). A codec
        may write the residual there itself and then `commit(None)`, which saves commit's copy
        of the bucket."""
        return self._spare_r if self.owner is not None else self.residual

    def commit(self, unsent: Optional[torch.Tensor], sent: Optional[torch.Tensor] = None) -> None:
        """The residual becomes `unsent` (None: already written into `next_residual()`); the
        velocity is zeroed where `sent` (a bool mask)."""
        if self.owner is not None:
            if unsent is not None:
                self._spare_r.copy_(unsent)
            if self._spare_u is not None:
                self._spare_u.zero_() if sent is None else self._spare_u.masked_fill_(sent, 0.0)
            self.pending = True
            self.owner._pending_bounds.append(self)
            return
        if unsent is not None:
            self.residual.copy_(unsent)
        if self.velocity is not None:
            if sent is None:
                self.velocity.zero_()
            else:
                self.velocity.masked_fill_(sent, 0.0)

    def swap(self) -> None:
        if not self.pending:
            return
        self.residual, self._spare_r = self._spare_r, self.residual
        if self._spare_u is not None:
            self.velocity, self._spare_u = self._spare_u, self.velocity
        self.pending = False
