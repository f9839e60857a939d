"""Group: a process group of N ranks and its public collective API (sync and async).

A Group owns one comm worker thread, which owns the Transport (all sockets) and runs
collectives one at a time in the order they were issued, so async calls from one rank complete
in issue order and every rank's n-th collective meets the peers' n-th. A sync call made while
nothing is queued or running runs inline on the caller's thread (the sockets move between threads
only under one lock, which is the memory barrier ZeroMQ asks for); otherwise it is queued
behind the others and waited for. Tensors on cuda/mps, or not contiguous, are staged through a contiguous CPU
copy and copied back. `abort(exc)` (from any thread, e.g. a heartbeat monitor) makes the running
and every later collective raise `exc` within about POLL_SLICE_S.

`session` is a 64-bit id shared by every rank of one Group and different for any other run or
generation (framing.session_id derives one, framing.random_session draws one); frames stamped
with another session, e.g. from a dead run's socket still retrying this port, are rejected.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from macfleet.comm import collectives
from macfleet.comm.framing import check_session, dtype_code
from macfleet.comm.transport import Transport
from macfleet.errors import MacFleetError, PeerLostError

log = logging.getLogger(__name__)

_OPS = ("sum", "avg")


def _on_device(fut: torch.futures.Future, device: torch.device) -> torch.futures.Future:
    """Results of collectives that allocate come back on the device the input lived on."""
    if device.type == "cpu":
        return fut
    return fut.then(lambda f: None if f.value() is None else [x.to(device) for x in f.value()])


def _checked(fut: torch.futures.Future, check) -> torch.futures.Future:
    """`fut`'s tensors after check(x) on each; an error keeps its type (then() would wrap it)."""
    out: torch.futures.Future = torch.futures.Future()

    def done(f):
        try:
            tensors = f.value()
            for x in tensors:
                check(x)
            out.set_result(tensors)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
            out.set_exception(exc)

    fut.add_done_callback(done)
    return out


