"""As root: a 2-rank all_reduce across two network namespaces (10.0.0.1 <-> 10.0.0.2 over veth)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from macfleet.comm.launch import Netns, spawn_local

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]


def _reduce_in_netns(rank, world_size, addrs):
    import socket

    from macfleet.comm import Group

    with Group(rank, world_size, addrs, timeout=30, chunk_bytes=64 * 1024) as g:
        out = g.all_reduce(torch.arange(300_000, dtype=torch.float32) * (rank + 1))
        # The traffic went over the veth: this process only has lo and its veth end.
        return {"sum_ok": bool(torch.equal(out, torch.arange(300_000, dtype=torch.float32) * 3)),
                "names": [name for _, name in socket.if_nameindex()]}


def test_all_reduce_across_two_namespaces():
    with Netns(2) as ns:
        shown = ns.run(1, ["ip", "-4", "addr", "show"], capture_output=True, text=True, check=True)
        assert "10.0.0.2/24" in shown.stdout and "10.0.0.1/24" not in shown.stdout
        results = spawn_local(_reduce_in_netns, 2, timeout=90, netns=ns, port=29511)
        names = ns.names
    assert all(r["sum_ok"] for r in results)
    for r in results:
        assert "lo" in r["names"] and len(r["names"]) == 2, r["names"]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in left for name in names), "namespaces were not cleaned up"


def _time_small_sends(rank, world_size, addrs):
    """Rank 0 sends rank 1 ten 200 KB messages after idle gaps; rank 1 times each arrival."""
    import socket
    import time

    host, port = addrs[1].rsplit(":", 1)
    if rank == 1:
        srv = socket.create_server((host, int(port)))
        conn, _ = srv.accept()
        took = []
        for _ in range(10):
            got = 0
            first = None
            while got < 200_000:
                n = len(conn.recv(65536))
                first = first or time.perf_counter()
                got += n
            took.append(time.perf_counter() - first)
            conn.sendall(b"k")
        return took
    deadline = time.monotonic() + 30
    while True:
        try:
            s = socket.create_connection((host, int(port)))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    for _ in range(10):
        s.sendall(b"x" * 200_000)
        s.recv(1)
        time.sleep(0.05)  # idle: the token bucket refills
    return None


def test_a_shaped_link_paces_small_messages_too():
    """tbf's bucket holds 10 ms of traffic at the rate (125 KB at 100 Mbit/s), so even after an
    idle gap the 75 KB beyond the bucket of a 200 KB message cross at the shaped rate, about 6 ms
    from its first byte to its last; the old fixed 1 MB bucket let all of it through at once."""
    with Netns(2, rate="100mbit") as ns:
        shown = ns.run(0, ["tc", "qdisc", "show"], capture_output=True, text=True, check=True).stdout
        took = spawn_local(_time_small_sends, 2, timeout=90, netns=ns, port=29512)[1]
    assert "rate 100Mbit burst 125000b" in shown, shown
    assert sorted(took)[5] > 0.004, took  # the median message was paced (unshaped: ~0.2 ms)


def test_a_malformed_rate_is_refused_before_any_namespace_exists():
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    with pytest.raises(Exception, match="give a link rate as tc writes it"):
        Netns(2, rate="fast")
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before
