"""Resume with a lossy codec is exact (issue #5): a 2-node topk_fp16 run stopped mid-epoch and
resumed with `trainer.resume=auto` ends with the same bits as the run that never stopped.

That needs every rank's error-feedback residuals in the checkpoint and back on the same rank,
keyed by parameter name: PyTorch's DDP rebuilds its buckets after the first step, and a resumed
process starts again from the initial bucket layout (cluster.ddp=torch); the flat path sends
every gradient as one bucket (cluster.ddp=flat). Both must reach the same bits as the straight run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration.test_convergence import assert_identical, checkpoint_state, metrics, model_at, train_fleet

EPOCHS = 3
STEPS = 22 * EPOCHS
STOP = 31
"""Mid-epoch 2 (22 steps per epoch), so the sampler's position in the epoch is restored too."""
# Same epochs on every run: the LR schedule's length comes from trainer.epochs, not max_steps.
RUN = ["compression=topk_fp16", "compression.ratio=0.1", f"trainer.epochs={EPOCHS}"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    train_fleet(out, *RUN, "cluster.ddp=torch")
    return out


@pytest.fixture(scope="module", params=["torch", "flat"])
def interrupted(request, tmp_path_factory) -> dict:
    """A run stopped at STOP by trainer.max_steps, then resumed in the same dir to the end."""
    ddp = request.param
    out = tmp_path_factory.mktemp(f"resumed_{ddp}")
    stopped = train_fleet(out, *RUN, f"cluster.ddp={ddp}", f"trainer.max_steps={STOP}")
    at_stop = checkpoint_state(out, STOP)
    # max_steps=0: run to the end of the epochs (the stopped run's max_steps would stop it at once).
    resumed = train_fleet(out, *RUN, f"cluster.ddp={ddp}", "trainer.resume=auto", "trainer.max_steps=0")
    return {"ddp": ddp, "out": out, "stopped": stopped, "at_stop": at_stop, "resumed": resumed}


def test_checkpoint_holds_both_ranks_residuals(interrupted):
    assert interrupted["stopped"]["steps"] == STOP
    per_rank = interrupted["at_stop"]["per_rank"]
    assert len(per_rank) == 2
    residuals = [r["compression"]["feedback"]["residuals"] for r in per_rank]
    assert residuals[0].keys() == residuals[1].keys() and len(residuals[0]) > 0
    # Each node keeps what IT did not send: the two ranks' residuals are different tensors.
    assert any(not torch.equal(residuals[0][k], residuals[1][k]) for k in residuals[0])
    assert all(float(r.abs().sum()) > 0 for r in residuals[1].values() if r.numel() > 64)


def test_resumed_run_is_bit_identical_to_straight_run(interrupted, straight):
    assert interrupted["resumed"]["steps"] == STEPS
    # The straight run took the torch path; the flat one must reach the same bits, since top-k
    # selects per parameter and never depends on how parameters are grouped into buckets.
    assert_identical(model_at(interrupted["out"]), model_at(straight),
                     f"cluster.ddp={interrupted['ddp']}: stopped at {STOP}, resumed to {STEPS} vs straight")
    # The optimizer's momentum too: the next step would diverge otherwise.
    a, b = checkpoint_state(interrupted["out"]), checkpoint_state(straight)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # And the residuals each rank will carry into the next step.
    for ra, rb in zip(a["per_rank"], b["per_rank"]):
        assert_identical(ra["compression"]["feedback"]["residuals"], rb["compression"]["feedback"]["residuals"],
                         "residuals at the end")
    assert interrupted["resumed"]["test_loss"] == metrics(straight)["test_loss"]
