"""Lanes: several comm threads per Group, each with its own TCP connections (group.py, "Lanes").

Real processes on 127.0.0.1. An all_reduce of at least LANE_MIN_BYTES goes to the next lane in
turn; these tests check that the sums stay exact while several run at once, that futures still
complete in issue order (each one once every earlier one has), that a tensor reused by consecutive collectives on different lanes sees
each result before the next collective reads it, and that a killed peer breaks every lane.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from macfleet.comm.group import LANE_MIN_BYTES, SPLIT_PART_MIN_BYTES, Group, check_lanes, default_lanes
from macfleet.comm.launch import RankFailedError, spawn_local
from macfleet.errors import FrameError, MacFleetError, PeerLostError

BIG = 3 * LANE_MIN_BYTES // 4 + 1001  # float32 elements: above the lane threshold, not a round size


def _data(rank: int, numel: int, case: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(100 * case + rank))


def _lanes_rank(rank, world_size, addrs):
    torch.set_num_threads(2)  # a pool the comm threads must not use (macfleet/comm/threads.py)
    with Group(rank, world_size, addrs, timeout=60, lanes=3, transport="tcp", chunk_bytes=256 << 10) as g:
        # Every lane's comm thread runs torch's CPU ops on itself alone; the caller keeps 2.
        solo = [lane._submit_here("probe", lambda tp, t, deadline, chunk: torch.get_num_threads(), torch.zeros(1),
                                  (), False, None, False, None).wait() for lane in g._lane_groups]
        assert solo == [1, 1, 1, 1] and torch.get_num_threads() == 2, solo
        # The group itself (control and small collectives) and 3 data lanes.
        assert [lane.transport for lane in g._lane_groups] == ["tcp"] * 4 and g.lanes == 3
        done = []
        tensors = [_data(rank, BIG if i % 3 else 999, i) for i in range(9)]  # big ones spread, small stay
        futs = [g.all_reduce_async(t) for t in tensors]
        for i, f in enumerate(futs):
            # Issue order: when a future completes, every earlier one has completed.
            f.add_done_callback(lambda _f, i=i: done.append(all(e.done() for e in futs[:i])))
        results = [f.wait() for f in futs]
        # One tensor through three collectives in a row, each on another lane: every one must
        # read the previous result (1 -> 2 -> 4 in a pair: x * 2**3 overall for 2 ranks).
        x = torch.full((BIG,), float(rank + 1))
        chain = [g.all_reduce_async(x), g.all_reduce_async(x), g.broadcast_async(x, src=world_size - 1),
                 g.all_reduce_async(x, op="avg")]
        gathered = g.all_gather_async(x)
        chain[-1].wait()
        parts = gathered.wait()

        lanes_used = [lane._seq for lane in g._lane_groups]
        return {"results": results, "order": done, "x": x.clone(), "parts": parts,
                "collectives": g.collectives, "lanes_used": lanes_used}


def test_lanes_sum_exactly_in_issue_order_with_a_tensor_reused_across_lanes():
    out = spawn_local(_lanes_rank, 2, (), timeout=120)
    for i in range(9):
        want = _data(0, BIG if i % 3 else 999, i) + _data(1, BIG if i % 3 else 999, i)
        for r in range(2):
            assert torch.allclose(out[r]["results"][i], want, atol=1e-5), (r, i)
        assert torch.equal(out[0]["results"][i], out[1]["results"][i])  # bit-identical replicas
    # 1 + 2 = 3, then 6, broadcast keeps 6, then avg of 6 and 6: 6 everywhere.
    for r in range(2):
        assert out[r]["order"] == [True] * 9
        assert torch.equal(out[r]["x"], torch.full((BIG,), 6.0))
        assert all(torch.equal(p, torch.full((BIG,), 6.0)) for p in out[r]["parts"])
        # Every lane carried collectives (the first lane the small ones and the port exchange).
        assert all(n > 0 for n in out[r]["lanes_used"]), out[r]["lanes_used"]
    assert out[0]["collectives"] == out[1]["collectives"]


HUGE = 3 * SPLIT_PART_MIN_BYTES // 4 + 7  # float32 elements: 3 parts, not an even cut


def _split_rank(rank, world_size, addrs):
    with Group(rank, world_size, addrs, timeout=60, lanes=3, transport="tcp") as g:
        before = [lane._seq for lane in g._lane_groups]
        t = _data(rank, HUGE, 0)
        g.all_reduce(t)
        per_lane = [lane._seq - b for lane, b in zip(g._lane_groups, before)]
        # The same tensor twice more, each cut again: every part must read the previous result.
        x = torch.full((HUGE,), float(rank + 1))
        futs = [g.all_reduce_async(x), g.all_reduce_async(x), g.all_reduce_async(x, op="avg")]
        futs[-1].wait()
        # Not contiguous: reduced whole, on one lane.
        y = _data(rank, HUGE - 7, 1).view(3, -1).t()
        before = [lane._seq for lane in g._lane_groups]
        g.all_reduce(y)
        whole = [lane._seq - b for lane, b in zip(g._lane_groups, before)]
        return {"t": t, "per_lane": per_lane, "x": x, "done": [f.done() for f in futs], "y": y.clone(),
                "whole": whole}


def test_a_large_all_reduce_is_cut_across_the_data_lanes_and_sums_exactly():
    out = spawn_local(_split_rank, 2, (), timeout=120)
    want = _data(0, HUGE, 0) + _data(1, HUGE, 0)
    want_y = (_data(0, HUGE - 7, 1) + _data(1, HUGE - 7, 1)).view(3, -1).t()
    for r in range(2):
        assert torch.allclose(out[r]["t"], want, atol=1e-5)
        assert out[r]["per_lane"] == [0, 1, 1, 1]  # one part on each data lane, none on the group's own
        assert out[r]["done"] == [True] * 3 and torch.equal(out[r]["x"], torch.full((HUGE,), 6.0))
        assert torch.allclose(out[r]["y"], want_y, atol=1e-5)
        assert sorted(out[r]["whole"]) == [0, 0, 0, 1]
    assert torch.equal(out[0]["t"], out[1]["t"]) and torch.equal(out[0]["y"], out[1]["y"])


def _lane_dies(rank, world_size, addrs, timeout):
    g = Group(rank, world_size, addrs, timeout=timeout, lanes=2, chunk_bytes=64 * 1024)
    g.all_reduce(torch.ones(10))
    big = torch.ones(4_000_000)
    if rank == 2:
        g.all_reduce_async(torch.ones(4_000_000))  # lane 0
        g.all_reduce_async(big)                      # lane 1
        # Killed at once: after a sleep, a loaded machine (CI) could let both finish first. The
        # cut all_reduce below, which this rank never starts, then has parts on both lanes.
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    errors = []
    for f in [g.all_reduce_async(torch.ones(4_000_000)), g.all_reduce_async(big), g.all_reduce_async(torch.ones(HUGE))]:
        try:
            f.wait()
        except PeerLostError as exc:
            errors.append(str(exc))
    elapsed = time.monotonic() - t0
    try:
        g.all_reduce(torch.ones(4_000_000))  # either lane: the group stays failed
        again = None
    except PeerLostError as exc:
        again = str(exc)
    g.close()
    return {"elapsed": elapsed, "errors": errors, "again": again}


def test_a_killed_peer_breaks_every_lane_within_the_timeout():
    timeout = 3.0
    with pytest.raises(RankFailedError) as info:
        spawn_local(_lane_dies, 3, (timeout,), timeout=90)
    err = info.value
    assert set(err.failures) == {2}, err.failures
    for r in (0, 1):
        out = err.results[r]
        assert len(out["errors"]) == 3, out  # both lanes' collectives and the cut one failed, none hung
        assert out["elapsed"] < 2 * timeout + 2.0
        assert out["again"] is not None


def _equal_gathers(rank, world_size, addrs):
    with Group(rank, world_size, addrs, timeout=60, lanes=2, transport="tcp", chunk_bytes=256 << 10) as g:
        seen = []
        # Codec payloads: the same shape on every rank, so large ones go to the data lanes in turn.
        payloads = [_data(rank, BIG if i % 2 else 999, i) for i in range(6)]
        futs = [g.all_gather_async(p, check=lambda part: seen.append(part.numel()), equal=True) for p in payloads]
        parts = [f.wait() for f in futs]
        # A large broadcast goes to the next data lane too.
        sent = g.broadcast(torch.full((BIG,), float(rank)), src=1)
        lanes_used = [lane._seq for lane in g._lane_groups]
        # A rank that breaks the promise gets an error that says so, never a misread part.
        try:
            g.all_gather(torch.zeros(BIG + rank), equal=True)
            mismatch = None
        except FrameError as exc:
            mismatch = str(exc)
        return {"parts": parts, "payloads": payloads, "lanes_used": lanes_used, "seen": sorted(seen),
                "mismatch": mismatch, "sent": sent}


def test_equal_all_gathers_and_broadcasts_go_to_the_data_lanes_and_another_shape_is_refused():
    out = spawn_local(_equal_gathers, 2, (), timeout=120)
    for r in range(2):
        got = out[r]
        for i, parts in enumerate(got["parts"]):
            assert len(parts) == 2
            for src in range(2):
                assert torch.equal(parts[src], out[src]["payloads"][i]), (r, i, src)
        # The 3 large gathers and the broadcast went to the 2 data lanes in turn; the 3 small
        # gathers and the port exchange stayed on the group's own lane.
        first, *data = got["lanes_used"]
        assert data == [2, 2], got["lanes_used"]
        assert torch.equal(got["sent"], torch.ones(BIG))
        assert first >= 3
        # check ran on every part, this rank's too.
        assert got["seen"] == sorted([999] * 6 + [BIG] * 6)
        assert got["mismatch"] is not None and "every rank must pass the same shape and dtype" in got["mismatch"]


def test_lane_settings_are_checked_with_a_clear_message(monkeypatch):
    assert check_lanes(2) == 2
    for bad in (0, 9, "2", True):
        with pytest.raises(MacFleetError, match="lanes="):
            check_lanes(bad)
    monkeypatch.setenv("MACFLEET_LANES", "two")
    with pytest.raises(MacFleetError, match="MACFLEET_LANES='two'"):
        default_lanes()
    monkeypatch.setenv("MACFLEET_LANES", "3")
    assert default_lanes() == 3
    monkeypatch.delenv("MACFLEET_LANES")
    assert 1 <= default_lanes() <= 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert default_lanes() == 4  # one per 4 cores, at most 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert default_lanes() == 1
    with Group(0, 1, ["127.0.0.1:0"], lanes=3) as g:
        assert g.lanes == 1  # alone: nothing to spread


def _lanes_offered(rank, world_size, addrs, offers):
    with Group(rank, world_size, addrs, timeout=60, lanes=offers[rank], transport="zmq", stripes=2) as g:
        x = torch.full((BIG,), float(rank + 1))
        futs = [g.all_reduce_async(x.clone()) for _ in range(4)]
        return {"lanes": g.lanes, "transports": [lane.transport for lane in g._lane_groups],
                "sums": [float(f.wait()[0]) for f in futs]}


def test_ranks_offering_different_lane_counts_agree_on_the_fewest():
    """The default lane count follows each rank's cores (a 12-core Mac and an 8-core one differ):
    every rank opens the fewest any rank offered, and the group itself keeps the transport asked
    for (here striped ZeroMQ) while its data lanes run on TCP."""
    out = spawn_local(_lanes_offered, 3, ([3, 2, 4],), timeout=120)
    for r in range(3):
        assert out[r]["lanes"] == 2
        assert out[r]["transports"] == ["zmq", "tcp", "tcp"]
        assert out[r]["sums"] == [6.0] * 4
