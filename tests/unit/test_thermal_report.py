"""Thermal pressure on heartbeats: the heartbeat schema's `thermal` field, the line the master
logs when a node enters or leaves heavy pressure, and how `macfleet status` shows a level."""

from __future__ import annotations

import pytest

from macfleet.cluster.agent import _fmt
from macfleet.cluster.macos import PRESSURE_LEVELS, thermal_change, thermal_level
from macfleet.cluster.protocol import THERMAL_LEVELS, decode, encode
from macfleet.errors import FrameError


def test_heartbeat_schema_takes_every_level_and_nothing_else():
    assert THERMAL_LEVELS == PRESSURE_LEVELS + ("unknown",)
    for level in THERMAL_LEVELS:
        assert decode(encode("hb", peer="g1-r1", n=1, state="training", thermal=level))["thermal"] == level
    assert "thermal" not in decode(encode("hb", peer="g1-r1", n=1))  # optional: older nodes send none
    for bad, said in (("hot", "hb.thermal must be one of nominal, moderate, heavy"), (2, "hb.thermal must be a string"),
                      ("x" * 40, "hb.thermal must be a string of at most 16 characters")):
        with pytest.raises(FrameError, match=said):
            decode(encode("hb", peer="g1-r1", n=1, thermal=bad))


def test_a_line_only_when_a_node_enters_leaves_or_moves_within_heavy_or_worse():
    assert thermal_change("node rank 1 (air)", None, "nominal") is None
    assert thermal_change("node rank 1 (air)", "nominal", "moderate") is None
    assert thermal_change("node rank 1 (air)", "moderate", "moderate") is None
    assert thermal_change("node rank 1 (air)", "unknown", "nominal") is None
    hot = thermal_change("node rank 1 (air)", "moderate", "heavy")
    assert hot.startswith("thermal: node rank 1 (air) is heavy (was moderate): macOS is slowing it down")
    assert thermal_change("node rank 1 (air)", None, "trapping").startswith("thermal: node rank 1 (air) is trapping:")
    assert thermal_change("node rank 1 (air)", "heavy", "trapping").startswith("thermal: node rank 1 (air) is trapping (was heavy)")
    assert thermal_change("node rank 1 (air)", "heavy", "moderate") == "thermal: node rank 1 (air) is back to moderate (was heavy)"


def test_status_shows_a_level_or_a_dash():
    assert _fmt("heavy", "thermal") == "heavy"
    assert _fmt("unknown", "thermal") == "-" and _fmt(None, "thermal") == "-"
    assert thermal_level() in THERMAL_LEVELS


def test_a_mac_entering_heavy_pressure_has_its_speed_measured_afresh():
    """Thermal pressure steers the shares: the level (parsed from outputs recorded on an M1 Air)
    goes nominal -> heavy between two forward passes, and the smoothed speed is dropped for a
    fresh measurement of the throttled speed, so the next share vote sees it at once."""
    from pathlib import Path

    import torch

    from macfleet.cluster.macos import parse_thermal
    from macfleet.trainer import _Speed

    air = Path(__file__).parent / "fixtures" / "macos" / "m1air"
    cool = parse_thermal((air / "pmset_therm.txt").read_text(), (air / "notifyutil_thermal.txt").read_text())
    hot = parse_thermal((air / "pmset_therm_throttled.txt").read_text(),
                        (air / "notifyutil_thermal_throttled.txt").read_text())
    assert (cool["level"], hot["level"]) == ("nominal", "heavy")
    readings = iter([cool["level"]] * 20 + [hot["level"]] * 20)
    speed = _Speed(torch.device("cpu"), thermal=lambda: next(readings))
    smoothed_only = _Speed(torch.device("cpu"), thermal=lambda: "nominal")
    for s in (speed, smoothed_only):
        for _ in range(20):
            s._add(100.0)  # samples/s while cool
    assert speed.rate == smoothed_only.rate == 100.0
    for k in range(speed.MIN_PASSES):
        speed._add(60.0)  # macOS slowed it by 40%
        smoothed_only._add(60.0)
        if k < speed.MIN_PASSES - 1:
            assert speed.rate is None  # measuring afresh: no vote on a half-old figure
    assert speed.rate == 60.0
    assert smoothed_only.rate > 70.0  # the smoothing alone still holds most of the old speed
