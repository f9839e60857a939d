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
