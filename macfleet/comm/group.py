"""Group: a process group of N ranks and its public collective API (sync and async).

A Group owns one comm worker thread, which owns the Transport (all sockets) and runs
collectives one at a time in the order they were issued, so async calls from one rank complete
in issue order and every rank's n-th collective meets the peers' n-th. A sync call made while
nothing is queued or running runs inline on the caller's thread (the sockets move between threads
only under one lock, which is the memory barrier ZeroMQ asks for); otherwise it is queued
behind the others and waited for. A tensor on cuda or mps is staged (staging.py): the caller
only issues an asynchronous copy into a pooled host buffer, the comm thread waits for it, runs
the collective and copies the result back, so the caller's thread never waits for a copy or a
socket. Non-contiguous CPU tensors run on a contiguous copy that is copied back.
`abort(exc)` (from any thread, e.g. a heartbeat monitor) makes the running
and every later collective raise `exc` within about POLL_SLICE_S.

Lanes (`lanes`, default `default_lanes()`: MACFLEET_LANES, else one per 4 usable cores, at most
4). With lanes=k > 1 the group opens k data lanes beside itself: each a comm thread with its own
plain-TCP transport (tcp.py) and connections. Every all_reduce of at least LANE_MIN_BYTES,
every all_gather of that size whose caller promises the same shape on every rank (`equal=True`:
the codecs' payloads), and every broadcast of at least BROADCAST_LANE_MIN_BYTES (one-way, so
written on the calling thread there) goes to the next data lane in turn (every rank counts
the same calls, so the n-th one meets the peers' n-th on the same lane); an all_reduce of at
least 2 x SPLIT_PART_MIN_BYTES is cut into parts on consecutive lanes, reduced at once.
Everything else (small collectives, other gathers, barriers) runs here, on the transport asked
for. So several of DDP's buckets, or the parts of one, are reduced at once, on as many cores:
each lane's socket copies and sums leave the GIL, while one thread alone is bound by one core's
copies through the kernel. Futures still complete in issue order, and a collective on a tensor
that an earlier one (on any lane) still works on starts after that one has finished. The data
lanes listen on ports the system picks, told to the peers here when the group starts; every
rank opens as many as the rank that offers fewest (the default follows each machine's cores),
and they use sessions derived from the group's. A lost peer on any lane breaks them all.

`session` is a 64-bit id shared by every rank of one Group and different for any other run or
generation (framing.session_id derives one, framing.random_session draws one); frames stamped
with another session, e.g. from a dead run's socket still retrying this port, are rejected.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

import torch

from macfleet.comm import collectives
from macfleet.comm.framing import check_session, dtype_code, session_id
from macfleet.comm.staging import stager_for
from macfleet.comm.tcp import TcpTransport, check_transport, default_transport, open_listener
from macfleet.comm.threads import solo, span
from macfleet.comm.transport import Transport, check_stripes, default_stripes, split_addr
from macfleet.device import usable_cores
from macfleet.errors import FrameError, MacFleetError, PeerLostError

log = logging.getLogger(__name__)

_OPS = ("sum", "avg")
MAX_LANES = 8
LANE_MIN_BYTES = 1 << 20
"""An all_reduce or equal all_gather below this many bytes stays on the first lane: its time is
latency, not copies."""
SPLIT_PART_MIN_BYTES = 16 << 20
"""A contiguous all_reduce of at least twice this many bytes is cut into up to one part per data lane
(none under this size), reduced on all of them at once, so one large tensor is not held to one
lane's thread and connection. DDP's buckets (25 MB) stay whole: cut into 4 MB parts, they made
DDP on 2 GPUs at 128 images a node 0.58x one GPU against 0.91x-0.99x whole (README, "Lanes")."""
BROADCAST_LANE_MIN_BYTES = 64 << 10
"""A broadcast from this size goes to a data lane: it only flows one way, so the TCP transport
writes it on the calling thread (tcp.py, "Sending") and the receiver reads it straight into place."""


def check_lanes(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_LANES:
        raise MacFleetError(f"lanes={n!r}: give 1..{MAX_LANES} comm threads per group (MACFLEET_LANES)")
    return n


CORES_PER_LANE = 4
AUTO_MAX_LANES = 4


def default_lanes() -> int:
    """Lanes when none is given: MACFLEET_LANES (so a torchrun DDP job can set it), else one per
    CORES_PER_LANE cores this process may run on, at most AUTO_MAX_LANES: each lane keeps about
    a core busy while it copies, so a small machine (or a 1-core emulated node) keeps one.
    Measured on 2 H100s, 16 cores per rank, plain DDP ResNet-50: 1.41x gloo's samples/s with 4
    lanes and 1.29x with 2, against 0.52x for one ZeroMQ lane (README, "Accelerators")."""
    text = os.environ.get("MACFLEET_LANES", "").strip()
    if not text:
        return max(1, min(AUTO_MAX_LANES, usable_cores() // CORES_PER_LANE))
    if not text.isdigit():
        raise MacFleetError(f"MACFLEET_LANES={text!r}: give a whole number of comm lanes, 1..{MAX_LANES}")
    return check_lanes(int(text))


def _tensor_key(t) -> tuple | None:
    """Collectives on tensors with one key are kept in order across lanes: keyed by storage, so
    views of one buffer count as one tensor (a wait too many, never one too few)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return None
    return (str(t.device), t.untyped_storage().data_ptr())


