"""Elastic fleet, end to end with real processes on 127.0.0.1 (tests/integration/elastic_node.py).

Three nodes train one epoch of digits with compression none and no BatchNorm. One worker
SIGKILLs itself at a step: the two others drop that step, form generation 2 and redo it with
the same global batch. The same command started again joins the running run (generation 3) and
receives the training state. The final parameters equal one process's on the same global batches,
and over the epoch every sample index was trained on exactly once across the generations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from macfleet.comm.launch import free_ports
from macfleet.sampler import WeightedBatchSampler
from tests.integration.elastic_node import committed_batches

ROOT = Path(__file__).resolve().parents[2]
DIE_AT, GATE_AT, BATCH = 12, 30, 8


def _node(role: str, port: int, tport: int, out: Path, record: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, ELASTIC_RECORD=str(record), OMP_NUM_THREADS="1")
    log = open(out.parent / f"{role}-{tport}-{len(list(out.parent.glob('*.log')))}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "tests.integration.elastic_node", role, str(port), str(tport),
                             str(out), *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _logs(where: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(where.glob("*.log")))


def test_three_nodes_lose_one_regain_it_and_match_one_process(tmp_path):
    fleet_dir, single_dir = tmp_path / "fleet", tmp_path / "single"
    fleet_dir.mkdir()
    single_dir.mkdir()
    record, single_record = tmp_path / "fleet.jsonl", tmp_path / "single.jsonl"
    port, *tports = free_ports(4)
    procs = [_node("master", port, tports[0], fleet_dir, record, "--gate-at", str(GATE_AT)),
             _node("worker", port, tports[1], fleet_dir, record),
             _node("worker", port, tports[2], fleet_dir, record, "--die-at", str(DIE_AT))]
    single = _node("single", 0, 0, single_dir, single_record, "--nodes", "1")
    try:
        assert procs[2].wait(120) == -9, _logs(tmp_path)
        # The same command again (without the kill): it joins the run in progress.
        procs.append(_node("worker", port, tports[2], fleet_dir, record))
        codes = [p.wait(180) for p in procs[:2] + procs[3:]] + [single.wait(120)]
    finally:
        for p in procs + [single]:
            p.kill()
    assert codes == [0, 0, 0, 0], (codes, _logs(tmp_path))

    # Generations: lost at DIE_AT (redone by two nodes), rejoined after GATE_AT within the epoch.
    history = json.loads((fleet_dir / "history.json").read_text())
    events = [h for h in history if "event" in h]
    assert [e["generation"] for e in events] == [2, 3], events
    # Lost at DIE_AT, or a step before: the killed worker's last chunks may not reach the others,
    # who then redo that step (which it alone completed) without it.
    assert events[0]["step"] in (DIE_AT - 1, DIE_AT), events
    assert events[0]["world_size"] == 2 and " lost;" in events[0]["event"]
    steps_per_epoch = 1797 // BATCH
    assert GATE_AT <= events[1]["step"] < steps_per_epoch and events[1]["world_size"] == 3, events
    assert "joined as rank 2" in events[1]["event"], events
    metrics = json.loads((fleet_dir / "metrics.json").read_text())
    assert metrics["steps"] == steps_per_epoch and metrics["generation"] == 3 and metrics["world_size"] == 3

    # N nodes, through a loss and a rejoin, compute what one process computes.
    got, want = torch.load(fleet_dir / "final.pt"), torch.load(single_dir / "final.pt")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")

    # Exactly once: the committed steps of every process, over both membership changes, used
    # each index of the epoch's global batches once, and no other. A step's batch is the union of
    # the shares tried in the generation that committed it (elastic_node.committed_batches).
    batches = committed_batches(record.read_text().splitlines(), killed=(procs[2].pid,))
    assert sorted(batches) == list(range(steps_per_epoch)), sorted(set(range(steps_per_epoch)) ^ set(batches))
    perm = WeightedBatchSampler(1797, BATCH, [1.0], seed=0).permutation().tolist()
    for s, got in batches.items():
        assert sorted(got) == sorted(perm[s * BATCH:(s + 1) * BATCH]), f"step {s}: {sorted(got)}"
