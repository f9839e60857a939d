"""Where the CPU of one all_reduce goes, per thread: MacFleet's engine vs torch.distributed gloo.

    python scripts/thread_cpu.py --nodes 4 --size 100MB

Starts --nodes local ranks; each runs both all_reduces interleaved (--repeats each) and reads
its threads' user+system time from /proc/self/task (Linux only). Prints, for rank 0, the CPU
milliseconds per all_reduce of each thread name (libzmq's I/O threads are ZMQbg/IO/*, gloo's
are gloo_tcp_loop and pt_gloo_runloop, the engine's own work runs on the python threads), and
the wall-clock medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _threads() -> dict[str, float]:
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as fh:
                name = fh.read().strip()
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[f"{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _rank(rank, world_size, addrs, port, numel, repeats):
    import torch.distributed as dist

    from macfleet.comm import Group

    g = Group(rank, world_size, addrs, timeout=120)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    work = torch.ones(numel)
    runs = {"macfleet": lambda: g.all_reduce(work), "gloo": lambda: dist.all_reduce(work)}
    for fn in runs.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, dict[str, float]] = {k: {} for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            g.barrier()
            before = _threads()
            t0 = time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            for key, sec in _threads().items():
                thread = key.rsplit("/", 1)[0]
                cpu[name][thread] = cpu[name].get(thread, 0.0) + sec - before.get(key, 0.0)
    dist.destroy_process_group()
    g.close()
    return {name: {"wall_ms": statistics.median(wall[name]) * 1e3,
                   "cpu_ms": {t: s / repeats * 1e3 for t, s in cpu[name].items() if s > 0}} for name in runs}


def main() -> None:
    from macfleet.benchmark.comm import parse_sizes
    from macfleet.comm.launch import free_ports, spawn_local

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--size", default="100MB")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    numel = parse_sizes(args.size)[0] // 4
    res = spawn_local(_rank, args.nodes, (free_ports(1)[0], numel, args.repeats), timeout=1800)[0]
    for name, r in res.items():
        parts = ", ".join(f"{t} {ms:.1f}" for t, ms in sorted(r["cpu_ms"].items(), key=lambda x: -x[1]) if ms >= 0.5)
        total = sum(r["cpu_ms"].values())
        print(f"{name:9s} wall {r['wall_ms']:7.1f} ms | rank 0 CPU per all_reduce {total:6.1f} ms: {parts}")


if __name__ == "__main__":
    main()
