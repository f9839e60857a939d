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
