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
