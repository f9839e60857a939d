"""Resume with a lossy codec is exact (issue #5): a 2-node top-k run stopped mid-epoch and
resumed with `trainer.resume=auto` ends with the same bits as the run that never stopped.

That needs every rank's error-feedback residuals in the checkpoint and back on the same rank,
keyed by parameter name: PyTorch's DDP rebuilds its buckets after the first step, and a resumed
process starts again from the initial bucket layout (cluster.ddp=torch); the flat path sends
every gradient as one bucket (cluster.ddp=flat). Both must reach the same bits as the straight
run. With Deep Gradient Compression's options the velocities are state too, and the sparsity
warm-up must pick up at the resumed step.
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
CODECS = {
    "topk_fp16": ["compression=topk_fp16", "compression.ratio=0.1"],
    # stopped inside the warm-up (ratio 1.0 -> 0.1 over 40 steps): dense and sparse steps both resume.
    "topk_dgc": ["compression=topk", "compression.ratio=0.1", "compression.momentum_correction=true",
                 "compression.warmup_steps=40"],
}


def _args(codec: str, ddp: str, *more: str) -> list[str]:
    # Same epochs on every run: the LR schedule's length comes from trainer.epochs, not max_steps.
    return [*CODECS[codec], f"trainer.epochs={EPOCHS}", f"cluster.ddp={ddp}", *more]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """codec -> the run dir of a straight (never stopped) run on the torch path, run once."""
    runs: dict[str, Path] = {}

    def get(codec: str) -> Path:
        if codec not in runs:
            runs[codec] = tmp_path_factory.mktemp(f"straight_{codec}")
            train_fleet(runs[codec], *_args(codec, "torch"))
        return runs[codec]

    return get


# One run: the flat path (what MPS takes) with DGC (topk_fp16 underneath, plus velocities). Residuals
# are kept per parameter name on both gradient paths, so the torch DDP path's resume is the same
# state; a second run of it cost the suite 40 s.
@pytest.fixture(scope="module", params=[("flat", "topk_dgc")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def interrupted(request, tmp_path_factory) -> dict:
    """A run stopped at STOP by trainer.max_steps, then resumed in the same dir to the end."""
    ddp, codec = request.param
    out = tmp_path_factory.mktemp(f"resumed_{ddp}_{codec}")
    stopped = train_fleet(out, *_args(codec, ddp, f"trainer.max_steps={STOP}"))
    at_stop = checkpoint_state(out, STOP)
    # max_steps=0: run to the end of the epochs (the stopped run's max_steps would stop it at once).
    resumed = train_fleet(out, *_args(codec, ddp, "trainer.resume=auto", "trainer.max_steps=0"))
    return {"ddp": ddp, "codec": codec, "out": out, "stopped": stopped, "at_stop": at_stop, "resumed": resumed}


def test_checkpoint_holds_both_ranks_residuals(interrupted):
    assert interrupted["stopped"]["steps"] == STOP
    per_rank = interrupted["at_stop"]["per_rank"]
    assert len(per_rank) == 2
    feedback = [r["compression"]["feedback"] for r in per_rank]
    residuals = [f["residuals"] for f in feedback]
    assert residuals[0].keys() == residuals[1].keys() and len(residuals[0]) > 0
    # Each node keeps what IT did not send: the two ranks' residuals are different tensors.
    assert any(not torch.equal(residuals[0][k], residuals[1][k]) for k in residuals[0])
    assert all(float(r.abs().sum()) > 0 for r in residuals[1].values() if r.numel() > 64)
    if interrupted["codec"] == "topk_dgc":
        assert all(f["velocities"].keys() == residuals[0].keys() for f in feedback)


def test_resumed_run_is_bit_identical_to_straight_run(interrupted, straight):
    assert interrupted["resumed"]["steps"] == STEPS
    reference = straight(interrupted["codec"])
    # The straight run took the torch path; the flat one must reach the same bits, since top-k
    # selects per parameter and never depends on how parameters are grouped into buckets.
    what = f"cluster.ddp={interrupted['ddp']} {interrupted['codec']}: stopped at {STOP}, resumed to {STEPS} vs straight"
    assert_identical(model_at(interrupted["out"]), model_at(reference), what)
    a, b = checkpoint_state(interrupted["out"]), checkpoint_state(reference)
    # The optimizer's momentum (zero under DGC, which keeps it in the velocities) ...
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))
    # ... and the error-feedback state each rank carries into the next step.
    for ra, rb in zip(a["per_rank"], b["per_rank"]):
        fa, fb = ra["compression"]["feedback"], rb["compression"]["feedback"]
        assert_identical(fa["residuals"], fb["residuals"], f"{what}: residuals at the end")
        assert_identical(fa["velocities"], fb["velocities"], f"{what}: velocities at the end")
    assert interrupted["resumed"]["test_loss"] == metrics(reference)["test_loss"]
    # The byte counters travel in the checkpoint too: the resumed run reports the whole run's
    # wire ratio, not only the part after the resume.
    assert interrupted["resumed"]["wire_ratio"] == metrics(reference)["wire_ratio"]
