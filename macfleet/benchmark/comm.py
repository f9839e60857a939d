"""`macfleet benchmark --type bandwidth|allreduce`: the engine beside references from the same run.

With no cluster given it starts `--nodes` local ranks itself (or, with --netns as root, ranks in
network namespaces joined by veth/bridge, optionally shaped with --rate). Every figure is a
median of `--repeats` timed runs after a warm-up, measured on rank 0:
- bandwidth (2 ranks): MacFleet one-way transfer (broadcast from rank 0) vs a plain TCP socket
  sending the same bytes; both end with a 1-element ack back, so each time covers full delivery.
- allreduce: MacFleet all_reduce(sum) of float32 vs torch.distributed gloo all_reduce on the same
  ranks, and the floor that plain TCP sockets reach on this machine: for 2 ranks, sockets
  exchanging the bytes both ways at once, then adding (socket_exchange); for 3+, a chunk-pipelined
  ring over sockets that receives straight into the tensor (socket_ring), the same bytes as the
  engine's ring with no framing, no queues and no extra copy.
`--stripes 1,2,4` measures the engine once per stripe count (TCP connections per peer, see
comm/transport.py), interleaved in the same run; the default is MACFLEET_STRIPES, else 1.
`--cores-per-node K` pins rank i to cores [i*K, (i+1)*K) with K torch threads, as each node of a
fleet (and each rank of the DDP benchmark) has cores of its own; without it every rank runs one
torch thread on any core.
JSON rows, one per engine setting and reference: {"type", "nodes", "size_bytes", "stripes",
"transport", "lanes", "via", "macfleet_s", "reference", "reference_s", "ratio", "ratio_p25",
"ratio_p75", "macfleet_rounds_s", "reference_rounds_s"} with ratio = macfleet_s / reference_s;
the two quartiles are those of the ratio taken round by round (each round runs every candidate
once, back to back), the table's "rounds" column: how much the ratio moves with the load of the
moment, beside the ratio of the medians; the *_rounds_s lists are every round's seconds. `via`
says which of the engine's lanes carried that size ("zmq group" or "tcp group": the group's own;
"tcp lane": one data lane; "N tcp lanes": an all_reduce cut into N parts), read from the lanes'
counts around one more call.
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import statistics
import tempfile
import threading
import time

import torch

from macfleet.errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_sizes(text: str) -> list[int]:
    """'1MB,10MB,100MB' -> bytes (decimal units; KiB/MiB/GiB binary)."""
    sizes = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", item)
        if not m or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"--sizes item {item!r} is not a size like 1MB, 512KB or 1GiB")
        sizes.append(int(float(m.group(1)) * _UNITS[m.group(2).upper()]))
    return sizes


def parse_stripes(text: str | None) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; None -> [MACFLEET_STRIPES or 1]."""
    from macfleet.comm.transport import MAX_STRIPES, default_stripes

    if not text:
        return [default_stripes()]
    out = []
    for item in text.split(","):
        if not item.strip().isdigit() or not 1 <= int(item) <= MAX_STRIPES:
            raise ConfigError(f"--stripes item {item!r} is not a count of TCP connections per peer, 1..{MAX_STRIPES}")
        if int(item) not in out:
            out.append(int(item))
    return out


