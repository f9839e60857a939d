"""One node of the elastic-fleet tests (test_elastic.py), as a real process: the Python API on
scikit-learn's digits with an MLP (no BatchNorm; with compression none N nodes compute what one
process does).

- $ELASTIC_RECORD gets one JSON line per attempt of a step, {"kind": "try", "step", "generation",
  "pid", "indices"} (the sample indices this node's forward took), and one per step this node
  commits (its optimizer stepped), {"kind": "commit", "step", "generation", "pid"}. A step's
  global batch is the union of the tries of the generation that committed it: a node behind by
  the step in flight (it failed there while another completed it) commits nothing and takes
  the state, but its share was in the step. `committed_batches` reads the record.
- `--die-at S` kills this process with SIGKILL when it is about to run step S.
- `--gate-at S` (master): step S waits until a node asks to join, so a rejoin lands in the epoch.
- `--slow-ms-per-sample`: a slower node (its forward also sleeps per sample); `--adapt`: shares
  follow speed; `--force-shares`: the shares move to given values once (a deterministic change).
- The master writes the final parameters to OUT/final.pt.

    python -m tests.integration.elastic_node master|worker|single PORT TPORT OUT [--nodes N] ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import torch
from torch.utils.data import TensorDataset

from macfleet import ClusterConfig, NodeRole, Trainer, TrainingConfig


def dataset() -> TensorDataset:
    from macfleet.data.digits import _shipped

    pixels, target = _shipped()
    x = torch.tensor(pixels, dtype=torch.float32) / 16.0
    index = torch.arange(len(x), dtype=torch.float32).unsqueeze(1)
    return TensorDataset(torch.cat([x, index], 1), torch.tensor(target, dtype=torch.long))


class IndexedMLP(torch.nn.Module):
    """An MLP whose input's last column is the sample index: read (for the record), not used."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

    slow_s_per_sample = 0.0
    """A slower Mac: each forward also takes this long per sample (--slow-ms-per-sample)."""

    def forward(self, x):
        if self.training:
            _record("try", indices=x[:, -1].long().tolist())
        if self.slow_s_per_sample and self.training:
            time.sleep(self.slow_s_per_sample * len(x))
        return self.body(x[:, :-1])


MODEL = None
AT = {"step": -1, "generation": 0}
"""The step (and generation) this node is running: set at the start of each `train_step`."""


def _record(kind: str, **row) -> None:
    path = os.environ.get("ELASTIC_RECORD")
    if path:
        with open(path, "a") as f:  # one short line per write, appended whole (O_APPEND)
            f.write(json.dumps({"kind": kind, **AT, "pid": os.getpid(), **row}) + "\n")


def committed_batches(lines: list[str], killed: tuple[int, ...] = ()) -> dict[int, list[int]]:
    """{step: the sample indices of that committed step}, from a record's lines. Asserts that each
    step was committed in one generation only (never applied twice across a regroup). The commits
    of `killed` pids are left out: a node's last step may complete on it alone (its last chunks
    never reached the others, who redo that step without it); its tries still count."""
    rows = [json.loads(line) for line in lines]
    gens: dict[int, set[int]] = {}
    for r in rows:
        if r["kind"] == "commit" and r["pid"] not in killed:
            gens.setdefault(r["step"], set()).add(r["generation"])
    twice = {s: g for s, g in gens.items() if len(g) > 1}
    assert not twice, f"steps committed in more than one generation: {twice}"
    done = {s: g.pop() for s, g in gens.items()}
    batches: dict[int, list[int]] = {s: [] for s in done}
    for r in rows:
        if r["kind"] == "try" and done.get(r["step"]) == r["generation"]:
            batches[r["step"]].extend(r["indices"])
    return batches


class RecordingSGD(torch.optim.SGD):
    """SGD that records every step it takes (a committed step)."""

    def step(self, closure=None):
        out = super().step(closure)
        _record("commit")
        return out


def recording_sgd(params):
    return RecordingSGD(params, lr=0.05, momentum=0.9)


class Node(Trainer):
    die_at: int | None = None
    gate_at: int | None = None
    force_shares: list | None = None

    def propose_shares(self, weights, rates, step, votes_since):
        if self.force_shares is None:
            return super().propose_shares(weights, rates, step, votes_since)
        if step >= 5 and weights != self.force_shares:
            return list(self.force_shares)  # once: the run keeps them after
        return None

    def train_step(self, state, fleet, world, batch, device):
        AT.update(step=state.step, generation=world.generation)
        if self.die_at is not None and state.step == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.gate_at is not None and world.rank == 0 and state.step == self.gate_at:
            deadline = time.monotonic() + 120
            while world.joiners() == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
        return super().train_step(state, fleet, world, batch, device)


def main() -> None:
    global MODEL
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=("master", "worker", "single"))
    p.add_argument("port", type=int)
    p.add_argument("tport", type=int)
    p.add_argument("out")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--die-at", type=int)
    p.add_argument("--gate-at", type=int)
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--checkpoint-every-steps", type=int, default=0)
    p.add_argument("--resume", default="none")
    p.add_argument("--slow-ms-per-sample", type=float, default=0.0)
    p.add_argument("--adapt", action="store_true", help="cluster.adapt_shares")
    p.add_argument("--force-shares", help="e.g. 0.7,0.3: the shares move there at the first vote from step 5")
    a = p.parse_args()
    torch.manual_seed(0)
    MODEL = IndexedMLP()
    MODEL.slow_s_per_sample = a.slow_ms_per_sample / 1e3
    tc = TrainingConfig(epochs=a.epochs, batch_size=a.batch, learning_rate=0.05, lr_schedule="constant", progress=False,
                        output_dir=a.out, device="cpu", log_every=1000, checkpoint_every=0, max_steps=a.max_steps,
                        checkpoint_every_steps=a.checkpoint_every_steps, resume=a.resume, keep_checkpoints=5)
    cc = None if a.role == "single" else ClusterConfig(
        role=NodeRole(a.role), master_addr="127.0.0.1", master_port=a.port, tensor_port=a.tport, nodes=a.nodes,
        heartbeat_interval=a.heartbeat, wait_timeout=60, adapt_shares=a.adapt or bool(a.force_shares))
    node = Node(MODEL, dataset(), tc, cc, optimizer=recording_sgd)
    node.die_at, node.gate_at = a.die_at, a.gate_at
    node.force_shares = [float(s) for s in a.force_shares.split(",")] if a.force_shares else None
    node.fit()
    if a.role != "worker":
        torch.save({k: v.clone() for k, v in MODEL.state_dict().items()}, os.path.join(a.out, "final.pt"))


if __name__ == "__main__":
    main()
