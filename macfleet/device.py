"""Device choice: `auto` picks mps, then cuda, then cpu."""

from __future__ import annotations

import os

import torch

from macfleet.errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """Return the torch device for `name` (auto | mps | cuda | cpu), checking it exists."""
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        if mps_ok:
            return torch.device("mps")
        if torch.cuda.is_available():
            return _local_cuda()
        return torch.device("cpu")
    if name == "mps" and not mps_ok:
        raise ConfigError("trainer.device=mps but MPS is not available here (needs Apple Silicon and macOS 12.3+); use device=auto")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA GPU is visible; use device=auto or cpu")
    if name not in ("mps", "cuda", "cpu"):
        raise ConfigError(f"unknown device {name!r}; choose auto, mps, cuda or cpu")
    return _local_cuda() if name == "cuda" else torch.device(name)


def _local_cuda() -> torch.device:
    """cuda, or under torchrun (LOCAL_RANK set) this process's own GPU of the host's."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or "TORCHELASTIC_RUN_ID" not in os.environ:
        return torch.device("cuda")
    index = int(local) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so timings and host copies see finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity on Linux (a pinned emulated node sees
    its own), every core on macOS, which has no affinity."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
