"""trainer.profile_steps: the step profile's arithmetic and its config check (the profiler itself
runs in tests/integration/test_benchmark_scaling.py, on real train.py fleets)."""

import pytest

from macfleet.config import TrainingConfig
from macfleet.errors import ConfigError
from macfleet.profile import _union_us


@pytest.mark.parametrize("spans, covered", [
    ([], 0.0),
    ([(0, 10)], 10.0),
    ([(0, 10), (5, 15)], 15.0),          # overlapping kernels on two streams count once
    ([(0, 10), (2, 3)], 10.0),           # one inside another
    ([(20, 30), (0, 10)], 20.0),         # any order, idle gap between
    ([(0, 10), (10, 12), (11, 20)], 20.0),
])
def test_device_busy_is_the_union_of_spans(spans, covered):
    assert _union_us(spans) == covered


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_profile_steps_must_be_a_count(bad):
    with pytest.raises(ConfigError, match="trainer.profile_steps"):
        TrainingConfig(profile_steps=bad)


def test_a_profile_that_cannot_be_written_still_gives_its_figures(tmp_path, caplog):
    """A read-only run folder (as a full disk would): a warning, and the summary all the same."""
    import torch

    from macfleet.profile import StepProfiler

    blocked = tmp_path / "run"
    blocked.write_text("a file where the run folder should be")  # profile/ cannot be made under it
    prof = StepProfiler(2, torch.device("cpu"), blocked, rank=0)
    prof.start()
    x = torch.randn(8, 4, requires_grad=True)
    for _ in range(2):
        with prof.phase("forward"):
            loss = (x * 2).sum()
        with prof.phase("backward"):
            loss.backward()
        done = prof.step_done(0.001)
    assert done and prof.done and not prof.active
    assert prof.summary is None and "could not write" not in caplog.text  # read and written at finish
    s = prof.finish()
    assert prof.finish() is s  # once
    assert s["steps"] == 2 and s["device_busy_s"] is None and set(s["phases_s"]) == {"forward", "backward"}
    assert "profile: could not write its files" in caplog.text
    assert prof.line().startswith("profile, rank 0, 2 steps on cpu: ")
