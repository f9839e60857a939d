"""A data plane over plain TCP connections: the frames and checks of the ZeroMQ one.

It carries a Group's lanes (group.py, "Lanes"), so it is the data plane wherever there are
several (the default from 8 usable cores); `MACFLEET_TRANSPORT=tcp` (or `Group(transport="tcp")`)
selects it for one lane too. Why it exists: every chunk through libzmq crosses its I/O thread (a
hand-off and a wake-up per message) and is copied once more out of libzmq's receive buffer. Here
the kernel writes each byte straight into the buffer it belongs in (`recv_into` the landing
place), and sends leave from the caller's memory on a thread per peer. On the GPU host
(2026-11-27, ranks in network namespaces) that made the engine's all_reduce 1.3x to 2x faster
than the ZeroMQ transport's (README, "Plain TCP data plane"). With one lane, plain DDP over it
on 2 H100s was still 11-13% slower than over ZeroMQ (here the engine's Python threads do the
copies that libzmq's native threads did), so a single lane keeps ZeroMQ by default; with lanes
the copies of several buckets run at once and DDP passed gloo (README, "Accelerators").
The frames, the session/generation/seq checks, the parking rules and the error messages are
those of `Transport` (transport.py), which this class extends; only the sockets differ.
Striping (`stripes` > 1) is a ZeroMQ setting and selects that transport.
An extra lane's listener is opened first (`open_listener`, a port the system picks) and handed
in as `listener`, since its port is told to the peers before the transport exists.

Connections. Each rank listens on its tensor port and opens one connection to every peer, so
a pair of ranks has one connection each way, as with PUSH/PULL. A connection says who it is
with a HELLO as its first message, and only then is it read with trust:
- an unidentified connection may send only one HELLO of this session (no body); anything else
  is rejected (kept in `rejected`, logged) and the connection is closed: a byte stream cannot
  be resynchronised after a malformed header;
- a peer that connects again (its first connection reached a listener that went away) replaces
  its earlier connection.

Sending. `send` queues (header, body) for the peer's sender thread and returns at once; the
body is read later, so the zero-copy rule of `Transport.send` holds unchanged, and a tracked
send's tracker is done once the kernel has every byte. Two kinds of message are written on the
calling thread instead, when nothing is queued for that peer: a small one (under
COPY_THRESHOLD), and a one-way one (`one_way`: a broadcast's, a gather's, a scatter's), whose
peer sends nothing back in that collective, so the write cannot wait on a peer that waits on
us. That saves the hand-off to the sender thread and the wake-up that says the bytes left.
An exchange's large chunks still go to the sender thread, so both ends write and read at once.
A blocked write checks for an abort and the deadline as a tracked send's wait does. A
connection that breaks before the peer acknowledged our HELLO is made again (the handshake's
HELLOs are re-sent); after that, a broken connection means the peer exited or was killed:
queued sends fail at once, and a later `send`, or `wait_sent` on an earlier one, raises
PeerLostError.

Receiving. Messages arrive on the sender's own connection, so a receive reads the awaited
peer's connection, and the others are read only to file their messages (park, drop, answer a
HELLO). A closed connection marks its peer gone, which `_silent_longest` blames first.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import selectors
import socket
import threading
import time

import torch
import zmq

from macfleet.comm import framing
from macfleet.comm.framing import HEADER_FIXED_BYTES, KIND_DATA, KIND_HELLO, MAX_NDIM, Header, byte_view
from macfleet.comm.transport import (
    COPY_THRESHOLD, POLL_SLICE_S, SOCKET_BUFFER_BYTES, Transport, _bind_host, split_addr,
)
from macfleet.errors import FrameError, MacFleetError, PeerLostError

log = logging.getLogger(__name__)

TRANSPORTS = ("tcp", "zmq")
CONNECT_RETRY_S = 0.05
MAX_STRANGERS = 64
"""Connections kept open before they say who they are; past this the oldest is closed, so idle
connections from elsewhere cannot use up this process's file descriptors."""
HEADER_MAX_BYTES = HEADER_FIXED_BYTES + 8 * MAX_NDIM


def default_transport() -> str:
    """MACFLEET_TRANSPORT (so a torchrun DDP job can set it), else zmq (see the module docstring)."""
    return check_transport(os.environ.get("MACFLEET_TRANSPORT", "").strip().lower() or "zmq")


