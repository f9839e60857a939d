"""Generations of an elastic run at the control plane: a real Coordinator and real join() calls
on 127.0.0.1 (threads, no torch). Who is in after a departure and after a join, with what ranks
and shares; cluster.min_nodes; joins a run in progress cannot take."""

from __future__ import annotations

import threading
import time

import pytest

from macfleet.cluster.coordinator import Coordinator
from macfleet.cluster.membership import join
from macfleet.errors import JoinRefusedError
from tests.unit.test_cluster_join import FP, _cfg, _facts


def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _start(nodes: int, **kw):
    coord = Coordinator(_cfg(nodes=nodes, **kw), FP, _facts("pro"), {"run_id": "r"}, log_sink=lambda line: None).start()
    members = {}
    threads = [threading.Thread(target=lambda r=r: members.__setitem__(r, join(
        _cfg(master_port=coord.port), FP, _facts(f"w{r}", rank=r), f":{7100 + r}"))) for r in range(1, nodes)]
    for t in threads:
        t.start()
    members[0] = coord.wait_for_nodes(":7100")
    for t in threads:
        t.join(15)
    return coord, members


def _join_later(coord, host: str, port: int) -> dict:
    out = {}

    def run():
        try:
            out["m"] = join(_cfg(master_port=coord.port), FP, _facts(host), f":{port}")
        except Exception as exc:  # noqa: BLE001 - the test reads it
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    out["thread"] = t
    return out


def test_departure_then_join_form_generations_with_new_ranks_and_shares():
    coord, m = _start(3)
    try:
        assert coord.generation == 1
        m[1].close(reason="Ctrl-C")
        world = coord.next_world(1, timeout=10)
        assert world["generation"] == 2 and world["peers"] == ["master", "g1-r2"] and world["weights"] == [0.5, 0.5]
        # The worker that stays hears the generation on its heartbeats and takes rank 1 in it.
        got = m[2].next_world(1, timeout=10)
        m[2].advance(got)
        assert (m[2].rank, m[2].world_size, m[2].generation) == (1, 2, 2)
        assert m[2].addrs[1].endswith(":7102") and m[2].weights == [0.5, 0.5]
        # A node that starts again joins at the master's next step boundary (advance()).
        joiner = _join_later(coord, "w1", 7101)
        _until(lambda: coord.joiners() == 1)
        assert [r["state"] for r in coord.status() if r["rank"] is None] == ["joining", "left"]
        world = coord.advance(timeout=10)
        joiner["thread"].join(10)
        new = joiner["m"]
        assert world["generation"] == 3 and world["joined"] == [new.peer_id] and new.running
        assert (new.rank, new.world_size, new.generation) == (2, 3, 3)
        assert [round(w, 3) for w in world["weights"]] == [0.333] * 3
        assert "joined as rank 2" in coord.events[-1]["what"]
        new.close()
    finally:
        m[2].close()
        m[0].close()


def test_below_min_nodes_the_run_waits_and_the_next_join_forms_the_generation():
    coord, m = _start(3, min_nodes=2)
    try:
        m[1].close(reason="Ctrl-C")
        assert coord.next_world(1, timeout=10)["generation"] == 2  # 2 left: enough
        m[2].close(reason="Ctrl-C")
        _until(lambda: "fewer than cluster.min_nodes=2" in coord.events[-1]["what"])
        assert coord.generation == 2  # no generation of one node
        joiner = _join_later(coord, "w3", 7103)
        world = coord.next_world(2, timeout=10)  # formed at once: the run is stalled, no boundary to wait for
        joiner["thread"].join(10)
        assert world["generation"] == 3 and len(world["peers"]) == 2 and joiner["m"].rank == 1
        joiner["m"].close()
    finally:
        m[0].close()


def test_joins_a_running_run_cannot_take_are_refused_with_the_reason():
    coord, m = _start(2)
    try:
        full = _join_later(coord, "extra", 7109)
        full["thread"].join(15)
        assert isinstance(full.get("error"), JoinRefusedError) and "already has cluster.nodes=2" in str(full["error"])
    finally:
        m[1].close()
        m[0].close()
    fixed, fm = _start(2, elastic=False)
    try:
        late = _join_later(fixed, "late", 7119)
        late["thread"].join(15)
        assert "cluster.elastic is false" in str(late.get("error")), late
    finally:
        fm[1].close()
        fm[0].close()


def test_a_joiner_still_waiting_when_the_run_ends_is_told_so():
    coord, m = _start(2)
    m[1].close(reason="Ctrl-C")
    coord.next_world(1, timeout=10)
    joiner = _join_later(coord, "w1", 7131)
    _until(lambda: coord.joiners() == 1)
    m[0].close()  # the run ends before a step boundary took it in
    joiner["thread"].join(15)
    assert isinstance(joiner.get("error"), JoinRefusedError) and "run ended before" in str(joiner["error"]), joiner
