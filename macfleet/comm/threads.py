"""Comm threads keep torch's CPU ops to themselves.

torch runs a CPU op over its intra-op OpenMP pool, and every thread that runs one starts an
OpenMP team of its own, whose workers spin-wait after each op. A node's process is pinned to its
cores, so a comm thread's team competes with the training thread, the autograd thread and
libzmq's I/O threads. What comm threads compute (sums, a codec's casts and sums in a future's
callback) is memory-bound and pipelined with the network: one thread each is enough.

`solo()` sets the calling thread's OpenMP thread count to 1. That count is per thread;
torch.set_num_threads would also set the count every thread torch starts later takes (the
autograd thread among them). Where torch's OpenMP runtime is not found (a build without one),
nothing changes and `solo()` says so.

`span(name)` marks a part of a comm thread's work in a step profile's trace
(`trainer.profile_steps`, see macfleet/profile.py), which turns `tracing` on while it records.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os

import torch


@functools.lru_cache(maxsize=1)
def _omp_set_num_threads():
    """`omp_set_num_threads` of the OpenMP runtime torch ships (libgomp on Linux, libomp on
    macOS), or None."""
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for pattern in ("libgomp*.so*", "libomp*.dylib", "libomp*.so*", "libiomp5*"):
        for path in sorted(glob.glob(os.path.join(libdir, pattern))):
            try:
                fn = ctypes.CDLL(path).omp_set_num_threads
            except (OSError, AttributeError):
                continue
            fn.argtypes, fn.restype = [ctypes.c_int], None
            return fn
    return None


def solo() -> bool:
    """Run this thread's torch CPU ops on this thread alone; True if that took effect."""
    fn = _omp_set_num_threads()
    if fn is None:
        return False
    torch.get_num_threads()  # torch sets a thread's count at its first op: have that happen first
    fn(1)
    return torch.get_num_threads() == 1


_tracing = False
_NOTHING = contextlib.nullcontext()


def tracing(on: bool) -> None:
    """Turn comm threads' spans on (a step profile is recording, on all threads) or off."""
    global _tracing
    _tracing = bool(on)


def span(name: str):
    """A range named `name` in the profile's trace while one is recorded; a no-op otherwise (a
    profiler range costs about 15 us; the check, a global's read)."""
    return torch.profiler.record_function(name) if _tracing else _NOTHING