def check_transport(name) -> str:
    if name not in TRANSPORTS:
        raise MacFleetError(f"transport {name!r}: choose zmq (the default) or tcp (MACFLEET_TRANSPORT)")
    return name


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a HELLO or a small chunk leaves at once
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        except OSError:
            pass  # above the system's cap (macOS kern.ipc.maxsockbuf): keep its default
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class _Sent:
    """A send's tracker (zmq.MessageTracker's `done` and `wait`): done once the kernel holds
    every byte, or failed (`error`) when the connection broke first."""

    __slots__ = ("event", "error")

    def __init__(self):
        self.event = threading.Event()
        self.error: str | None = None

    @property
    def done(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float) -> None:
        if not self.event.wait(timeout):
            raise zmq.NotDone()

    def finish(self, error: str | None = None) -> None:
        self.error = error
        self.event.set()


class _Link:
    """Our connection to one peer and the thread that writes it, in the order sends were queued."""

    def __init__(self, tp: "TcpTransport", peer: int):
        self.tp = tp
        self.peer = peer
        self.host, self.port = split_addr(tp.addrs[peer])
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.sock: socket.socket | None = None
        self.broken: str | None = None
        """Why the connection broke after the handshake (the peer is gone); None while usable."""
        self.broken_at = 0.0
        """When it broke (monotonic); the comm thread copies it into the transport's `_gone`."""
        self.closing = False
        self.idle = True
        self.owned = False
        """The comm thread is writing the connection itself (`write_now`); the sender thread keeps off."""
        self.thread = threading.Thread(target=self._run, name=f"macfleet-send-{tp.rank}-to-{peer}", daemon=True)
        self.thread.start()

    def put(self, parts: tuple, tracker: _Sent | None) -> None:
        with self.cond:
            self.items.append((parts, tracker))
            self.cond.notify()

    def write_now(self, parts: tuple, deadline: float) -> bool:
        """Write one message on the calling (comm) thread when nothing is queued ahead of it: no
        hand-off to the sender thread and no wake-up to learn it has left. False when the sender
        thread has work or the connection is not ready, so the caller queues it instead. Waits for a
        slow reader in slices, checking for an abort and `deadline` as a tracked send's wait does."""
        with self.cond:
            if self.items or not self.idle or self.owned or self.sock is None or self.broken is not None:
                return False
            self.owned = True

        def waiting() -> None:
            self.tp._abort_check()
            if time.monotonic() >= deadline:
                raise self.tp._lost(self.peer, "did not take data")

        try:
            if not self._write(self.sock, parts, waiting):
                self._lose("closed its connection (it exited or was killed)")  # the bytes go nowhere, as in _run
            return True
        finally:
            # No notify: the sender thread waits for items (`put` wakes it), and `drain` runs on
            # this thread, so nobody waits for this (a wake-up would only cost CPU).
            with self.cond:
                self.owned = False

    def _lose(self, why: str) -> None:
        self.broken_at = time.monotonic()
        self.broken = why
        self._drop_socket()
        with self.cond:
            self.items.clear()

    def drain(self, timeout: float) -> None:
        """Wait until every queued send has left (graceful close), at most `timeout`."""
        end = time.monotonic() + timeout
        with self.cond:
            while (self.items or not self.idle or self.owned) and self.broken is None and self.sock is not None:
                left = end - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(min(left, POLL_SLICE_S))

    def stop(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join(2.0)
        if self.sock is not None:
            self.sock.close()
        self._fail_all("the transport closed")

    def _fail_all(self, why: str) -> None:
        with self.cond:
            items, self.items = list(self.items), collections.deque()
        for _, tracker in items:
            if tracker is not None:
                tracker.finish(why)

    def _connect(self) -> bool:
        """Connect (again) and introduce ourselves with a HELLO; False once closing."""
        while not self.closing:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=1.0)
            except OSError:
                with self.cond:
                    self.cond.wait(CONNECT_RETRY_S)  # not listening yet: regrouping peers come up in any order
                continue
            _tune(sock)
            sock.settimeout(POLL_SLICE_S)
            self.sock = sock
            hello = self.tp._hello_header(self.peer in self.tp._hello)
            if self._write(sock, (framing.encode_header(hello), b"")):
                return True
            self._drop_socket()
        return False

    def _drop_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _write(self, sock: socket.socket, parts, waiting=None) -> bool:
        """Write a whole message; False if the connection broke (or the transport closed hard).
        `waiting`, called while the peer reads slowly (or is frozen), may raise to give up."""
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            if self.closing and self.tp._hard_close:
                return False
            try:
                sent = sock.sendmsg(views)
            except (TimeoutError, BlockingIOError, InterruptedError):
                if waiting is not None:
                    waiting()
                continue  # look at `closing` and go on
            except OSError:
                return False
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0
        return True

    def _run(self) -> None:
        try:
            if not self._connect():
                return
            while True:
                with self.cond:
                    while (not self.items or self.owned) and not self.closing:
                        self.idle = True
                        self.cond.notify_all()
                        self.cond.wait()
                    if not self.items:
                        return
                    parts, tracker = self.items.popleft()
                    self.idle = False
                if self._write(self.sock, parts):
                    if tracker is not None:
                        tracker.finish()
                    continue
                if self.closing:
                    return
                if self.peer not in self.tp._acked:
                    # Still in the handshake: the connection may have reached a listener that went
                    # away (a regrouping peer). Connect again; the handshake re-sends its HELLOs.
                    self._drop_socket()
                    if not self._connect():
                        return
                    continue
                # The peer exited or was killed. As with a ZeroMQ peer that went away, what is sent
                # to it never leaves (trackers stay pending): the receive deadline, or the heartbeat
                # monitor's abort, says who is gone, and `_gone` tells the blame whose end closed.
                self._lose("closed its connection (it exited or was killed)")
                return
        finally:
            with self.cond:
                self.idle = True
                self.cond.notify_all()


