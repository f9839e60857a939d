"""Collectives in real processes on 127.0.0.1: results equal torch's, a killed rank is reported.

One spawn of 4 processes checks groups of 2, 3 and 4 ranks (ranks 0..N-1 of the 4 processes
form each group, on fresh ports), and 3 and 4 ranks with both all_reduce algorithms (ring and the
two-round direct one), so every algorithm (one-round direct, halves exchange, ring, direct
reduce-scatter, broadcast chain) runs.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from macfleet.comm.launch import RankFailedError, free_ports, spawn_local
from macfleet.errors import PeerLostError

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8)
NUMELS = (0, 1, 5, 13, 1031, 70_001)  # empty, tiny, not divisible by N, several 1 KiB chunks
# Float32 sums whose value depends on the order of the additions (1e8 + 1 == 1e8 in float32).
ORDER_SENSITIVE = ([1e8, 1.0, 3.0], [1.0, 1e8, -3.0], [-1e8, -1e8, 0.5], [1.0, 1.0, 1e-8])


def _data(rank: int, numel: int, dtype: torch.dtype, case: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * case + rank)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g).to(dtype)
    return torch.randint(0, 20, (numel,), generator=g).to(dtype)


GROUPS = ((2, "auto"), (2, "direct"), (3, "ring"), (3, "direct"), (4, "ring"), (4, "direct"))


def _check_all(rank, world_size, addrs, ports_by_group, transport):
    from macfleet.comm import Group

    report = {}
    for (n, algorithm), ports in ports_by_group.items():
        if rank >= n:
            continue
        # A small chunk size makes the 70k-element tensors travel as many pipelined chunks.
        with Group(rank, n, [f"127.0.0.1:{p}" for p in ports], timeout=60, chunk_bytes=4096, transport=transport,
                   algorithm=algorithm) as g:
            sums = {}
            case = 0
            for dtype in DTYPES:
                for numel in NUMELS:
                    case += 1
                    t = _data(rank, numel, dtype, case).reshape(-1, 1) if numel % 2 else _data(rank, numel, dtype, case)
                    sums[(str(dtype), numel)] = g.all_reduce(t.clone()).reshape(-1)
            avg = g.all_reduce(torch.full((7,), float(rank + 1)), op="avg")
            # One chunk: the direct exchange, which must add in rank order on every rank.
            ordered = g.all_reduce(torch.tensor(ORDER_SENSITIVE[rank]))
            fut = g.all_reduce_async(torch.ones(3, 5))
            bcast = g.broadcast(torch.full((3, 4), float(rank)), src=n - 1)
            gathered_all = g.all_gather(torch.arange(rank * 3, dtype=torch.int64).reshape(rank, 3))
            gathered = g.gather(torch.tensor([rank, rank * 10]), dst=n - 1)
            scattered = g.scatter([torch.full((i + 1,), float(i)) for i in range(n)] if rank == 0 else None, src=0)
            g.barrier()
            report[(n, algorithm)] = dict(sums=sums, avg=avg, ordered=ordered, fut=fut.wait(), bcast=bcast, all_gather=gathered_all,
                             gather=gathered, scatter=scattered)
    return report


@pytest.mark.parametrize("transport", ["zmq", "tcp"])
def test_collectives_match_torch_for_2_3_4_ranks(transport):
    ports_by_group = {key: free_ports(key[0]) for key in GROUPS}
    results = spawn_local(_check_all, 4, (ports_by_group, transport), timeout=200)
    for n, algorithm in GROUPS:
        key = (n, algorithm)
        case = 0
        for dtype in DTYPES:
            for numel in NUMELS:
                case += 1
                stacked = torch.stack([_data(r, numel, dtype, case).double() for r in range(n)])
                want = stacked.sum(0)
                for r in range(n):
                    got = results[r][key]["sums"][(str(dtype), numel)]
                    assert got.dtype == dtype and got.shape == (numel,)
                    if dtype.is_floating_point:
                        tol = 1e-5 if dtype == torch.float32 else 0.1
                        assert torch.allclose(got.double(), want, atol=tol, rtol=tol), (key, dtype, numel)
                    else:
                        assert torch.equal(got, want.to(dtype)), (key, dtype, numel)
                    # Every rank holds bit-identical results (replicas must not drift).
                    assert torch.equal(got, results[0][key]["sums"][(str(dtype), numel)])
        in_rank_order = torch.tensor(ORDER_SENSITIVE[0])
        for r in range(1, n):
            in_rank_order = in_rank_order + torch.tensor(ORDER_SENSITIVE[r])
        for r in range(n):
            out = results[r][key]
            assert torch.allclose(out["avg"], torch.full((7,), (n + 1) / 2))
            assert torch.equal(out["ordered"], in_rank_order), (n, r, out["ordered"], in_rank_order)
            assert torch.equal(out["fut"], torch.full((3, 5), float(n)))
            assert torch.equal(out["bcast"], torch.full((3, 4), float(n - 1)))
            assert [x.shape for x in out["all_gather"]] == [(i, 3) for i in range(n)]
            assert all(torch.equal(x.reshape(-1), torch.arange(i * 3)) for i, x in enumerate(out["all_gather"]))
            assert torch.equal(out["scatter"], torch.full((r + 1,), float(r)))
            if r == n - 1:
                assert [x.tolist() for x in out["gather"]] == [[i, i * 10] for i in range(n)]
            else:
                assert out["gather"] is None


def _die_mid_collective(rank, world_size, addrs, timeout, transport):
    from macfleet.comm import Group

    g = Group(rank, world_size, addrs, timeout=timeout, chunk_bytes=64 * 1024, transport=transport)
    g.all_reduce(torch.ones(10))
    if rank == 2:
        g.all_reduce_async(torch.ones(4_000_000))
        # Die without a word while the collective is under way: 16 MB in 64 KB chunks round a
        # ring of 3 cannot be done in 5 ms, and the peers are already waiting on this rank.
        time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        g.all_reduce(torch.ones(4_000_000))
    except PeerLostError as exc:
        elapsed = time.monotonic() - t0
        # The group stays failed: a later call raises instead of desynchronising.
        try:
            g.all_reduce(torch.ones(1))
            again = None
        except PeerLostError as exc2:
            again = str(exc2)
        g.close()
        return {"elapsed": elapsed, "rank": exc.rank, "address": exc.address, "message": str(exc), "again": again}
    return {"elapsed": time.monotonic() - t0, "rank": None}


@pytest.mark.parametrize("transport", ["zmq", "tcp"])
def test_killed_rank_raises_peer_lost_within_timeout(transport):
    timeout = 3.0
    with pytest.raises(RankFailedError) as info:
        spawn_local(_die_mid_collective, 3, (timeout, transport), timeout=90)
    err = info.value
    assert set(err.failures) == {2}, err.failures
    for r in (0, 1):
        out = err.results[r]
        assert out["rank"] is not None, f"rank {r} never noticed the loss"
        assert out["elapsed"] < timeout + 2.0
        assert out["again"] is not None
    # Rank 0 receives from rank 2 in the ring: it names the dead rank and its address.
    assert err.results[0]["rank"] == 2
    assert err.results[0]["address"].startswith("127.0.0.1:")
    assert "rank 2 at 127.0.0.1:" in err.results[0]["message"]


def _reused_port(rank, world_size, addrs, sessions, events, transport):
    """Process 0: rank 0 of run A, then rank 0 of run B on the same port. Process 1: rank 1 of run
    A, left sending to the dead rank 0 (a zmq socket retries the port; a tcp connection stays
    broken, so its send fails). Process 2: rank 1 of run B."""
    from macfleet.comm import Group

    a_closed, stale_queued, go, b_done = events
    run_a, run_b = [addrs[0], addrs[1]], [addrs[0], addrs[2]]
    if rank == 1:
        with Group(1, 2, run_a, timeout=60, session=sessions[0], transport=transport) as g:
            a_closed.wait(60)
            time.sleep(0.5)  # let libzmq see rank 0's connection close, so the frames stay queued
            try:
                fut = g.all_reduce_async(torch.full((1000,), 1e6))
            except PeerLostError:
                fut = None  # tcp: the connection to run A's rank 0 broke when it closed
            time.sleep(0.5)
            stale_queued.set()
            b_done.wait(60)
            g.abort(PeerLostError("run A is over", rank=0, address=addrs[0]))
            try:
                if fut is not None:
                    fut.wait()
            except PeerLostError:
                pass
        return "stale sender done"
    if rank == 0:
        with Group(0, 2, run_a, timeout=60, session=sessions[0], transport=transport):
            pass
        a_closed.set()
        stale_queued.wait(60)
    # Process 2 starts run B at once: its first HELLO may reach run A's rank 0, still bound to the
    # port, which rejects it; the handshake sends unacknowledged HELLOs again, so B still forms.
    out = []
    b_rank = 0 if rank == 0 else 1
    with Group(b_rank, 2, run_b, timeout=60, session=sessions[1], transport=transport) as g:
        if b_rank == 0:
            fut = g.all_reduce_async(torch.full((1000,), 1.0))
            deadline = time.monotonic() + 30
            while transport == "zmq" and not g.rejected and time.monotonic() < deadline:  # run A's frames arrive
                time.sleep(0.01)
            go.set()
            out.append(fut.wait())
        else:
            go.wait(60)
            out.append(g.all_reduce(torch.full((1000,), 2.0)))
        # Later collectives, of both algorithms, stay clean too.
        out.append(g.all_reduce(torch.full((1000,), float(b_rank + 1))))
        out.append(g.all_reduce(torch.full((3_000_000,), float(b_rank + 1))))
        rejected = [str(e) for e in g.rejected]
    if rank == 0:
        b_done.set()
    return {"out": out, "rejected": rejected}


@pytest.mark.parametrize("transport", ["zmq", "tcp"])
def test_stale_frames_of_an_earlier_run_on_a_reused_port_are_never_summed(transport):
    import multiprocessing as mp

    from macfleet.comm import session_id

    ctx = mp.get_context("spawn")
    sessions = (session_id("run-a", 0), session_id("run-b", 0))
    events = tuple(ctx.Event() for _ in range(4))
    b0, stale, b1 = spawn_local(_reused_port, 3, (sessions, events, transport), timeout=120)
    assert stale == "stale sender done"
    # Without sessions rank 0 took run A's 1e6 as run B's rank 1 data (sender, generation, seq all match).
    for res in (b0, b1):
        assert torch.equal(res["out"][0], torch.full((1000,), 3.0))
        assert torch.equal(res["out"][1], torch.full((1000,), 3.0))
        assert torch.equal(res["out"][2], torch.full((3_000_000,), 3.0))
    assert all("session" in m for m in b0["rejected"]), b0["rejected"]
    if transport == "zmq":  # libzmq delivers the dead run's queue to the new listener
        assert b0["rejected"] and f"{sessions[0]:#018x}" in b0["rejected"][0]
    assert b1["rejected"] == []
