"""Data-plane sockets of one rank: one PULL socket bound on its tensor port, `stripes` PUSH per peer.

The Transport is owned by a single thread (the Group's comm worker): ZeroMQ sockets are not
thread-safe, so every socket here is created, used and closed on that thread. It owns
- `make_socket`, the one place where socket options (linger, HWM, buffers, timeouts) are set;
- the connection check (HELLO from every peer, with a deadline);
- `send`, which frames a chunk and hands it to libzmq (zero-copy above COPY_THRESHOLD);
- `tune_allocator`, which keeps glibc from page-faulting every received chunk afresh;
- `recv`, which returns the next valid chunk from one peer for the current collective (landed in
  a given buffer, or as a zero-copy view of libzmq's receive buffer for sums): frames
  from other peers are parked per sender (PULL fair-queues all senders on one socket), frames of
  another generation or of an older collective are dropped, malformed frames and frames of
  another session (a stale socket of an earlier run still delivering to this port) are rejected
  (kept in `rejected`, logged) while the receiver keeps waiting, and a deadline turns silence into
  `PeerLostError` naming the peer's rank and address.

Striping (`stripes`, default MACFLEET_STRIPES or 1): each rank opens `stripes` PUSH sockets to
every peer, all to the peer's one tensor port, so one peer's traffic crosses `stripes` TCP
connections served by different libzmq I/O threads (the context gets 2 per stripe): a fast link
is no longer bound by one I/O thread's copies through the kernel. Chunks go round-robin over a
peer's stripes and may arrive out of order, so with stripes > 1 a receive names the byte offset
it waits for and chunks of the same collective at other offsets are parked until asked for; every
zero-copy send is tracked, and a tracked send's tracker covers the last send on every stripe to
that peer (the "last send is tracked" rule of one in-order socket no longer holds alone). A stripe
that loses a chunk is silence like any other: PeerLostError at the deadline, naming the chunks
that did arrive. With stripes == 1 every rule is that of one in-order socket.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import logging
import os
import socket as pysocket
import sys
import time

import torch
import zmq
import zmq.utils.monitor

from macfleet.comm import framing
from macfleet.comm.framing import KIND_DATA, KIND_HELLO, Header
from macfleet.errors import FrameError, MacFleetError, PeerLostError

log = logging.getLogger(__name__)

COPY_THRESHOLD = 64 * 1024
"""Bodies smaller than this are copied into the zmq message: cheaper than zero-copy bookkeeping."""
POLL_SLICE_S = 0.05
HELLO_RESEND_S = 0.5
"""An unacknowledged HELLO is sent again after this long (it may have reached a stale listener)."""
"""Longest a receive waits before looking at the abort flag again (abort answers within this)."""
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
IO_THREADS = 2
MAX_STRIPES = 16
"""Most TCP connections per peer (see Striping above)."""
REJECTED_KEPT = 32
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 128 * 1024 * 1024
_allocator_tuned = False


def default_stripes() -> int:
    """Stripes per peer when none is given: MACFLEET_STRIPES (so a torchrun DDP job can set it), else 1."""
    text = os.environ.get("MACFLEET_STRIPES", "").strip() or "1"
    if not text.isdigit():
        raise MacFleetError(f"MACFLEET_STRIPES={text!r}: give a whole number of TCP connections per peer, 1..{MAX_STRIPES}")
    return check_stripes(int(text))


def check_stripes(stripes) -> int:
    if isinstance(stripes, bool) or not isinstance(stripes, int) or not 1 <= stripes <= MAX_STRIPES:
        raise MacFleetError(f"stripes={stripes!r}: give 1..{MAX_STRIPES} TCP connections per peer")
    return stripes


def tune_allocator() -> None:
    """Let glibc reuse the memory of freed receive buffers instead of returning it to the kernel.

    libzmq mallocs a fresh buffer for every received chunk. With glibc's defaults those buffers
    are mmap'd, or carved from a heap that is trimmed as soon as they are freed, so the kernel
    page-faults and zeroes the memory again. Measured here (2 ranks, 100 MB, 1 MiB chunks): 7,000
    to 10,000 page faults per all_reduce on each rank (30-40 MB re-zeroed), about 3x fewer with
    these settings, and a sixth less CPU. Raising both thresholds keeps up to
    MALLOC_TRIM_THRESHOLD of freed memory per arena for reuse. Process-wide and once; glibc
    only (macOS's allocator caches large blocks by itself).
    """
    global _allocator_tuned
    if _allocator_tuned or not sys.platform.startswith("linux"):
        return
    _allocator_tuned = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc (e.g. musl): nothing to tune
    mallopt(-3, MALLOC_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    mallopt(-1, MALLOC_TRIM_THRESHOLD)  # M_TRIM_THRESHOLD


def make_socket(ctx: zmq.Context, kind: int, *, timeout: float) -> zmq.Socket:
    """Every data-plane socket is made here, so its options live in one place."""
    sock = ctx.socket(kind)
    # Zero-copy sends hold references, not copies, so a high HWM costs no memory; it only has to
    # exceed the chunks of one collective so that sends never block the worker between receives.
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(zmq.RCVBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
    # Graceful close flushes the last chunks a peer still needs; abort sets linger 0 (see close).
    sock.setsockopt(zmq.LINGER, max(1, int(min(timeout, 5.0) * 1000)))
    # ZMTP heartbeats let libzmq drop a dead TCP connection; liveness itself is our deadline.
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    return sock


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise PeerLostError(f"address {addr!r} is not host:port; give every rank's tensor address as host:port")
    return host.strip("[]"), int(port)


def _bind_host(host: str) -> str:
    # Bind the rank's own address when it is an interface of this machine (keeps test traffic on
    # 127.0.0.1); a name or NAT'd address falls back to every interface.
    try:
        ip = pysocket.gethostbyname(host)
        probe = pysocket.socket(pysocket.AF_INET, pysocket.SOCK_STREAM)
        try:
            probe.bind((ip, 0))
        finally:
            probe.close()
        return ip
    except OSError:
        return "0.0.0.0"


class Transport:
    """Sockets and framing of one rank; used only from the thread that created it."""

    def __init__(self, rank: int, world_size: int, addrs: list[str], *, generation: int, timeout: float,
                 session: int = 0, abort_check=lambda: None, stripes: int | None = None):
        self._init_state(rank, world_size, addrs, generation=generation, timeout=timeout, session=session,
                         abort_check=abort_check)
        self.stripes = default_stripes() if stripes is None else check_stripes(stripes)
        self._next: dict[int, int] = {}  # peer -> stripe of its next send
        self._last: dict[tuple[int, int], zmq.MessageTracker] = {}  # (peer, stripe) -> last zero-copy send
        self.ctx = zmq.Context(io_threads=max(IO_THREADS, min(2 * self.stripes, MAX_STRIPES)))
        self.pull = make_socket(self.ctx, zmq.PULL, timeout=timeout)
        self.push: dict[int, list[zmq.Socket]] = {}
        self._monitors: dict[int, zmq.Socket] = {}
        try:
            host, port = split_addr(addrs[rank])
            try:
                self.pull.bind(f"tcp://{_bind_host(host)}:{port}")
            except zmq.ZMQError as exc:
                raise PeerLostError(
                    f"rank {rank} cannot listen on {addrs[rank]}: {exc}; pick a free tensor port",
                    rank=rank, address=addrs[rank],
                ) from None
            for peer in range(world_size):
                if peer != rank:
                    phost, pport = split_addr(addrs[peer])
                    self.push[peer] = []
                    self._next[peer] = 0
                    for _ in range(self.stripes):
                        sock = make_socket(self.ctx, zmq.PUSH, timeout=timeout)
                        self.push[peer].append(sock)
                        sock.connect(f"tcp://{phost}:{pport}")
                    # Whether the peer's process is still there: its end of our connection closes
                    # when it exits or is killed (not when it is frozen or cut off).
                    self._monitors[peer] = self.push[peer][0].get_monitor_socket(
                        zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        except BaseException:
            self.close(linger=False)
            raise

    def _init_state(self, rank: int, world_size: int, addrs: list[str], *, generation: int, timeout: float,
                    session: int, abort_check) -> None:
        """What every transport keeps besides its sockets (TcpTransport shares it)."""
        self.rank = rank
        self.world_size = world_size
        self.addrs = list(addrs)
        self.generation = generation
        self.session = framing.check_session(session)
        self.timeout = timeout
        self.stripes = 1
        self.step = 0
        self.seq = 0
        self.op = "setup"
        self.op_timeout = timeout
        self.rejected: collections.deque[FrameError] = collections.deque(maxlen=REJECTED_KEPT)
        self.rejected_count = 0
        self._heard: dict[int, float] = {}
        """peer -> monotonic time of its last valid frame (who to blame for a silence)."""
        self.dropped_count = 0
        self.reordered_count = 0
        """Chunks that arrived before an earlier one of the same peer (striping only)."""
        self._abort_check = abort_check
        self._stash: dict[int, collections.deque] = {r: collections.deque() for r in range(world_size)}
        self._hello: set[int] = set()     # peers heard from
        self._acked: set[int] = set()     # peers that have heard us
        self._answered: set[int] = set()  # peers we sent an acknowledgement
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._gone: dict[int, float] = {}
        """peer -> monotonic time its connection was seen closed (it exited or was killed)."""
        tune_allocator()

    def scratch(self, nbytes: int) -> torch.Tensor:
        """A reused uint8 buffer of at least nbytes (receives land here before being summed)."""
        if self._scratch.numel() < nbytes:
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        return self._scratch

    # -- connection check -------------------------------------------------------------------
    def _hello_header(self, heard: bool) -> Header:
        # A HELLO's step field is its acknowledgement: 1 once the sender has heard the receiver.
        return Header(KIND_HELLO, framing.SUPPORTED_DTYPES[0], (0,), self.rank, self.generation, self.session,
                      int(heard), 0, 0, 0, 0)

    def handshake(self, deadline: float) -> None:
        """HELLO every peer until each one has been heard from and has acknowledged us, so a peer
        that is not up fails here.

        A HELLO can be lost: it may reach an earlier listener still bound to a reused port, which
        rejects it as another session's. So unacknowledged HELLOs are sent again every
        HELLO_RESEND_S, and a HELLO is answered (see `_on_hello`), also after the handshake.
        """
        for peer in self.push:
            self.send(peer, self._hello_header(False), b"")
        resend_at = time.monotonic() + HELLO_RESEND_S
        while True:
            pending = [r for r in self.push if r not in self._hello or r not in self._acked]
            if not pending:
                return
            if self._poll(min(deadline, resend_at)):
                self._take()
                continue
            if time.monotonic() >= deadline:
                missing = [r for r in pending if r not in self._hello] or pending
                names = ", ".join(f"rank {r} at {self.addrs[r]}" for r in missing)
                raise PeerLostError(
                    f"rank {self.rank} waited {self.timeout:.1f} s for {names} to come up (generation "
                    f"{self.generation}, session {self.session:#018x}); start every rank with the same addresses "
                    f"and session, or raise the timeout{self._rejected_note()}",
                    rank=missing[0], address=self.addrs[missing[0]],
                )
            for r in pending:
                self.send(r, self._hello_header(r in self._hello), b"")
            resend_at = time.monotonic() + HELLO_RESEND_S

    def _on_hello(self, header: Header) -> None:
        peer = header.sender
        if peer not in self.push:
            # Our own rank number: some peer's address is this rank's own listener (two nodes given
            # one tensor port on one machine), so our HELLO came back to us. Refused, never answered.
            self._reject(FrameError(
                f"HELLO from rank {peer} (generation {header.generation}) reached rank {self.rank} at "
                f"{self.addrs[self.rank]}, but rank {self.rank} is this node: another rank's address "
                f"({self._same_address()}) leads back here. Give every node its own cluster.tensor_port"))
            return
        self._hello.add(peer)
        if header.step == 1:
            self._acked.add(peer)
        # Answer a HELLO that has not heard us yet, and the first one from each peer; never an
        # acknowledgement that we already answered (two ranks would echo each other forever).
        if header.step == 0 or peer not in self._answered:
            self._answered.add(peer)
            self.send(peer, self._hello_header(True), b"")

    def _same_address(self) -> str:
        port = split_addr(self.addrs[self.rank])[1]
        same = [f"rank {r} at {a}" for r, a in enumerate(self.addrs) if r != self.rank and split_addr(a)[1] == port]
        return ", ".join(same) or "a peer's address"

    # -- sending ----------------------------------------------------------------------------
    def send(self, dst: int, header: Header, body, *, track: bool = False, one_way: bool = False):
        """Queue one message for `dst`; returns a MessageTracker when zero-copy and tracked.
        `one_way`: `dst` sends nothing to this rank in this collective (the TCP transport may then
        write a large body on this thread; libzmq's I/O thread writes every message here).

        Zero-copy rule: a body sent with copy=False is read by libzmq's I/O thread later, so its
        memory must not change until the tracker is done, or until causality proves the peer got it
        (the peer answered with data that depended on it).
        """
        socks = self.push[dst]
        stripe = 0
        if len(socks) > 1:
            stripe = self._next[dst]
            self._next[dst] = (stripe + 1) % len(socks)
        sock = socks[stripe]
        copy = len(body) < COPY_THRESHOLD
        striped = len(socks) > 1
        head = framing.encode_header(header)
        deadline = time.monotonic() + self.op_timeout
        while True:
            # Without blocking: a peer cut off (no connection to queue on) would hold this thread
            # in send until SNDTIMEO, deaf to an abort. Once the first part is queued, the rest of
            # the message is (ZeroMQ queues multipart messages whole).
            try:
                sock.send(head, zmq.SNDMORE | zmq.NOBLOCK)
                break
            except zmq.Again:
                self._abort_check()
                if time.monotonic() >= deadline:
                    raise self._lost(dst, "did not take data") from None
                sock.poll(int(POLL_SLICE_S * 1000), zmq.POLLOUT)
        try:
            result = sock.send(body, copy=copy, track=(track or striped) and not copy)
        except zmq.Again:
            raise self._lost(dst, "did not take data") from None
        if not striped:
            return result if track and not copy else None
        if not copy:
            self._last[(dst, stripe)] = result
        if not track:
            return None
        # Stripes send independently: the caller's buffer is free once every stripe's last send is.
        pending = [t for k in range(len(socks)) if (t := self._last.get((dst, k))) is not None and not t.done]
        return zmq.MessageTracker(*pending) if pending else None

    def wait_sent(self, dst: int, tracker, deadline: float) -> None:
        """Block until libzmq no longer needs a zero-copy body (it is in the kernel's hands)."""
        self._wait_tracker(dst, tracker, deadline)
        for k in range(len(self.push.get(dst, ()))):
            if (t := self._last.get((dst, k))) is not None and t.done:
                del self._last[(dst, k)]  # keeps no sent buffer alive

    def _wait_tracker(self, dst: int, tracker, deadline: float) -> None:
        if tracker is None:
            return
        while not tracker.done:
            self._abort_check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._lost(dst, "did not take data")
            try:
                tracker.wait(min(remaining, POLL_SLICE_S))
            except zmq.NotDone:
                pass

    # -- receiving --------------------------------------------------------------------------
    def recv(self, src: int, deadline: float, land=None, *, offset: int | None = None,
             check=None) -> tuple[Header, memoryview | None]:
        """The next chunk from `src` for the current collective (self.seq).

        Without `land`, returns (header, body) with body a read-only view of the received frame.
        With `land`, a callable header -> writable memoryview of header.nbytes bytes (it may raise
        FrameError after checking the header), the body is received straight into that buffer
        (recv_into: no allocation per chunk) and (header, None) is returned.
        With stripes > 1, `offset` names the chunk (its byte offset) and chunks of this collective
        from `src` at other offsets are parked; `check(header)`, if given, runs on those first, so
        a chunk that can never fit (another dtype or size) is a FrameError at once, not a timeout.
        """
        if self.stripes == 1:
            offset = None  # one in-order socket: the next chunk is the one
        while True:
            parked = self._unpark(src, offset)
            if parked is not None:
                header, body = parked
                self._check_current(header)
                if land is None:
                    return header, body
                land(header)[:] = body
                return header, None
            try:
                # Try the socket before polling it: in a pipelined transfer the next chunk is
                # usually queued already, and a poll per chunk is a wasted system call.
                got = self._take(src, land, zmq.NOBLOCK, offset, check)
            except zmq.Again:
                if not self._poll(deadline):
                    raise self._lost(self._silent_longest(src), "sent nothing", src) from None
                continue
            if got is not None:
                return got
            if time.monotonic() > deadline:  # a stream of other peers' frames must not hide silence
                raise self._lost(self._silent_longest(src), "sent nothing", src)

    def _unpark(self, src: int, offset: int | None):
        """The parked chunk from `src` that recv waits for, if it came already: the oldest one
        (one in-order socket), or the one of this collective at `offset` (stripes)."""
        parked = self._stash[src]
        if offset is None:
            while parked:
                item = parked.popleft()
                if item[0].seq >= self.seq:
                    return item
                self.dropped_count += 1  # left over from a collective that failed here
            return None
        hit = None
        for item in list(parked):
            header = item[0]
            if header.seq < self.seq:
                parked.remove(item)
                self.dropped_count += 1
            elif hit is None and header.seq == self.seq and header.offset == offset:
                parked.remove(item)
                hit = item
        return hit

    def _silent_longest(self, src: int) -> int:
        """Whom to blame when `src` sent nothing in time. With 3+ ranks a live peer can stall
        because a dead one holds it up (it waits for that one's data). A peer whose connection
        closed first is the one that died; failing that (a frozen or cut-off peer closes
        nothing), the peer heard from least recently is the likelier casualty; `src` when it is
        that peer."""
        self._watch_connections()
        if self._gone:
            return min(self._gone, key=lambda p: (self._gone[p], p != src))
        peers = [p for p in range(self.world_size) if p != self.rank]
        oldest = min(peers, key=lambda p: (self._heard.get(p, 0.0), p != src))
        return oldest if self._heard.get(oldest, 0.0) < self._heard.get(src, 0.0) else src

    def _check_current(self, header: Header) -> Header:
        if header.seq > self.seq:
            raise FrameError(
                f"rank {header.sender} is at collective #{header.seq} while rank {self.rank} waits for its data of "
                f"#{self.seq} ({self.op}): every rank must call the same collectives in the same order"
            )
        if header.step != self.step:
            raise FrameError(
                f"rank {header.sender} sent step {header.step} for {self.op} #{self.seq}, rank {self.rank} is at step "
                f"{self.step}: call set_step with the same step on every rank"
            )
        return header

    def _poll(self, deadline: float) -> bool:
        """Wait until a message can be read, in slices that look at the abort flag; False at the deadline."""
        while True:
            self._abort_check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._wait_once(min(remaining, POLL_SLICE_S)):
                return True

    def _wait_once(self, seconds: float) -> bool:
        if self.pull.poll(int(seconds * 1000) + 1, zmq.POLLIN):
            return True
        self._watch_connections()
        return False

    def _watch_connections(self) -> None:
        """Note peers whose connection closed (`_gone`), and forget those connected again."""
        for peer, mon in self._monitors.items():
            while True:
                try:
                    event = zmq.utils.monitor.parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))["event"]
                except zmq.Again:
                    break
                if event == zmq.EVENT_DISCONNECTED:
                    self._gone.setdefault(peer, time.monotonic())
                elif event == zmq.EVENT_CONNECTED:
                    self._gone.pop(peer, None)

    def _reject(self, exc: FrameError) -> None:
        # Whatever is left of the message is drained, so the next message starts clean.
        while self.pull.getsockopt(zmq.RCVMORE):
            self.pull.recv(copy=False)
        self.rejected_count += 1
        self.rejected.append(exc)
        log.warning("rank %d rejected a frame: %s", self.rank, exc)

    def _take(self, want: int = -1, land=None, flags: int = 0, offset: int | None = None,
              check=None) -> tuple[Header, memoryview | None] | None:
        """Receive one message and file it: return it if it is the chunk from `want` that the
        current collective waits for (landed, or as a zero-copy view), else park, drop or reject it.
        With flags=zmq.NOBLOCK, raises zmq.Again when nothing is queued. `offset`, `check`: see recv."""
        pull = self.pull
        head = pull.recv(flags)
        try:
            if not pull.getsockopt(zmq.RCVMORE):
                raise FrameError("message has 1 frame, a MacFleet data message has exactly 2 (header, body)")
            header = framing.decode_header(head, world_size=self.world_size)
        except FrameError as exc:
            self._reject(exc)
            return None
        if header.session != self.session:
            # Checked first, so a stale frame is never parked, landed or counted as a HELLO.
            self._reject(FrameError(
                f"frame of session {header.session:#018x} (rank {header.sender}, generation {header.generation}, "
                f"#{header.seq}) reached rank {self.rank} of session {self.session:#018x}: another run, or an "
                "earlier group on this port, is still sending here; dropped, never summed"))
            return None
        if header.generation == self.generation and header.sender != self.rank:
            self._heard[header.sender] = time.monotonic()
        ours = (header.kind == KIND_DATA and header.generation == self.generation
                and header.sender == want and header.seq == self.seq)
        # One in-order socket: the next chunk is current unless older ones are parked. Stripes:
        # the chunk at the awaited offset is, whatever came before it.
        current = ours and (header.offset == offset if offset is not None else not self._stash[want])
        if current and land is not None:
            try:
                self._check_current(header)
                buf = land(header)
            except FrameError:
                pull.recv(copy=False)  # drop the body; the caller gets the error
                raise
            nbytes = pull.recv_into(buf)
            if nbytes != header.nbytes or pull.getsockopt(zmq.RCVMORE):
                # The landing buffer was written, but a well-formed chunk for the same place follows.
                self._reject(FrameError(
                    f"body from rank {header.sender} is {nbytes} bytes but the header says {header.nbytes}: "
                    "truncated or wrong-size frame"))
                return None
            return header, None
        body = pull.recv(copy=False)
        if len(body) != header.nbytes or pull.getsockopt(zmq.RCVMORE):
            self._reject(FrameError(
                f"body from rank {header.sender} is {len(body)} bytes but the header says {header.nbytes}: "
                "truncated or wrong-size frame"))
            return None
        if current:
            # Zero-copy: the view reads libzmq's own receive buffer (reducers add straight from it).
            self._check_current(header)
            return header, memoryview(body.buffer)
        if header.generation != self.generation:
            self.dropped_count += 1  # a frame of another membership is never summed
        elif header.kind == KIND_HELLO:
            self._on_hello(header)
        elif header.sender != self.rank and header.seq >= self.seq:
            if ours and offset is not None:
                self.reordered_count += 1
                if check is not None:
                    check(header)  # the body is read already, so the socket stays aligned
            self._stash[header.sender].append((header, memoryview(body.buffer)))
        else:
            self.dropped_count += 1
        return None

    def _rejected_note(self) -> str:
        if not self.rejected:
            return ""
        return f" ({self.rejected_count} frames were rejected meanwhile; last: {self.rejected[-1]})"

    def _lost(self, peer: int, what: str, awaited: int | None = None) -> PeerLostError:
        note = self._rejected_note()
        if awaited is not None and self.stripes > 1:
            early = sorted(h.offset for h, _ in self._stash.get(awaited, ()) if h.seq == self.seq)
            if early:
                # Chunks behind a lost one: a stripe (one TCP connection) dropped it, or ranks disagree.
                note += (f" (rank {awaited} striped over {self.stripes} connections; its chunks at byte offsets "
                         f"{early[:8]} of this collective arrived, an earlier one did not)")
        return PeerLostError(
            f"rank {peer} at {self.addrs[peer]} {what} for {self.op_timeout:.1f} s during {self.op} #{self.seq} "
            f"(step {self.step}, generation {self.generation}) on rank {self.rank}: it died, hung or lost its link; "
            f"restart it or resume from the last checkpoint{note}",
            rank=peer, address=self.addrs[peer],
        )

    def close(self, *, linger: bool = True) -> None:
        for peer, mon in self._monitors.items():
            socks = self.push.get(peer)
            if socks and not socks[0].closed:
                socks[0].disable_monitor()
            mon.close(linger=0)
        self._monitors.clear()
        for sock in [self.pull, *(s for socks in self.push.values() for s in socks)]:
            if not sock.closed:
                sock.close(linger=None if linger else 0)
        self.push.clear()
        self._last.clear()
        self._stash.clear()
        self.ctx.term()
