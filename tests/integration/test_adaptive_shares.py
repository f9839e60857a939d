"""Shares that follow speed (cluster.adapt_shares), with real processes on 127.0.0.1
(tests/integration/elastic_node.py): a node three times slower per sample ends with about a
quarter of each global batch, every step's shards still make up exactly that step's global batch,
and a run resumed from a checkpoint taken after the shares moved continues bit-exactly."""

from __future__ import annotations

import json
import shutil

import torch

from macfleet.comm.launch import free_ports
from macfleet.sampler import WeightedBatchSampler
from tests.integration.elastic_node import committed_batches
from tests.integration.test_elastic import _logs, _node

BATCH = 16


def _pair(out, record, *extra: str, slow=(0.0, 0.0)) -> list:
    port, t0, t1 = free_ports(3)
    return [_node("master", port, t0, out, record, "--nodes", "2", "--batch", str(BATCH), *extra,
                  "--slow-ms-per-sample", str(slow[0])),
            _node("worker", port, t1, out, record, "--nodes", "2", "--batch", str(BATCH), *extra,
                  "--slow-ms-per-sample", str(slow[1]))]


def _finish(procs, where) -> None:
    try:
        codes = [p.wait(180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0], (codes, _logs(where))


def test_shares_move_toward_a_slower_nodes_speed_and_still_make_up_each_batch(tmp_path):
    out, record = tmp_path / "run", tmp_path / "record.jsonl"
    out.mkdir()
    _finish(_pair(out, record, "--adapt", "--max-steps", "100", slow=(0.5, 1.5)), tmp_path)
    moves = [h for h in json.loads((out / "history.json").read_text()) if "shares" in h]
    assert moves, _logs(tmp_path)
    final = moves[-1]["shares"]
    print(f"shares moved {len(moves)} time(s), to {[round(s, 3) for s in final]} (node 1's true share 0.25)")
    assert 0.12 < final[1] < 0.38 and abs(sum(final) - 1) < 1e-6, moves  # its true speed: 0.25
    # Every committed step: the two shards are that step's global batch, no index twice or missing.
    steps = committed_batches(record.read_text().splitlines())
    perm = WeightedBatchSampler(1797, BATCH, [1.0], seed=0).permutation().tolist()
    assert sorted(steps) == list(range(100))
    for s, got in steps.items():
        assert sorted(got) == sorted(perm[s * BATCH:(s + 1) * BATCH]), f"step {s}"


def test_resume_after_the_shares_moved_is_bit_exact(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir()
    _finish(_pair(full, tmp_path / "a.jsonl", "--force-shares", "0.7,0.3", "--max-steps", "40",
                  "--checkpoint-every-steps", "20"), tmp_path)
    moves = [h for h in json.loads((full / "history.json").read_text()) if "shares" in h]
    assert moves and moves[0]["step"] < 20, moves
    # Resume from the uninterrupted run's own step-20 checkpoint (taken at shares 0.7/0.3).
    shutil.copytree(full / "checkpoints" / "step-00000020", resumed / "checkpoints" / "step-00000020")
    # No adaptation in the resumed run: only the checkpoint can bring the shares back to 0.7/0.3.
    _finish(_pair(resumed, tmp_path / "b.jsonl", "--max-steps", "40", "--resume", "auto"), tmp_path)
    assert "shares as at the checkpoint: [0.7, 0.3]" in _logs(tmp_path)
    a, b = torch.load(full / "final.pt"), torch.load(resumed / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), {k: (a[k] - b[k]).abs().max().item() for k in a}
