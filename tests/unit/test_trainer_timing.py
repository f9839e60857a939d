"""metrics.json's samples_per_s and step_s leave out `trainer.timing_warmup_steps`.

The model sleeps in its first training forwards, so a warm-up step is known to take at least
SLEEP_S: a mean that leaves them out stays under it, one that counts them cannot.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from macfleet import Trainer, TrainingConfig

SLEEP_S = 0.5
SLOW_STEPS = 2
STEPS = 5


class SlowStart(torch.nn.Module):
    """The digits CNN, sleeping in its first SLOW_STEPS training forwards."""

    def __init__(self):
        super().__init__()
        from macfleet.models.cnn import build

        self.net = build(num_classes=10, in_channels=1)
        self.forwards = 0

    def forward(self, x):
        if self.training:
            self.forwards += 1
            if self.forwards <= SLOW_STEPS:
                time.sleep(SLEEP_S)
        return self.net(x)


def _fit(out, timing_warmup_steps: int) -> dict:
    from macfleet.data.digits import build as digits

    torch.manual_seed(0)
    tc = TrainingConfig(epochs=1, max_steps=STEPS, batch_size=32, output_dir=str(out), progress=False,
                        checkpoint_every=0, timing_warmup_steps=timing_warmup_steps)
    Trainer(SlowStart(), digits(), tc).fit()
    return json.loads((out / "metrics.json").read_text())


def test_warmup_steps_are_left_out_of_throughput(tmp_path):
    m = _fit(tmp_path / "warm", SLOW_STEPS)
    assert m["steps"] == STEPS and m["timed_steps"] == STEPS - SLOW_STEPS
    assert m["step_s"] < SLEEP_S  # no sleeping step in the mean
    assert m["samples_per_s"] == pytest.approx(32 / m["step_s"])

    every = _fit(tmp_path / "all", 0)  # the default: every step counts, sleeps included
    assert every["timed_steps"] == STEPS
    assert every["step_s"] >= SLOW_STEPS * SLEEP_S / STEPS
    assert every["samples_per_s"] == pytest.approx(32 / every["step_s"])
    # The slowest timed step: a sleeping one when they count, never one when they are left out.
    assert every["step_max_s"] >= SLEEP_S and every["step_max_at"] in range(1, SLOW_STEPS + 1)
    assert m["step_max_s"] < SLEEP_S and m["step_max_at"] in range(SLOW_STEPS + 1, STEPS + 1)


def test_a_stall_that_the_mean_hides_is_called_out():
    from macfleet.benchmark.scaling import stalled

    line = stalled({"step_s": 0.2, "step_max_s": 0.9, "step_max_at": 7, "timed_steps": 6})
    assert line.startswith("step 7 took 900.0 ms, 4.5x the mean step: a stall")
    assert stalled({"step_s": 0.2, "step_max_s": 0.5, "step_max_at": 7, "timed_steps": 6}) == ""
    assert stalled({"step_s": 0.2, "step_max_s": 0.9, "step_max_at": 1, "timed_steps": 1}) == ""  # one step: no mean
    assert stalled({"samples_per_s": 10.0, "step_s": 0.1}) == ""  # metrics from before the field


def test_timing_warmup_steps_must_not_be_negative():
    from macfleet.errors import ConfigError

    with pytest.raises(ConfigError, match="timing_warmup_steps"):
        TrainingConfig(timing_warmup_steps=-1)


def test_auto_decides_again_only_when_the_step_time_stays_far_from_its_reference():
    from macfleet.trainer import _StepWatch

    w = _StepWatch()
    # No figure yet, the codec's first steps (buffers allocated, DDP's buckets rebuilt), then the reference.
    assert not any(w.changed(s) for s in (0.0, 0.900, 0.300, 0.250, 0.100, 0.104, 0.098))
    assert w.reference == pytest.approx(0.100)
    # One slow interval (an evaluation, a checkpoint) and noise never trigger.
    assert not any(w.changed(s) for s in (0.900, 0.110, 0.130, 0.140, 0.090, 0.070))
    # The link or a Mac slowed for good: the third vote in a row beyond 1.5x triggers.
    assert [w.changed(s) for s in (0.160, 0.170, 0.165)] == [False, False, True]
    w.reset()  # decided again: the new codec's step time becomes the reference
    assert not any(w.changed(s) for s in (0.200, 0.200, 0.200, 0.050, 0.052, 0.051))
    assert w.reference == pytest.approx(0.051)
    assert [w.changed(s) for s in (0.030, 0.031, 0.032)] == [False, False, True]  # faster counts too


def test_a_dataloader_worker_death_is_found_behind_the_error_it_interrupted():
    """PyTorch raises a worker's death from its SIGCHLD handler wherever the main thread is; inside
    torch.save the zip writer's cleanup then fails too (seen in CI): the death must still be found."""
    from macfleet.trainer import _worker_death

    try:
        try:
            raise RuntimeError("DataLoader worker (pid 32039) is killed by signal: Killed. ")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 93824 vs 93720")
    except RuntimeError as exc:
        outer = exc
    assert str(_worker_death(outer)).startswith("DataLoader worker (pid 32039)")
    assert _worker_death(RuntimeError("CUDA out of memory")) is None


def test_the_boundary_between_timed_steps_counts_unless_paused():
    """_StepClock: a step's cost is its own time and the boundary before it (where the stop vote
    can wait on the device); not the boundary after a pause (evaluation, checkpoint, regroup),
    nor one before the timing starts."""
    from macfleet.trainer import _StepClock

    gap = 0.05
    clock = _StepClock()
    clock.start()
    assert clock.end(timed=False) == 0.0  # a warm-up step
    time.sleep(gap)
    clock.start()
    assert clock.end(timed=True) == 0.0  # the first timed step: the boundary before it is the warm-up's
    time.sleep(gap)
    clock.start()
    assert clock.end(timed=True) >= gap  # the boundary between two timed steps is part of the second
    clock.pause()
    time.sleep(gap)
    clock.start()
    assert clock.end(timed=True) == 0.0  # evaluation or a regroup in between: left out
    time.sleep(gap)
    clock.start()
    assert clock.end(timed=True) >= gap