class _Conn:
    """A connection a peer opened to us, and the header being read from it."""

    __slots__ = ("sock", "peer", "head", "got", "need")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.peer: int | None = None
        self.head = bytearray(HEADER_MAX_BYTES)
        self.got = 0
        self.need = HEADER_FIXED_BYTES


class _NotYet(zmq.Again):
    """zmq.Again, as Transport.recv expects from `_take`, without ZMQError's constructor (it looks
    up the error's text: 3.3 us a raise against 0.5 here, once per receive that waits)."""

    errno = zmq.EAGAIN
    strerror = "no message yet"

    def __init__(self):  # noqa: D107 - nothing to look up
        pass


class _Closed(Exception):
    """The connection ended (EOF or reset)."""


def open_listener(host: str) -> socket.socket:
    """A listening socket on `host` at a port the system picks (a Group's extra lane)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((_bind_host(host), 0))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise MacFleetError(f"cannot listen on {host} for an extra comm lane: {exc.strerror or exc}") from None
    return sock


class TcpTransport(Transport):
    """Sockets of one rank over plain TCP; used only from the thread that created it (besides the
    sender threads it starts, which touch only their own connection and queue)."""

    def __init__(self, rank: int, world_size: int, addrs: list[str], *, generation: int, timeout: float,
                 session: int = 0, abort_check=lambda: None, stripes: int | None = None,
                 listener: socket.socket | None = None):
        """`listener`: a socket already bound and listening (a Group's extra lane, whose port was
        picked by the system and told to the peers before this transport existed); else this
        rank's address in `addrs` is bound here."""
        self._init_state(rank, world_size, addrs, generation=generation, timeout=timeout, session=session,
                         abort_check=abort_check)
        self._monitors: dict = {}
        self._hard_close = False
        self._in: dict[int, _Conn] = {}  # peer -> its identified connection
        self._ready: list[_Conn] = []    # connections the last poll found readable
        self._strangers: collections.deque[_Conn] = collections.deque()  # accepted, no HELLO yet
        self.push: dict[int, _Link] = {}
        self._sel = selectors.DefaultSelector()
        self.listener = listener if listener is not None else socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if listener is None:
                self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                host, port = split_addr(addrs[rank])
                try:
                    self.listener.bind((_bind_host(host), port))
                    self.listener.listen(128)  # peers connect while this rank is busy: accepted at its next wait
                except OSError as exc:
                    raise PeerLostError(
                        f"rank {rank} cannot listen on {addrs[rank]}: {exc.strerror or exc}; pick a free tensor port",
                        rank=rank, address=addrs[rank],
                    ) from None
            self.listener.setblocking(False)
            self._sel.register(self.listener, selectors.EVENT_READ, None)
            for peer in range(world_size):
                if peer != rank:
                    self.push[peer] = _Link(self, peer)
        except BaseException:
            self.close(linger=False)
            raise

    # -- sending ----------------------------------------------------------------------------
    def send(self, dst: int, header: Header, body, *, track: bool = False, one_way: bool = False):
        link = self.push[dst]
        head = framing.encode_header(header)
        small = len(body) < COPY_THRESHOLD
        # Written here when the connection is idle (see the module docstring, "Sending").
        if ((small or one_way) and dst in self._acked
                and link.write_now((head, body), time.monotonic() + self.op_timeout)):
            return _Sent() if track and link.broken is not None else None
        if small:
            body, track = bytes(body), False  # copied: the caller may reuse its buffer at once
        tracker = _Sent() if track else None
        if link.broken is None:
            link.put((head, body), tracker)
        # else: the peer is gone and the bytes go nowhere (see _Link._run); a tracker stays pending
        return tracker

    def wait_sent(self, dst: int, tracker, deadline: float) -> None:
        """Block until the kernel holds every byte of a tracked send."""
        self._wait_tracker(dst, tracker, deadline)
        if tracker is not None and tracker.error is not None:  # only once the transport closed
            raise self._lost(dst, tracker.error)

    # -- receiving --------------------------------------------------------------------------
    def _wait_once(self, seconds: float) -> bool:
        """Wait until a connection has bytes (accepting new ones meanwhile); note which, for `_take`."""
        ready = []
        for key, _ in self._sel.select(seconds):
            if key.data is None:
                self._accept()
            else:
                ready.append(key.data)
        if ready:
            self._ready = ready
        return bool(ready)

    def _watch_connections(self) -> None:
        """Note peers whose connection to us closed as we read it (`_drop`), or whose connection
        from us broke in a sender thread: copied here, on this thread, so `_gone` is only ever
        touched by the thread that reads it."""
        for peer, link in self.push.items():
            if link.broken is not None:
                self._gone.setdefault(peer, link.broken_at)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("rank %d could not accept a connection: %s", self.rank, exc)
                return
            _tune(sock)
            sock.setblocking(False)
            conn = _Conn(sock)
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self._strangers.append(conn)
            if len(self._strangers) > MAX_STRANGERS:
                self._reject(FrameError(
                    f"more than {MAX_STRANGERS} connections to rank {self.rank}'s tensor port sent no HELLO; "
                    "the oldest was closed"), self._strangers[0])

    def _drop(self, conn: _Conn) -> None:
        if conn.peer is None and conn in self._strangers:
            self._strangers.remove(conn)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        if conn.peer is not None and self._in.get(conn.peer) is conn:
            del self._in[conn.peer]
            self._gone.setdefault(conn.peer, time.monotonic())

    def _reject(self, exc: FrameError, conn: _Conn | None = None) -> None:
        """Log and keep the refusal; the connection it came on is closed (a stream cannot resync)."""
        if conn is not None:
            self._drop(conn)
        self.rejected_count += 1
        self.rejected.append(exc)
        log.warning("rank %d rejected a frame: %s", self.rank, exc)

    def _read_header(self, conn: _Conn) -> Header | None:
        """The next header of `conn`, once all its bytes are here; None while some are still to come."""
        view = memoryview(conn.head)
        while conn.got < conn.need:
            try:
                n = conn.sock.recv_into(view[conn.got:conn.need])
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                raise _Closed(str(exc)) from None
            if n == 0:
                if conn.got:
                    raise _Closed(f"its connection closed inside a header ({conn.got} bytes)")
                raise _Closed("closed its connection")
            conn.got += n
            if conn.got == HEADER_FIXED_BYTES == conn.need:
                head = conn.head
                if head[:2] != framing.MAGIC or head[2] != framing.WIRE_VERSION or head[5] > MAX_NDIM:
                    framing.decode_header(bytes(view[:conn.got]))  # raises FrameError saying what is wrong
                conn.need += 8 * head[5]  # the shape's dimensions follow
        raw = bytes(view[:conn.need])
        conn.got, conn.need = 0, HEADER_FIXED_BYTES
        return framing.decode_header(raw, world_size=self.world_size)

    def _read_body(self, conn: _Conn, buf: memoryview) -> None:
        """Fill `buf` from `conn`: the sender writes a body right behind its header, so this waits
        only for the network, and a peer that stops halfway is silence like any other."""
        got, size = 0, len(buf)
        deadline = time.monotonic() + self.op_timeout
        while got < size:
            try:
                n = conn.sock.recv_into(buf[got:])
            except (BlockingIOError, InterruptedError):
                self._abort_check()
                if time.monotonic() > deadline:
                    raise self._lost(conn.peer, "stopped sending inside a message") from None
                _wait_readable(conn.sock, POLL_SLICE_S)
                continue
            except OSError as exc:
                raise _Closed(str(exc)) from None
            if n == 0:
                raise _Closed(f"its connection closed inside a message ({got} of {size} bytes)")
            got += n

    def _take(self, want: int = -1, land=None, flags: int = 0, offset: int | None = None,
              check=None) -> tuple[Header, memoryview | None] | None:
        """File what the last poll found on other connections, then read one message from `want`'s:
        return it if it is the chunk the current collective waits for, else file it and return
        None. Raises zmq.Again when `want`'s connection has no message yet (as Transport._take)."""
        ready, self._ready = self._ready, []
        for conn in ready:
            if conn.peer != want or want < 0:
                self._file_all(conn)
        if want < 0:
            return None  # the handshake: everything ready is filed
        conn = self._in.get(want)
        if conn is None:
            raise _NotYet()  # not connected yet, or gone: the receive deadline decides (see _Link._run)
        got = self._read_one(conn, want, land)
        if got is _NOTHING:
            raise _NotYet()
        return got

    def _file_all(self, conn: _Conn) -> None:
        """Read every complete message `conn` has (HELLOs answered, data parked or dropped)."""
        while conn.sock.fileno() >= 0:
            if self._read_one(conn, -1, None) is _NOTHING:
                return

    def _read_one(self, conn: _Conn, want: int, land):
        try:
            try:
                header = self._read_header(conn)
            except FrameError as exc:
                self._reject(exc, conn)
                return None
            if header is None:
                return _NOTHING
            if conn.peer is None:
                return self._introduce(conn, header)
            if header.sender != conn.peer:
                self._reject(FrameError(
                    f"rank {conn.peer}'s connection to rank {self.rank} carried a frame signed rank {header.sender}; "
                    "closed"), conn)
                return None
            return self._route(conn, header, want, land)
        except _Closed as exc:
            if conn.peer is not None:
                log.info("rank %d: rank %d %s", self.rank, conn.peer, exc)
            self._drop(conn)  # noted in _gone; the receive deadline or the heartbeat monitor decides
            return None

    def _introduce(self, conn: _Conn, header: Header):
        """The first message of a connection: a HELLO of this session says which peer it is."""
        if header.session != self.session:
            self._reject(self._foreign(header), conn)
            return None
        if header.kind != KIND_HELLO or header.nbytes:
            self._reject(FrameError(
                f"a connection to rank {self.rank}'s tensor port sent {'data' if header.kind == KIND_DATA else 'a frame'} "
                f"as rank {header.sender} before a HELLO; closed"), conn)
            return None
        if header.generation != self.generation:
            self.dropped_count += 1
            self._drop(conn)
            return None
        if header.sender == self.rank:
            self._on_hello(header)  # refused with the shared-port message
            self._drop(conn)
            return None
        old = self._in.get(header.sender)
        if old is not None and old is not conn:
            self._drop(old)  # the peer connected again: its old connection is dead
        self._strangers.remove(conn)
        conn.peer = header.sender
        self._in[header.sender] = conn
        self._gone.pop(header.sender, None)
        self._heard[header.sender] = time.monotonic()
        self._on_hello(header)
        return None

    def _foreign(self, header: Header) -> FrameError:
        return FrameError(
            f"frame of session {header.session:#018x} (rank {header.sender}, generation {header.generation}, "
            f"#{header.seq}) reached rank {self.rank} of session {self.session:#018x}: another run, or an "
            "earlier group on this port, is still sending here; dropped, never summed")

    def _route(self, conn: _Conn, header: Header, want: int, land):
        if header.session != self.session:
            self._reject(self._foreign(header), conn)
            return None
        if header.generation == self.generation:
            self._heard[header.sender] = time.monotonic()
        current = (header.kind == KIND_DATA and header.generation == self.generation and header.sender == want
                   and header.seq == self.seq and not self._stash[want])
        if current and land is not None:
            try:
                self._check_current(header)
                buf = land(header)
            except FrameError:
                self._read_body(conn, memoryview(bytearray(header.nbytes)))  # stay aligned on the stream
                raise
            self._read_body(conn, buf)
            return header, None
        body = byte_view(torch.empty(header.nbytes, dtype=torch.uint8)) if header.nbytes else memoryview(b"")
        self._read_body(conn, body)
        if current:
            self._check_current(header)
            return header, body
        if header.generation != self.generation:
            self.dropped_count += 1
        elif header.kind == KIND_HELLO:
            self._on_hello(header)
        elif header.seq >= self.seq:
            self._stash[header.sender].append((header, body))
        else:
            self.dropped_count += 1
        return None

    def close(self, *, linger: bool = True) -> None:
        links = list(self.push.values())
        if linger:
            end = time.monotonic() + min(self.timeout, 5.0)
            for link in links:
                link.drain(max(0.0, end - time.monotonic()))
        self._hard_close = True
        for link in links:
            link.stop()
        self.push.clear()
        for conn in list(self._in.values()):
            self._drop(conn)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()
        self._sel.close()
        self.listener.close()
        self._stash.clear()


_NOTHING = object()


def _wait_readable(sock: socket.socket, timeout: float) -> None:
    poller = select.poll()  # no descriptor of its own (an epoll or kqueue selector would open one per wait)
    poller.register(sock, select.POLLIN)
    poller.poll(max(1, int(timeout * 1000)))
