"""`throttle_figures` (benchmark scaling --throttle): the recovery figure derives from the curve,
and a throttle that made no dip is said so, never reported as a quick recovery."""

from __future__ import annotations

from macfleet.benchmark.scaling import _recovery, throttle_figures


def _history(speed) -> list[dict]:
    return [{"step": s, "samples_per_s": float(speed(s))} for s in range(1, 41)]


def test_a_dip_then_recovery_counts_the_steps_to_recover():
    got = throttle_figures(_history(lambda s: 50 if 20 < s <= 30 else 100), 20, 2, 100.0)
    assert (got["steps_to_recover"], got["slowed"], got["steps_after_throttle"]) == (13, True, 20)
    assert got["before_samples_per_s"] == 100 and got["final_samples_per_s"] == 100
    assert "back within 5% of the ideal after 13 steps" in _recovery(got)


def test_no_dip_is_not_a_recovery():
    got = throttle_figures(_history(lambda s: 100), 20, 2, 100.0)
    assert (got["steps_to_recover"], got["slowed"]) == (5, False)
    assert "no dip to recover from" in _recovery(got) and "back within" not in _recovery(got)


def test_never_back_and_too_few_steps():
    never = throttle_figures(_history(lambda s: 100 if s <= 20 else 50), 20, 2, 100.0)
    assert (never["steps_to_recover"], never["slowed"]) == (None, True)
    assert "not within 5% of the ideal within 20 steps" in _recovery(never)
    short = throttle_figures(_history(lambda s: 100)[:23], 20, 2, 100.0)
    assert (short["steps_to_recover"], short["slowed"], short["steps_after_throttle"]) == (None, None, 3)


def test_a_late_dip_counts_from_where_the_fleet_is_back_for_good():
    """The first window after the throttle still ran at full speed; the dip came after it (the
    shape of a run on a 16-core host: within 5%, then 6-9% short, then back)."""
    got = throttle_figures(_history(lambda s: 50 if 25 <= s <= 30 else 100), 20, 2, 100.0)
    assert (got["slowed"], got["steps_to_recover"]) == (True, 13)
    assert "back within 5% of the ideal after 13 steps" in _recovery(got)
    # Back, then short again at the end: not recovered.
    got = throttle_figures(_history(lambda s: 50 if s > 35 else 100), 20, 2, 100.0)
    assert (got["slowed"], got["steps_to_recover"]) == (True, None)