def _human(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("benchmark peer closed its socket")
        got += n


def _timed(candidates: dict, repeats: int, sync) -> dict:
    """Median seconds per candidate, and under "rounds" every round's seconds. Runs are
    interleaved (one of each per round), so load from other processes that comes and goes weighs
    on every candidate alike, and a round's figures can be compared with each other."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        sync()
        fn()  # warm-up: connections, allocator, page faults
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {**{name: statistics.median(ts) for name, ts in times.items()}, "rounds": times}


def round_ratios(mine: list[float], ref: list[float]) -> tuple[float, float]:
    """The lower and upper quartile of the engine's time over the reference's, round by round
    (the two ran back to back in each round): how far the ratio moves between rounds."""
    ratios = sorted(a / b for a, b in zip(mine, ref))
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


def _carried_by(g, run) -> str:
    """Which of `g`'s lanes one call of `run` used: its own (ZeroMQ by default), one data lane,
    or several (an all_reduce cut into parts)."""
    before = g.per_lane
    run()
    used = [i for i, (a, b) in enumerate(zip(before, g.per_lane)) if b != a]
    data = [i for i in used if i > 0]
    if not data:
        return f"{g.transport} group"
    return "tcp lane" if len(data) == 1 else f"{len(data)} tcp lanes"


def _via_words(via: str) -> str:
    if via.endswith(" group"):
        return f"the {via}"
    return "a tcp lane" if via == "tcp lane" else f"{via.split()[0]} tcp lanes (cut)"


def _listen(host: str) -> tuple[socket.socket, int]:
    """A listener on a port the system picks: a port chosen before the ranks start could be taken
    meanwhile (by another process's connection, or by one of the engine's own lanes)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((host, 0))
    srv.listen(1)
    return srv, srv.getsockname()[1]


def _socket_pair(rank: int, host: str, g) -> socket.socket:
    """Rank 0 listens, rank 1 connects (the port goes over the engine `g`): a plain TCP
    connection for the reference figures."""
    srv, port = _listen(host) if rank == 0 else (None, 0)
    port = int(g.broadcast(torch.tensor([port], dtype=torch.int64), src=0)[0])
    if srv is not None:
        srv.settimeout(60)
        conn, _ = srv.accept()
        srv.close()
    else:
        conn = socket.create_connection((host, port), timeout=30)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.settimeout(None)
    return conn


RING_CHUNK_BYTES = 4 << 20


class _SocketRing:
    """The socket_ring floor: a ring all_reduce over plain TCP sockets, chunk-pipelined like the
    engine's (reduce-scatter, then all-gather, each chunk forwarded as soon as it is final).
    Receives land straight in the tensor (all-gather) or in one reused scratch (sums); a sender
    thread writes to the right neighbour while this thread reads from the left."""

    def __init__(self, rank: int, world_size: int, hosts: list[str], g):
        self.rank, self.n = rank, world_size
        srv, port = _listen(hosts[rank])
        # every rank listens before any connects; the ports go round on the engine
        ports = [int(p[0]) for p in g.all_gather(torch.tensor([port], dtype=torch.int64))]
        srv.settimeout(60)
        right = (rank + 1) % world_size
        self.right = socket.create_connection((hosts[right], ports[right]), timeout=30)
        self.left, _ = srv.accept()
        srv.close()
        for conn in (self.left, self.right):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(None)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.sender = threading.Thread(target=self._send_loop, name="socket-ring-send", daemon=True)
        self.sender.start()

    def _send_loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
            else:
                self.right.sendall(item)

    def all_reduce(self, t: torch.Tensor) -> None:
        n, rank = self.n, self.rank
        numel, isz = t.numel(), t.element_size()
        step = RING_CHUNK_BYTES // isz
        bounds = [numel * i // n for i in range(n + 1)]
        segs = [[(a, min(a + step, bounds[i + 1])) for a in range(bounds[i], bounds[i + 1], step)] for i in range(n)]
        mv = memoryview(t.numpy()).cast("B")
        scratch = torch.empty(step, dtype=t.dtype)
        smv = memoryview(scratch.numpy()).cast("B")
        for a, b in segs[rank]:
            self.queue.put(mv[a * isz:b * isz])
        for s in range(n - 1):
            for a, b in segs[(rank - s - 1) % n]:
                _recv_exact(self.left, smv[:(b - a) * isz])
                t[a:b].add_(scratch[:b - a])
                self.queue.put(mv[a * isz:b * isz])
        for s in range(n - 1):
            for a, b in segs[(rank - s) % n]:
                _recv_exact(self.left, mv[a * isz:b * isz])
                if s < n - 2:
                    self.queue.put(mv[a * isz:b * isz])
        sent = threading.Event()
        self.queue.put(sent)
        sent.wait()

    def close(self) -> None:
        self.queue.put(None)
        self.sender.join(timeout=30)
        self.left.close()
        self.right.close()


def _engine(stripes: int) -> str:
    return f"macfleet x{stripes}"


def _rank_main(rank: int, world_size: int, addrs: list[str], kind: str, sizes: list[int], repeats: int,
               algorithm: str, stripes: list[int], cores: int, gloo_store: str,
               stripe_addrs: list[list[str]]) -> dict | None:
    import torch.distributed as dist

    from macfleet.comm import Group

    if cores:
        os.sched_setaffinity(0, range(rank * cores, (rank + 1) * cores))
        torch.set_num_threads(cores)

    hosts = [a.rpartition(":")[0] for a in addrs]
    links = [name for _, name in socket.if_nameindex() if name != "lo"]
    if not hosts[0].startswith("127.") and len(links) == 1:
        # In a namespace gloo would resolve the hostname to 127.0.0.1; point it at the veth.
        os.environ["GLOO_SOCKET_IFNAME"] = links[0]
    # One Group per stripe count, each on its own ports (the first on the spawned addresses).
    engines = {_engine(k): Group(rank, world_size, addrs if i == 0 else stripe_addrs[i - 1], timeout=120,
                                 algorithm=algorithm, stripes=k) for i, k in enumerate(stripes)}
    g = next(iter(engines.values()))
    sync = g.barrier
    results: dict[int, dict[str, float]] = {}
    try:
        if kind == "bandwidth":
            conn = _socket_pair(rank, hosts[0], g)
            ack = torch.zeros(1)
            for size in sizes:
                buf = torch.ones(size // 4, dtype=torch.float32)
                view = memoryview(buf.numpy()).cast("B")
                ack_byte = bytearray(1)

                def zmq_once(g):
                    g.broadcast(buf, src=0)
                    g.broadcast(ack, src=1)

                def socket_once():
                    if rank == 0:
                        conn.sendall(view)
                        _recv_exact(conn, memoryview(ack_byte))
                    else:
                        _recv_exact(conn, view)
                        conn.sendall(b"k")

                candidates = {name: (lambda e=e: zmq_once(e)) for name, e in engines.items()}
                results[size] = _timed({**candidates, "socket": socket_once}, repeats, sync)
                results[size]["via"] = {name: _carried_by(e, lambda e=e: e.broadcast(buf, src=0))
                                        for name, e in engines.items()}
            conn.close()
        else:
            # A file store: no port to pick ahead (ranks in namespaces share the file system).
            dist.init_process_group("gloo", init_method=f"file://{gloo_store}", rank=rank, world_size=world_size)
            conn = _socket_pair(rank, hosts[0], g) if world_size == 2 else None
            ring = _SocketRing(rank, world_size, hosts, g) if world_size > 2 else None
            for size in sizes:
                numel = size // 4
                data = torch.ones(numel, dtype=torch.float32)
                work = data.clone()
                candidates = {name: (lambda e=e: e.all_reduce(work)) for name, e in engines.items()}
                candidates["gloo"] = lambda: dist.all_reduce(work)
                if conn is not None:
                    peer_buf = torch.empty(numel, dtype=torch.float32)

                    def exchange_once():
                        sender = threading.Thread(target=conn.sendall, args=(memoryview(work.numpy()).cast("B"),))
                        sender.start()
                        _recv_exact(conn, memoryview(peer_buf.numpy()).cast("B"))
                        sender.join()
                        work.add_(peer_buf)

                    candidates["socket_exchange"] = exchange_once
                if ring is not None:
                    candidates["socket_ring"] = lambda: ring.all_reduce(work)
                results[size] = _timed(candidates, repeats, sync)
                results[size]["via"] = {name: _carried_by(e, lambda e=e: e.all_reduce(work))
                                        for name, e in engines.items()}
            if conn is not None:
                conn.close()
            if ring is not None:
                ring.close()
            dist.destroy_process_group()
        # What each engine ran on (the lane count follows the cores this rank is pinned to).
        results["engines"] = {name: {"transport": e.transport, "lanes": e.lanes} for name, e in engines.items()}
    finally:
        for e in engines.values():
            e.close()
    return results if rank == 0 else None


def run_comm_benchmark(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from macfleet.comm.launch import Netns, free_ports, spawn_local

    kind = args.type
    nodes = 2 if kind == "bandwidth" else int(args.nodes)
    if nodes < 2:
        raise ConfigError("--nodes must be >= 2 for a communication benchmark")
    repeats = int(args.repeats)
    sizes = parse_sizes(args.sizes)
    console = Console()
    where = "network namespaces" + (f" shaped to {args.rate}" if args.rate else "") if args.netns else "127.0.0.1"
    algorithm = getattr(args, "algorithm", "auto") or "auto"
    engine = ""
    if kind == "allreduce" and (nodes > 2 or algorithm == "direct"):
        from macfleet.comm.collectives import resolve_algorithm

        engine = f", engine algorithm {resolve_algorithm(algorithm, nodes)}"
    stripes = parse_stripes(getattr(args, "stripes", None))
    cores = int(getattr(args, "cores_per_node", None) or 0)
    if cores < 0 or cores * nodes > len(os.sched_getaffinity(0)):
        raise ConfigError(f"--cores-per-node {cores} x {nodes} ranks needs {cores * nodes} cores; "
                          f"this process may use {len(os.sched_getaffinity(0))}")
    pinned = f", {cores} cores per rank" if cores else ""
    striped = f", stripes {','.join(map(str, stripes))}" if stripes != [1] else ""
    console.print(f"[bold]{kind}[/bold]: {nodes} local ranks on {where}{pinned}, median of {repeats} runs{engine}"
                  f"{striped}")
    with tempfile.TemporaryDirectory(prefix="macfleet-bench-") as tmp:
        fn_args = (kind, sizes, repeats, algorithm, stripes, cores, os.path.join(tmp, "gloo-store"))
        if args.netns:
            with Netns(nodes, rate=args.rate) as ns:
                more = [ns.addrs(29610 + i) for i in range(len(stripes) - 1)]
                per_rank = spawn_local(_rank_main, nodes, fn_args + (more,), timeout=3600, netns=ns, port=29500)
        else:
            ports = free_ports(nodes * (len(stripes) - 1))
            more = [[f"127.0.0.1:{p}" for p in ports[nodes * (i - 1):nodes * i]] for i in range(1, len(stripes))]
            per_rank = spawn_local(_rank_main, nodes, fn_args + (more,), timeout=3600)
    results = per_rank[0]
    ran = results.pop("engines")
    first = ran[_engine(stripes[0])]
    lanes = f"{first['lanes']} tcp data lanes" if first["lanes"] > 1 else "one lane"
    console.print(f"engine: {first['transport']} transport, {lanes}")

    rows = []
    for size in sizes:
        fig = results[size]
        for k in stripes:
            mine = fig[_engine(k)]
            for ref in ("socket", "gloo", "socket_exchange", "socket_ring"):
                if ref in fig:
                    rounds, ref_rounds = fig["rounds"][_engine(k)], fig["rounds"][ref]
                    low, high = round_ratios(rounds, ref_rounds)
                    rows.append({"type": kind, "nodes": nodes, "size_bytes": size, "stripes": k,
                                 "transport": ran[_engine(k)]["transport"], "lanes": ran[_engine(k)]["lanes"],
                                 "via": fig["via"][_engine(k)], "macfleet_s": mine,
                                 "reference": ref, "reference_s": fig[ref], "ratio": mine / fig[ref],
                                 "ratio_p25": low, "ratio_p75": high,
                                 "macfleet_rounds_s": rounds, "reference_rounds_s": ref_rounds})
    table = Table(title=f"macfleet benchmark --type {kind} --nodes {nodes}")
    several = len(stripes) > 1  # the column only when it tells settings apart (the table fits 80 columns)
    for col in ("size", *(("stripes",) if several else ()), "macfleet", "GB/s", "reference", "its time", "ratio",
                "rounds"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(_human(row["size_bytes"]), *((str(row["stripes"]),) if several else ()),
                      f"{row['macfleet_s'] * 1e3:.2f} ms",
                      f"{row['size_bytes'] / row['macfleet_s'] / 1e9:.2f}", row["reference"],
                      f"{row['reference_s'] * 1e3:.2f} ms", f"{row['ratio']:.2f}x",
                      f"{row['ratio_p25']:.2f}-{row['ratio_p75']:.2f}")
    console.print(table)
    console.print("ratio: the medians' ratio; rounds: the middle half of the ratios of each round, in which the "
                  "engine and its reference ran back to back")
    via = {(r["size_bytes"], r["stripes"]): r["via"] for r in rows}
    console.print("via: " + ", ".join(f"{_human(size)}{f' (stripes {k})' if several else ''} on {_via_words(v)}"
                                      for (size, k), v in via.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
        console.print(f"wrote {len(rows)} rows to {args.json}")
    return 0
