"""Where the time of `macfleet benchmark --type bandwidth`'s round trip goes, on the TCP transport.

    python scripts/oneway_timeline.py --size 1MB --repeats 300

Two local ranks on 127.0.0.1, one TCP lane each, run the bandwidth benchmark's round trip:
rank 0 broadcasts --size bytes, then rank 1 broadcasts a 4-byte answer. Both ranks stamp each
call's start and end with one clock (CLOCK_MONOTONIC, shared by the processes), and the
transport's header reads, body reads, waits for a readable connection and socket writes are
timed by wrapping those methods (a probe: it reaches into private methods of
macfleet/comm/tcp.py, so it follows them when they change). Prints medians in microseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.multiprocessing as mp

from macfleet.benchmark.comm import parse_sizes

now = time.perf_counter_ns
PHASES = (("TcpTransport", "_read_header", "header read"), ("TcpTransport", "_read_body", "body read"),
          ("TcpTransport", "_wait_once", "wait for a connection"), ("_Link", "_write", "socket write"))


def _timed(log: list, cls, name: str, tag: str) -> None:
    inner = getattr(cls, name)

    def wrapper(*args, **kwargs):
        start = now()
        try:
            return inner(*args, **kwargs)
        finally:
            log.append((tag, start, now()))

    setattr(cls, name, wrapper)


def _rank(rank: int, port: int, numel: int, repeats: int, out) -> None:
    from macfleet.comm import Group
    from macfleet.comm import tcp

    log: list = []
    for cls, name, tag in PHASES:
        _timed(log, getattr(tcp, cls), name, tag)
    g = Group(rank, 2, [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"], transport="tcp", lanes=1)
    buf, ack = torch.ones(numel), torch.zeros(1)
    for _ in range(50):  # warm-up
        g.broadcast(buf, src=0)
        g.broadcast(ack, src=1)
    g.barrier()
    log.clear()
    marks = []
    for _ in range(repeats):
        a = now()
        g.broadcast(buf, src=0)
        b = now()
        g.broadcast(ack, src=1)
        marks.append((a, b, now()))
    out.put((rank, marks, list(log)))
    g.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1MB")
    p.add_argument("--repeats", type=int, default=300)
    args = p.parse_args()
    numel = max(1, parse_sizes(args.size)[0] // 4)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29300 + os.getpid() % 300 * 2
    procs = [ctx.Process(target=_rank, args=(r, port, numel, args.repeats, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    got = {rank: (marks, log) for rank, marks, log in (out.get(timeout=600), out.get(timeout=600))}
    for proc in procs:
        proc.join()
    (m0, log0), (m1, log1) = got[0], got[1]
    us = lambda ns: ns / 1e3  # noqa: E731
    spans = {
        "rank 0: its broadcast call": [us(b0 - a0) for (a0, b0, _), _m in zip(m0, m1)],
        "rank 0 starts -> rank 1's call returns": [us(b1 - a0) for (a0, _, _), (_, b1, _) in zip(m0, m1)],
        "rank 1: its answer's call": [us(c1 - b1) for (_, b1, c1) in m1],
        "rank 1 answered -> rank 0 has it": [us(c0 - c1) for (_, _, c0), (_, _, c1) in zip(m0, m1)],
        "round trip (rank 0)": [us(c0 - a0) for (a0, _, c0) in m0],
    }
    print(f"{args.size} and a 4-byte answer, {args.repeats} round trips, medians in us")
    for name, xs in spans.items():
        print(f"  {name:40s} {statistics.median(xs):8.1f}")
    for _, _, tag in PHASES:
        for rank, log in ((0, log0), (1, log1)):
            xs = [us(end - start) for t, start, end in log if t == tag]
            if xs:
                print(f"  rank {rank} {tag:28s} {len(xs) / args.repeats:4.1f} per round trip, "
                      f"{sum(xs) / args.repeats:8.1f} us per round trip")


if __name__ == "__main__":
    main()