class Group:
    """N ranks exchanging tensors over ZeroMQ. See the module docstring."""

    def __init__(self, rank: int, world_size: int, addrs: list[str], *, generation: int = 0, timeout: float = 60.0,
                 session: int = 0, chunk_bytes: int = collectives.DEFAULT_CHUNK_BYTES, algorithm: str = "auto"):
        if world_size < 1 or not 0 <= rank < world_size:
            raise MacFleetError(f"rank {rank} is not in a group of {world_size}; ranks run 0..world_size-1")
        if len(addrs) != world_size:
            raise MacFleetError(f"{len(addrs)} addresses for {world_size} ranks: give one host:port per rank")
        if timeout <= 0:
            raise MacFleetError(f"timeout={timeout} must be > 0 seconds")
        self.rank = rank
        self.world_size = world_size
        self.addrs = list(addrs)
        self.generation = generation
        self.session = check_session(session)
        self.timeout = float(timeout)
        self.chunk_bytes = int(chunk_bytes)
        try:
            self.algorithm = collectives.check_algorithm(algorithm)
        except ValueError as exc:
            raise MacFleetError(str(exc)) from None
        self._step = 0
        self._seq = 0
        self._abort_exc: BaseException | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._transport: Transport | None = None
        # A job runs while holding _exec_lock, on the worker or inline on a caller's thread (see
        # _submit); _pending counts jobs queued or running, under _state_lock.
        self._exec_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._pending = 0
        self._broken = False
        ready: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True,
                                        name=f"macfleet-comm-r{rank}")
        self._thread.start()
        error = ready.get()
        if error is not None:
            self._thread.join()
            self._closed = True
            raise error

    # -- public API -------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self._step

    def set_step(self, step: int) -> None:
        """Frames carry this step; a peer at another step is a FrameError, not a silent mix."""
        # Queued, so collectives already issued keep the step they were issued with.
        self._enqueue((self._do_set_step, (int(step),), None, None))
        self._step = int(step)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return self.all_reduce_async(t, op, _sync=True).wait()

    def all_reduce_async(self, t: torch.Tensor, op: str = "sum", *, _sync: bool = False) -> torch.futures.Future:
        if op not in _OPS:
            raise MacFleetError(f"all_reduce op={op!r} is not supported; use 'sum' or 'avg'")
        return self._submit("all_reduce", collectives.all_reduce, t, op, self.algorithm, staged=True, sync=_sync)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self.broadcast_async(t, src, _sync=True).wait()

    def broadcast_async(self, t: torch.Tensor, src: int = 0, *, _sync: bool = False) -> torch.futures.Future:
        self._check_rank(src, "src")
        return self._submit("broadcast", collectives.broadcast, t, src, staged=True, sync=_sync)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return self.all_gather_async(t).wait()

    def all_gather_async(self, t: torch.Tensor, *, check=None) -> torch.futures.Future:
        """`check(cpu_tensor)`, if given, runs on the comm thread on the host copy of every gathered
        tensor (own included) before any is moved to t's device; what it raises fails the future."""
        fut = self._submit("all_gather", collectives.all_gather, self._cpu(t))
        if check is not None:
            fut = _checked(fut, check)
        return _on_device(fut, t.device)

    def gather(self, t: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        self._check_rank(dst, "dst")
        return _on_device(self._submit("gather", collectives.gather, self._cpu(t), dst), t.device).wait()

    def scatter(self, tensors: list[torch.Tensor] | None, src: int = 0) -> torch.Tensor:
        self._check_rank(src, "src")
        if self.rank == src:
            if tensors is None or len(tensors) != self.world_size:
                raise MacFleetError(f"scatter: rank {src} must pass a list of {self.world_size} tensors, one per rank")
            device = tensors[src].device
            tensors = [self._cpu(x) for x in tensors]
        else:
            device = torch.device("cpu")
        return self._submit("scatter", collectives.scatter, tensors, src).wait().to(device)

    def barrier(self, timeout: float | None = None) -> None:
        token = torch.zeros(1, dtype=torch.int32)
        self._submit("barrier", collectives.all_reduce, token, "sum", self.algorithm, timeout=timeout, sync=True).wait()

    def abort(self, exc: BaseException) -> None:
        """Make the running and every later collective raise `exc` (callable from any thread)."""
        if self._abort_exc is None:
            self._abort_exc = exc

    def check(self) -> None:
        """Raise the error that broke this group (a lost peer, an abort), if any."""
        self._abort_check()

    def close(self) -> None:
        """Finish queued collectives, close every socket and stop the worker (idempotent)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._jobs.put(None)
        self._thread.join(self.timeout + 10)
        if self._thread.is_alive():
            self.abort(MacFleetError("the group was closed while a collective was still running"))
            self._thread.join(10)

    @property
    def rejected(self) -> list:
        """Recent malformed frames this rank rejected (FrameError instances), newest last."""
        return list(self._transport.rejected) if self._transport else []

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Group(rank={self.rank}, world_size={self.world_size}, generation={self.generation}, "
                f"session={self.session:#018x})")

    # -- internals --------------------------------------------------------------------------
    def _check_rank(self, r: int, name: str) -> None:
        if not 0 <= r < self.world_size:
            raise MacFleetError(f"{name}={r} is not a rank of this group of {self.world_size}")

    @staticmethod
    def _check_tensor(t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):
            raise MacFleetError(f"expected a torch.Tensor, got {type(t).__name__}")
        dtype_code(t.dtype)  # raises a clear error for unsupported dtypes

    def _cpu(self, t: torch.Tensor) -> torch.Tensor:
        self._check_tensor(t)
        return t.detach().to("cpu").contiguous()

    def _submit(self, name: str, fn, t, *args, staged: bool = False, timeout: float | None = None,
                sync: bool = False):
        """Queue a collective for the worker and return its future. A sync call (the caller waits
        at once) with nothing queued or running runs inline on the caller's thread instead: the
        same job under the same lock, minus two thread hand-offs (about 70 us here)."""
        if self._closed:
            raise MacFleetError(f"{name} on a closed group; create a new Group")
        fut: torch.futures.Future = torch.futures.Future()
        if staged:
            self._check_tensor(t)
            # In-place collectives: run on a contiguous CPU tensor, then copy back if it was staged.
            work = t if (t.device.type == "cpu" and t.is_contiguous()) else t.detach().to("cpu").contiguous()
            inner = torch.futures.Future()

            def finish(f):
                try:
                    f.value()
                    if work is not t:
                        t.copy_(work)
                    fut.set_result(t)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
                    fut.set_exception(exc)

            inner.add_done_callback(finish)
            job = (name, (fn, work, *args), inner, timeout)
        else:
            job = (name, (fn, t, *args), fut, timeout)
        if not (sync and self._run_inline(job)):
            self._enqueue(job)
        return fut

    def _enqueue(self, job) -> None:
        with self._state_lock:
            self._pending += 1
            self._jobs.put(job)

    def _run_inline(self, job) -> bool:
        with self._state_lock:
            if self._pending or self._transport is None:
                return False
            # Nothing is queued or running, so the worker is idle and the lock is free: taking it
            # before _state_lock is released keeps issue order with jobs queued meanwhile.
            self._exec_lock.acquire()
            tp = self._transport
            if tp is None:  # closed meanwhile
                self._exec_lock.release()
                return False
            self._pending += 1
        try:
            self._execute(tp, job)
        finally:
            self._exec_lock.release()
            with self._state_lock:
                self._pending -= 1
        return True

    def _do_set_step(self, step: int) -> None:
        if self._transport is not None:
            self._transport.step = step

    def _abort_check(self) -> None:
        if self._abort_exc is not None:
            raise self._abort_exc

    def _run(self, ready: queue.SimpleQueue) -> None:
        try:
            tp = Transport(self.rank, self.world_size, self.addrs, generation=self.generation,
                           timeout=self.timeout, session=self.session, abort_check=self._abort_check)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the constructor
            ready.put(exc)
            return
        try:
            if self.world_size > 1:
                tp.handshake(time.monotonic() + self.timeout)
        except BaseException as exc:  # noqa: BLE001
            tp.close(linger=False)
            ready.put(exc)
            return
        self._transport = tp
        ready.put(None)
        while True:
            job = self._jobs.get()
            if job is None:
                break
            try:
                with self._exec_lock:
                    self._execute(tp, job)
            finally:
                with self._state_lock:
                    self._pending -= 1
        with self._exec_lock:
            self._transport = None
            tp.close(linger=not self._broken and self._abort_exc is None)

    def _execute(self, tp: Transport, job) -> None:
        """Run one queued job (a collective, or a set_step) with _exec_lock held."""
        name, args, fut, timeout = job
        if fut is None:  # a queued set_step
            name(*args)
            return
        if self._abort_exc is not None:
            fut.set_exception(self._abort_exc)
            return
        self._seq += 1
        tp.seq, tp.op = self._seq, name
        limit = self.timeout if timeout is None else float(timeout)
        tp.op_timeout = limit
        fn, *rest = args
        try:
            result = fn(tp, *rest, time.monotonic() + limit, self.chunk_bytes)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
            self._broken = self._broken or isinstance(exc, PeerLostError)
            if isinstance(exc, PeerLostError) and self._abort_exc is None:
                # Peers may be mid-collective with us; later calls must fail, not desync.
                self._abort_exc = exc
            fut.set_exception(exc)
            return
        fut.set_result(result)