def _check_equal(tp, parts: list[torch.Tensor], rows: torch.Tensor) -> None:
    """An all_gather with equal=True: every peer's part landed in its row of `rows`."""
    for src, part in enumerate(parts):
        if src != tp.rank and part.data_ptr() != rows[src].data_ptr():  # landed elsewhere: another shape
            raise FrameError(
                f"{tp.op} #{tp.seq}: rank {src} sent {tuple(part.shape)} {part.dtype}, rank {tp.rank} has "
                f"{tuple(rows.shape[1:])} {rows.dtype}: every rank must pass the same shape and dtype"
            )


def _wait_quietly(fut) -> None:
    """Wait for an earlier collective on the same tensor; its failure is its own caller's to see."""
    try:
        fut.wait()
    except BaseException:  # noqa: BLE001
        pass


def _on_device(fut: torch.futures.Future, device: torch.device) -> torch.futures.Future:
    """Results of collectives that allocate come back on the device the input lived on."""
    if device.type == "cpu":
        return fut
    return fut.then(lambda f: None if f.value() is None else [x.to(device) for x in f.value()])


class Group:
    """N ranks exchanging tensors over ZeroMQ. See the module docstring."""

    def __init__(self, rank: int, world_size: int, addrs: list[str], *, generation: int = 0, timeout: float = 60.0,
                 session: int = 0, chunk_bytes: int = collectives.DEFAULT_CHUNK_BYTES, algorithm: str = "auto",
                 stripes: int | None = None, transport: str | None = None, lanes: int | None = None,
                 _listener=None):
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
        # TCP connections per peer (transport.py, "Striping"); None: MACFLEET_STRIPES, else 1.
        self.stripes = default_stripes() if stripes is None else check_stripes(stripes)
        # ZeroMQ (transport.py) unless MACFLEET_TRANSPORT=tcp (tcp.py); striping is a ZeroMQ setting.
        kind = default_transport() if transport is None else check_transport(transport)
        # Extra lanes (module docstring) always run on plain TCP: a lane's listener is bound before
        # its port is known to the peers, which a ZeroMQ socket cannot adopt. This lane keeps the
        # transport asked for, so every rank's first lane speaks the same one whatever its cores.
        self.lanes = default_lanes() if lanes is None else check_lanes(lanes)
        """Data lanes this rank offered (1: none beside this group); once the group has started,
        the number every rank agreed on."""
        self.transport = "zmq" if self.stripes > 1 else kind
        self._listener = _listener
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
        self._lander: threading.Thread | None = None
        self._landings: queue.SimpleQueue | None = None
        self._in_flight: dict = {}  # (device, data_ptr) -> staged collectives not yet landed
        self._last_landing: dict = {}  # (device, data_ptr) -> the newest copy back's event
        self._lane_groups: list[Group] = [self]  # this group is the first lane
        self._parent: Group | None = None  # an extra lane's first lane
        self._turn = 0  # all_reduce calls spread over the lanes so far
        self._tail: torch.futures.Future | None = None  # the last future handed out (lanes > 1)
        self._tensor_tail: dict = {}  # tensor key -> the last future handed out for it (lanes > 1)
        ready: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True,
                                        name=f"macfleet-comm-r{rank}")
        self._thread.start()
        error = ready.get()
        if error is not None:
            self._thread.join()
            self._closed = True
            raise error
        if world_size == 1:
            self.lanes = 1
        elif _listener is None:  # not itself an extra lane
            try:
                self._open_lanes()
            except BaseException:
                self.close()
                raise

    # -- public API -------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self._step

    @property
    def collectives(self) -> int:
        """Collectives started so far; every rank starts the same ones in the same order."""
        return sum(lane._seq for lane in self._lane_groups)

    @property
    def per_lane(self) -> list[int]:
        """Collectives started so far on each lane: this group's own first, then the data lanes
        (what `macfleet benchmark` reads to say which lanes carried a size)."""
        return [lane._seq for lane in self._lane_groups]

    @property
    def settled(self) -> bool:
        """No collective queued or running, and none failed: every one started has completed."""
        for lane in self._lane_groups:
            with lane._state_lock:
                if lane._pending or lane._abort_exc is not None:
                    return False
        return True

    def set_step(self, step: int) -> None:
        """Frames carry this step; a peer at another step is a FrameError, not a silent mix."""
        # Queued, so collectives already issued keep the step they were issued with.
        for lane in self._lane_groups:
            lane._enqueue((lane._do_set_step, (int(step),), None, None))
            lane._step = int(step)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return self.all_reduce_async(t, op, _sync=True).wait()

    def all_reduce_async(self, t: torch.Tensor, op: str = "sum", *, _sync: bool = False) -> torch.futures.Future:
        if op not in _OPS:
            raise MacFleetError(f"all_reduce op={op!r} is not supported; use 'sum' or 'avg'")
        nbytes = t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
        return self._submit("all_reduce", collectives.all_reduce, t, op, self.algorithm, staged=True, sync=_sync,
                            spread=nbytes >= LANE_MIN_BYTES, split=True)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self.broadcast_async(t, src, _sync=True).wait()

    def broadcast_async(self, t: torch.Tensor, src: int = 0, *, _sync: bool = False) -> torch.futures.Future:
        self._check_rank(src, "src")
        nbytes = t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
        return self._submit("broadcast", collectives.broadcast, t, src, staged=True, sync=_sync,
                            spread=nbytes >= BROADCAST_LANE_MIN_BYTES)

    def all_gather(self, t: torch.Tensor, check=None, *, equal: bool = False) -> list[torch.Tensor]:
        return self.all_gather_async(t, check=check, equal=equal).wait()

    def all_gather_async(self, t: torch.Tensor, check=None, *, equal: bool = False) -> torch.futures.Future:
        """Every rank's `t` (shapes may differ), in rank order, on `t`'s device. `check(part)`,
        if given, runs on the comm thread on the host copy of every part (this rank's too)
        before it moves to the device: raise FrameError there to reject a malformed part, so
        validation costs no device synchronisation. A device `t` is staged like all_reduce's.

        `equal=True` promises that every rank passes the same shape and dtype (a codec's
        payloads, whose size the bucket's layout fixes; torch's all_gather): a part of another
        shape is then a FrameError. Such an all_gather of at least LANE_MIN_BYTES goes to the
        next data lane like a large all_reduce (every rank decides alike, from its own
        tensor), so a step's buckets are gathered on several lanes at once. On a device the
        parts land in one pooled host buffer and cross to the device in one copy, completed by
        the landing thread, and this rank's part never leaves the device."""
        self._check_tensor(t)
        nbytes = t.numel() * t.element_size()
        spread = equal and nbytes >= LANE_MIN_BYTES
        if t.device.type == "cpu":
            src = t.detach().contiguous()

            def run_cpu(tp, _, *rest):
                rows = torch.empty((tp.world_size, *src.shape), dtype=src.dtype) if equal else None
                parts = collectives.all_gather(tp, src, *rest, into=rows)
                if rows is not None:
                    parts[tp.rank] = rows[tp.rank].copy_(src)  # the caller may change `t` later
                if check is not None:
                    for part in parts:
                        check(part)
                if rows is not None:
                    _check_equal(tp, parts, rows)
                return parts

            # t: later lanes' writes to it wait for this read
            return self._submit("all_gather", run_cpu, t, spread=spread)
        stager = stager_for(t.device)
        after = self._unfinished(_tensor_key(t))
        handle = stager.to_host(t) if after is None else None
        ready = stager.mark() if after is not None else None

        def run_device(tp, _, *rest):
            nonlocal handle
            if handle is None:  # t is still in an earlier collective on another lane
                _wait_quietly(after)
                handle = stager.to_host(t, after=ready)
            host = stager.wait(handle)
            rows = stager.host_buffer((tp.world_size, *host.shape), host.dtype) if equal else None
            try:
                parts = collectives.all_gather(tp, host, *rest, into=None if rows is None else rows.host)
                if check is not None:
                    for part in parts:
                        check(part)
                if rows is not None:
                    _check_equal(tp, parts, rows.host)
            except BaseException:
                if rows is not None:
                    stager.release(rows)  # no send reads it: only receives wrote it
                raise
            if rows is None:
                out = [stager.new_on_device(p) for p in parts]
                stager.release(handle)  # all_gather's sends have left (it waits for them)
                return out
            stager.release(handle)
            dev, event = stager.rows_to_device(rows.host, t, tp.rank)
            return _Landing(list(dev.unbind(0)), stager, event, rows, None)

        return self._submit("all_gather", run_device, t, spread=spread)

    def gather(self, t: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        self._check_rank(dst, "dst")
        self._settle(t)
        return _on_device(self._submit("gather", collectives.gather, self._cpu(t), dst), t.device).wait()

    def scatter(self, tensors: list[torch.Tensor] | None, src: int = 0) -> torch.Tensor:
        self._check_rank(src, "src")
        if self.rank == src:
            if tensors is None or len(tensors) != self.world_size:
                raise MacFleetError(f"scatter: rank {src} must pass a list of {self.world_size} tensors, one per rank")
            device = tensors[src].device
            for x in tensors:
                self._settle(x)
            tensors = [self._cpu(x) for x in tensors]
        else:
            device = torch.device("cpu")
        return self._submit("scatter", collectives.scatter, tensors, src).wait().to(device)

    def barrier(self, timeout: float | None = None) -> None:
        token = torch.zeros(1, dtype=torch.int32)
        self._submit("barrier", collectives.all_reduce, token, "sum", self.algorithm, timeout=timeout, sync=True).wait()

    def abort(self, exc: BaseException) -> None:
        """Make the running and every later collective raise `exc` (callable from any thread)."""
        for lane in (self._parent or self)._lane_groups:  # a lost peer on one lane breaks them all
            if lane._abort_exc is None:
                lane._abort_exc = exc

    def check(self) -> None:
        """Raise the error that broke this group (a lost peer, an abort), if any."""
        self._abort_check()

    def close(self) -> None:
        """Finish queued collectives, close every socket and stop the worker (idempotent).
        Extra lanes close after the first, so a job waiting on another lane's earlier one finishes."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._close_worker()
        finally:
            for lane in self._lane_groups[1:]:
                lane.close()

    def _close_worker(self) -> None:
        self._jobs.put(None)
        self._thread.join(self.timeout + 10)
        if self._thread.is_alive():
            self.abort(MacFleetError("the group was closed while a collective was still running"))
            self._thread.join(10)
        if self._lander is not None:
            self._landings.put(None)
            self._lander.join(10)

    @property
    def rejected(self) -> list:
        """Recent malformed frames this rank rejected (FrameError instances), newest last."""
        return [exc for lane in self._lane_groups if lane._transport for exc in lane._transport.rejected]

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
                sync: bool = False, spread: bool = False, split: bool = False):
        """Queue a collective for the worker and return its future. A sync call (the caller waits
        at once) with nothing queued or running runs inline on the caller's thread instead: the
        same job under the same lock, minus two thread hand-offs (about 70 us here).
        With lanes, a `spread` collective goes to the next lane in turn, the rest to this one; a
        `split` one (an elementwise collective: each part's result depends on that part alone) of
        a contiguous tensor may be cut into parts on consecutive lanes (SPLIT_PART_MIN_BYTES)."""
        if self._closed:
            raise MacFleetError(f"{name} on a closed group; create a new Group")
        if len(self._lane_groups) == 1:
            return self._submit_here(name, fn, t, args, staged, timeout, sync, None)
        key = _tensor_key(t)
        after = self._unfinished(key)
        lane = self
        if spread:
            data = self._lane_groups[1:] or self._lane_groups
            parts = min(len(data), t.numel() * t.element_size() // SPLIT_PART_MIN_BYTES) if split else 1
            if parts > 1 and t.is_contiguous():
                return self._hand_out(self._submit_parts(name, fn, t, args, timeout, data, parts, after), key)
            lane = data[self._turn % len(data)]
            self._turn += 1
        fut = lane._submit_here(name, fn, t, args, staged, timeout, sync and after is None, after)
        return self._hand_out(fut, key)

    def _submit_parts(self, name: str, fn, t: torch.Tensor, args: tuple, timeout: float | None, data: list,
                      parts: int, after) -> torch.futures.Future:
        """`t` cut into `parts` near-equal slices, each queued on the next data lane in turn (every
        rank cuts alike: the size decides); the future completes with `t` once every part has."""
        flat = t.view(-1)
        bounds = [flat.numel() * i // parts for i in range(parts + 1)]
        futs = []
        for a, b in zip(bounds, bounds[1:]):
            lane = data[self._turn % len(data)]
            self._turn += 1
            futs.append(lane._submit_here(name, fn, flat[a:b], args, True, timeout, False, after))
        return _all_of(futs, t)

    def _hand_out(self, fut: torch.futures.Future, key) -> torch.futures.Future:
        """The future the caller gets (lanes > 1): completes after every earlier one, and is what
        a later collective on the same tensor waits for."""
        with self._state_lock:
            prev, self._tail = self._tail, None
            out = fut if prev is None or prev.done() else _after(prev, fut)
            self._tail = out
            if key is not None:
                self._tensor_tail[key] = out
        if key is not None:
            out.add_done_callback(lambda _f: self._forget(key, out))
        return out

    def _unfinished(self, key) -> torch.futures.Future | None:
        """The last future handed out for a tensor (its `_tensor_key`) if it has not completed."""
        if key is None or len(self._lane_groups) == 1:
            return None
        with self._state_lock:
            fut = self._tensor_tail.get(key)
        return fut if fut is not None and not fut.done() else None

    def _forget(self, key, fut) -> None:
        with self._state_lock:
            if self._tensor_tail.get(key) is fut:
                del self._tensor_tail[key]

    def _settle(self, t) -> None:
        """Caller's thread: wait until no earlier collective on another lane still works on `t`
        (for the sync collectives that copy `t` before they are queued)."""
        after = self._unfinished(_tensor_key(t))
        if after is not None:
            _wait_quietly(after)

    def _open_lanes(self) -> None:
        """Start lanes 2..k: each rank listens on system-picked ports for the extra lanes it
        offers, the ports go round on this lane (one all_gather, run by every rank, also those
        that offer none), and every rank opens as many as the rank that offers fewest (ranks
        with other core counts default to other lane counts); then each lane connects and shakes
        hands."""
        host = split_addr(self.addrs[self.rank])[0]
        socks = [open_listener(host) for _ in range(self.lanes if self.lanes > 1 else 0)]
        try:
            mine = torch.tensor([s.getsockname()[1] for s in socks], dtype=torch.int64)
            ports = self.all_gather(mine)
            agreed = min(len(p) for p in ports)  # 0 or at least 2: nobody offers a single data lane
            if max(agreed, 1) < self.lanes:
                log.info("rank %d: %d comm lane(s), as many as the rank with the fewest cores (this one offered %d)",
                         self.rank, max(agreed, 1), self.lanes)
            for sock in socks[agreed:]:
                sock.close()
            socks = socks[:agreed]
            self.lanes = max(agreed, 1)
            while socks:
                i = len(self._lane_groups) - 1
                addrs = [f"{split_addr(a)[0]}:{int(p[i])}" for a, p in zip(self.addrs, ports)]
                lane = Group(self.rank, self.world_size, addrs, generation=self.generation, timeout=self.timeout,
                             session=session_id(self.session, "lane", i + 1), chunk_bytes=self.chunk_bytes,
                             algorithm=self.algorithm, stripes=1, transport="tcp", lanes=1, _listener=socks[0])
                socks.pop(0)  # the lane's transport owns (and closes) it now
                lane._parent = self
                self._lane_groups.append(lane)
            if self.lanes > 1:
                log.info("rank %d: %d tcp data lanes for all_reduces of %d MB or more, beside the %s group",
                         self.rank, self.lanes, LANE_MIN_BYTES >> 20, self.transport)
        finally:
            for sock in socks:
                sock.close()

    def _submit_here(self, name: str, fn, t, args: tuple, staged: bool, timeout: float | None, sync: bool,
                     after: torch.futures.Future | None) -> torch.futures.Future:
        """Queue (or run inline) a collective on this lane; `after`: an earlier collective on the
        same tensor, on another lane, that this one must wait for before it reads the tensor."""
        fut: torch.futures.Future = torch.futures.Future()
        if staged:
            self._check_tensor(t)
            job = (name, self._staged(fn, t, args, after), fut, timeout)
        elif after is not None:
            def waiting(tp, *rest):
                _wait_quietly(after)
                return fn(tp, *rest)

            job = (name, (waiting, t, *args), fut, timeout)
        else:
            job = (name, (fn, t, *args), fut, timeout)
        if not (sync and self._run_inline(job)):
            self._enqueue(job)
        return fut

    def _staged(self, fn, t: torch.Tensor, args: tuple, after: torch.futures.Future | None = None) -> tuple:
        """An in-place collective's job on `t`: contiguous CPU tensors run as they are; anything
        else runs on a host copy that is copied back when the collective is done. A device
        tensor's copy is only issued here (see staging.py): the caller never waits for it."""
        if t.device.type == "cpu":
            work = t if t.is_contiguous() else t.contiguous()

            def run_cpu(tp, *rest):
                if after is not None:
                    _wait_quietly(after)
                    if work is not t:
                        work.copy_(t)
                fn(tp, work, *rest)
                if work is not t:
                    t.copy_(work)
                return t

            return (run_cpu, *args)
        stager = stager_for(t.device)
        key = (str(t.device), t.data_ptr())
        with self._state_lock:
            chained = self._in_flight.get(key, 0) > 0 or after is not None
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        # A tensor already in an earlier, unfinished collective must be read after that one's
        # result has landed in it (as on one CUDA stream): its copy is issued later, in order.
        handle = None if chained else stager.to_host(t)
        ready = stager.mark() if chained else None

        def run_device(tp, *rest):
            nonlocal handle
            if handle is None:
                if after is not None:
                    _wait_quietly(after)
                stager.landed(self._last_landing.get(key))
                handle = stager.to_host(t, after=ready)
            host = stager.wait(handle)
            fn(tp, host, *rest)
            # The copy back is only issued: the landing thread completes the future once it is on
            # the device, while this thread starts the next collective. The host buffer returns
            # to the pool only after success (a failed collective may leave zero-copy sends
            # holding it).
            event = stager.to_device_async(host, t)
            self._last_landing[key] = event
            return _Landing(t, stager, event, handle, key)

        return (run_device, *args)

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
        solo()  # this thread's torch CPU ops start no OpenMP team (macfleet/comm/threads.py)
        try:
            extra = {"listener": self._listener} if self._listener is not None else {}
            make = TcpTransport if self.transport == "tcp" else Transport
            tp = make(self.rank, self.world_size, self.addrs, generation=self.generation,
                      timeout=self.timeout, session=self.session, abort_check=self._abort_check,
                      stripes=self.stripes, **extra)
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
            with span(f"comm.{name}"):
                result = fn(tp, *rest, time.monotonic() + limit, self.chunk_bytes)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
            self._broken = self._broken or isinstance(exc, PeerLostError)
            if isinstance(exc, PeerLostError) and self._abort_exc is None:
                # Peers may be mid-collective with us; later calls must fail, not desync (on
                # every lane).
                self.abort(exc)
            fut.set_exception(exc)
            return
        if isinstance(result, _Landing):
            self._land(result, fut)
            return
        fut.set_result(result)

    def _land(self, landing: "_Landing", fut: torch.futures.Future) -> None:
        """Complete `fut` once `landing` is on the device, on the landing thread (FIFO, so futures
        still complete in issue order)."""
        with self._state_lock:
            if self._lander is None:
                self._landings = queue.SimpleQueue()
                self._lander = threading.Thread(target=self._run_lander, daemon=True,
                                                name=f"macfleet-land-r{self.rank}")
                self._lander.start()
            self._landings.put((landing, fut))

    def _run_lander(self) -> None:
        solo()  # callbacks of the futures it completes run here
        while True:
            item = self._landings.get()
            if item is None:
                return
            landing, fut = item
            try:
                with span("comm.landing"):
                    landing.stager.landed(landing.event)
                landing.stager.release(landing.handle)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
                fut.set_exception(exc)
                continue
            finally:
                self._done_with(landing.key)
            fut.set_result(landing.value)

    def _done_with(self, key) -> None:
        with self._state_lock:
            left = self._in_flight.get(key, 1) - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)
                self._last_landing.pop(key, None)


class _Landing:
    """A collective's result still crossing to the device (see Group._land)."""

    __slots__ = ("value", "stager", "event", "handle", "key")

    def __init__(self, value, stager, event, handle, key):
        self.value, self.stager, self.event, self.handle, self.key = value, stager, event, handle, key


def _all_of(futs: list[torch.futures.Future], value) -> torch.futures.Future:
    """A future that completes with `value` once every one of `futs` has, or with the first
    one's error (still only once all are done: no part is left working on the tensor)."""
    out: torch.futures.Future = torch.futures.Future()
    left = [len(futs)]
    lock = threading.Lock()

    def one(_):
        with lock:
            left[0] -= 1
            if left[0]:
                return
        for f in futs:
            try:
                f.value()
            except BaseException as exc:  # noqa: BLE001 - the collective's own error
                out.set_exception(exc)
                return
        out.set_result(value)

    for f in futs:
        f.add_done_callback(one)
    return out


def pass_outcome(done: torch.futures.Future, out: torch.futures.Future) -> None:
    """Complete `out` as the completed `done` did: its value, or its error as raised."""
    try:
        value = done.value()
    except BaseException as exc:  # noqa: BLE001 - the collective's own error
        out.set_exception(exc)
        return
    out.set_result(value)


def _after(prev: torch.futures.Future, fut: torch.futures.Future) -> torch.futures.Future:
    """A future with `fut`'s outcome that completes only once `prev` has too (issue order)."""
    out: torch.futures.Future = torch.futures.Future()
    prev.add_done_callback(lambda _p: fut.add_done_callback(lambda f: pass_outcome(f, out)))
    return out

