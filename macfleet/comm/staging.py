"""Staging: device tensors to reused host buffers and back, without blocking the caller.

The engine moves bytes from host memory, so a collective on a cuda or mps tensor needs a host
copy. A synchronous `t.to("cpu")` on the caller's thread (the autograd thread, inside a DDP
comm hook) waits for every kernel queued before it and for the copy itself: measured on 2 H100s
it made DDP over macfleet 0.51x gloo. Here the caller only *issues* the copy:

    staged = stager.to_host(t)      # caller's thread: queue a device->host copy, return at once
    host = staged.wait()            # comm thread: block until the bytes are in `host`
    ... run the collective on `host` ...
    event = stager.to_device_async(host, t)   # comm thread: issue the copy back
    stager.landed(event)            # landing thread: block until it is on the device
    stager.release(staged)          # the host buffer goes back to the pool

CUDA: the copy waits for the caller's current stream through an event (no host wait), runs on
a dedicated copy stream into a pinned buffer (page-locked, so the DMA engine copies it
asynchronously), and records an event the comm thread synchronises on. Results go back the
same way on a second copy stream, so a result never queues behind later buckets' copies to the
host (each waiting for backward to produce its gradients); once the landing thread has seen
its event, any kernel launched after the collective's future completes reads the result.

MPS (unverified on a Mac; the same shape, coded against PyTorch's documented MPS API): one
command queue, unified memory, no pinned memory. Copies are issued with non_blocking=True and an
`torch.mps.Event` recorded after them; the comm thread synchronises on that event before it reads
or hands the result over.

Host buffers are pooled by size: DDP's buckets have fixed sizes, so after the first step no
buffer is allocated (a fresh pinned allocation costs milliseconds; a fresh pageable one page
faults on every first touch).
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict

import torch

from macfleet.comm.threads import span

MAX_FREE_PER_SIZE = 8
"""Free host buffers kept per byte size (DDP keeps a handful of buckets in flight)."""


class Staged:
    """A device tensor's bytes on their way to (or in) a host buffer."""

    __slots__ = ("host", "event", "nbytes", "source")

    def __init__(self, host: torch.Tensor, event, nbytes: int, source: torch.Tensor):
        self.host = host
        self.event = event
        self.nbytes = nbytes
        self.source = source  # keeps the device tensor alive until the copy is done

    def wait(self) -> torch.Tensor:
        """Block (the comm thread) until the copy finished; the host tensor, shaped like the source."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.host


class Stager:
    """Asynchronous device<->host copies through pooled host buffers for one device."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.kind = self.device.type
        self._lock = threading.Lock()
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._stream = None
        self.seconds = 0.0
        """Comm-thread seconds spent waiting for copies (both directions), for the step breakdown."""
        self.bytes = 0
        if self.kind == "cuda":
            self._stream = torch.cuda.Stream(device=self.device)
            # Results go back on a stream of their own: on the one above they queued behind later
            # buckets' copies to the host, each waiting for backward to produce its gradients.
            self._back = torch.cuda.Stream(device=self.device)

    # -- buffers ------------------------------------------------------------------------------
    def _acquire(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.kind == "cuda")

    def release(self, staged: Staged) -> None:
        buf = staged.host
        staged.source = None
        with self._lock:
            free = self._free[staged.nbytes]
            if len(free) < MAX_FREE_PER_SIZE:
                free.append(_raw(buf))

    # -- copies -------------------------------------------------------------------------------
    def mark(self):
        """An event on the caller's current stream (what a later `to_host(after=...)` waits for)."""
        if self.kind == "cuda":
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        if self.kind == "mps":
            ev = torch.mps.Event()
            ev.record()
            return ev
        return None

    def to_host(self, t: torch.Tensor, after=None) -> Staged:
        """Issue a copy of device tensor `t` into a host buffer; never waits (caller's thread).
        `after` (from `mark`) orders the copy after that event instead of the current stream."""
        src = t.detach()
        if not src.is_contiguous():
            src = src.contiguous()  # a device kernel, queued like any other
        nbytes = src.numel() * src.element_size()
        raw = self._acquire(nbytes)
        host = raw.view(src.dtype).view(src.shape) if nbytes else torch.empty(src.shape, dtype=src.dtype)
        if nbytes == 0:
            return Staged(host, None, 0, src)
        if self.kind == "cuda":
            ready = after if after is not None else self.mark()
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                host.copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
            src.record_stream(self._stream)
            return Staged(host, done, nbytes, src)
        if self.kind == "mps":
            if after is not None:
                after.synchronize()  # a chained copy, issued on the comm thread
            host.copy_(src, non_blocking=True)
            done = torch.mps.Event()
            done.record()
            return Staged(host, done, nbytes, src)
        host.copy_(src)
        return Staged(host, None, nbytes, src)

    def wait(self, staged: Staged) -> torch.Tensor:
        """Comm thread: the host tensor once its bytes have arrived."""
        start = time.perf_counter()
        with span("comm.staging_wait"):
            host = staged.wait()
        self.seconds += time.perf_counter() - start
        self.bytes += staged.nbytes
        return host

    def to_device_async(self, host: torch.Tensor, t: torch.Tensor):
        """Comm thread: issue the copy of `host` into device tensor `t`; returns what `landed`
        waits on (None when nothing is pending), so the comm thread can start the next collective
        while this result crosses to the device."""
        if t.numel() == 0:
            return None
        self.bytes += host.numel() * host.element_size()
        src = host.view(t.shape)
        if self.kind == "cuda":
            with torch.cuda.stream(self._back):
                t.copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._back)
            return done
        if self.kind == "mps":
            t.copy_(src, non_blocking=True)
            done = torch.mps.Event()
            done.record()
            return done
        t.copy_(src)
        return None

    def landed(self, event) -> None:
        """Block (the landing thread) until a copy issued by to_device_async is on the device."""
        if event is not None:
            start = time.perf_counter()
            event.synchronize()
            self.seconds += time.perf_counter() - start

    def host_buffer(self, shape: tuple, dtype: torch.dtype) -> Staged:
        """A pooled host buffer (pinned on CUDA) for bytes that arrive from the network, such as
        an all_gather's parts; give it back with `release` once its copy to the device landed."""
        nbytes = math.prod(shape) * dtype.itemsize
        raw = self._acquire(nbytes)
        host = raw.view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)
        return Staged(host, None, nbytes, None)

    def rows_to_device(self, rows: torch.Tensor, own: torch.Tensor, rank: int):
        """Comm thread: issue one copy of an all_gather's host rows (a `host_buffer`) to a new
        device tensor, whose row `rank` is then copied from `own` (this rank's part, still on the
        device: it never makes the round trip). Returns (the device tensor, what `landed` waits on)."""
        self.bytes += rows.numel() * rows.element_size()
        if self.kind != "cuda":  # mps: one command queue, so the copies run in this order
            out = torch.empty(rows.shape, dtype=rows.dtype, device=self.device)
            out.copy_(rows, non_blocking=True)
            out[rank].copy_(own.reshape(out.shape[1:]), non_blocking=True)
            done = torch.mps.Event()
            done.record()
            return out, done
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._back):  # allocated for the copy stream: see new_on_device
            out = torch.empty(rows.shape, dtype=rows.dtype, device=self.device)
            out.copy_(rows, non_blocking=True)
            # `own`'s copy to the host has been waited for (after the event its producer's stream
            # recorded), so its producer is done and this stream may read it.
            out[rank].copy_(own.reshape(out.shape[1:]), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._back)
        own.record_stream(self._back)
        out.record_stream(consumer)  # freed after the consumers' kernels, not just the copy
        return out, done

    def new_on_device(self, host: torch.Tensor) -> torch.Tensor:
        """Comm thread: a device copy of a host tensor (a received all_gather part), landed."""
        if self.kind != "cuda":
            out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            self.landed(self.to_device_async(host, out))
            return out
        # Allocated for the copy stream: a block fresh from the caching allocator is only safe on
        # the stream it was allocated for (kernels queued on another stream may still use its
        # last owner's memory). Allocated on the default stream and written by the copy stream,
        # a received top-k payload was overwritten by a pending kernel (a device-side index
        # assert in a 2-GPU ResNet-50 run).
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._back):
            out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self.landed(self.to_device_async(host, out))
        out.record_stream(consumer)  # freed after the consumers' kernels, not just the copy
        return out


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The flat uint8 storage a pooled buffer was carved from."""
    return t.reshape(-1).view(torch.uint8)


_stagers: dict[torch.device, Stager] = {}
_stagers_lock = threading.Lock()


def stager_for(device: torch.device) -> Stager:
    """One Stager per device in this process (its copy stream and buffer pool are shared)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _stagers_lock:
        st = _stagers.get(device)
        if st is None:
            st = _stagers[device] = Stager(device)
        return st
