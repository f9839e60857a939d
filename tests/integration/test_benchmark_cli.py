"""`macfleet benchmark --type bandwidth|allreduce`: the real command on local ranks, its JSON rows
and their references (figures themselves are not asserted: speed is a benchmark, not a test)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest


def _bench(tmp_path, *args: str, env=None) -> tuple[list[dict], str]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "macfleet.cli", "benchmark", *args, "--repeats", "5",
                           "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.parametrize("nodes, algorithm, references, env, transport, lanes", [
    (2, "auto", {"gloo", "socket_exchange"}, {"MACFLEET_TRANSPORT": "zmq", "MACFLEET_LANES": "1"}, "zmq", 1),
    (3, "auto", {"gloo", "socket_ring"}, {"MACFLEET_TRANSPORT": "zmq", "MACFLEET_LANES": "1"}, "zmq", 1),
    (3, "ring", {"gloo", "socket_ring"}, {"MACFLEET_TRANSPORT": "tcp", "MACFLEET_LANES": "1"}, "tcp", 1),
    (2, "auto", {"gloo", "socket_exchange"}, {"MACFLEET_TRANSPORT": "zmq", "MACFLEET_LANES": "2"}, "zmq", 2),
])
def test_allreduce_rows_carry_their_references(tmp_path, nodes, algorithm, references, env, transport, lanes):
    # With data lanes, also 40 MB: an all_reduce that is cut into one part per lane.
    sizes = [256_000, 5_000_000] + ([40_000_000] if lanes > 1 else [])
    rows, stdout = _bench(tmp_path, "--type", "allreduce", "--nodes", str(nodes), "--sizes",
                          ",".join(f"{s}B" for s in sizes), "--algorithm", algorithm, env=env)
    words = " ".join(stdout.split())  # the table's title line wraps at the terminal's width
    if nodes > 2:
        assert f"engine algorithm {'direct' if algorithm == 'auto' else algorithm}" in words
    assert f"engine: {transport} transport, " + (f"{lanes} tcp data lanes" if lanes > 1 else "one lane") in words
    assert {(r["size_bytes"], r["reference"]) for r in rows} == {(s, ref) for s in sizes for ref in references}
    for r in rows:
        assert set(r) == {"type", "nodes", "size_bytes", "stripes", "transport", "lanes", "via", "macfleet_s",
                          "reference", "reference_s", "ratio", "ratio_p25", "ratio_p75", "macfleet_rounds_s",
                          "reference_rounds_s"}
        _check_rounds(r)
        assert (r["type"], r["nodes"], r["transport"], r["lanes"]) == ("allreduce", nodes, transport, lanes)
        # Which lanes carried it: 256 KB is under the data lanes' 1 MB threshold, 5 MB over it,
        # and 40 MB is cut into one part per lane.
        want = {256_000: f"{transport} group", 5_000_000: "tcp lane", 40_000_000: f"{lanes} tcp lanes"}
        assert r["via"] == (want[r["size_bytes"]] if lanes > 1 else f"{transport} group"), r
        assert r["macfleet_s"] > 0 and r["reference_s"] > 0
        assert r["ratio"] == pytest.approx(r["macfleet_s"] / r["reference_s"])
    for ref in references:
        assert ref in stdout  # the table shows every reference beside the engine's figure
    if lanes > 1:
        assert f"40 MB on {lanes} tcp lanes (cut)" in words


def _check_rounds(r: dict) -> None:
    """Each of the 5 rounds' times is there, the medians are theirs, and the spread is the
    quartiles of the ratios round by round (the engine and its reference ran back to back)."""
    mine, ref = r["macfleet_rounds_s"], r["reference_rounds_s"]
    assert len(mine) == len(ref) == 5 and min(mine + ref) > 0
    assert r["macfleet_s"] == statistics.median(mine) and r["reference_s"] == statistics.median(ref)
    q1, _, q3 = statistics.quantiles(sorted(a / b for a, b in zip(mine, ref)), n=4, method="inclusive")
    assert (r["ratio_p25"], r["ratio_p75"]) == pytest.approx((q1, q3))
    assert r["ratio_p25"] <= r["ratio_p75"]


def test_stripes_are_measured_side_by_side_on_pinned_cores(tmp_path):
    rows, stdout = _bench(tmp_path, "--type", "allreduce", "--sizes", "2MB", "--stripes", "1,2", "--cores-per-node", "1")
    assert {(r["stripes"], r["reference"]) for r in rows} == {(k, ref) for k in (1, 2) for ref in ("gloo", "socket_exchange")}
    assert "1 cores per rank" in stdout and "stripes 1,2" in stdout


def test_bandwidth_rows(tmp_path):
    """With 2 data lanes a 4-byte broadcast stays on the group and a 1 MB one goes to a lane."""
    rows, stdout = _bench(tmp_path, "--type", "bandwidth", "--sizes", "4B,1MB",
                          env={"MACFLEET_TRANSPORT": "zmq", "MACFLEET_LANES": "2"})
    assert [(r["type"], r["nodes"], r["size_bytes"], r["reference"], r["via"]) for r in rows] == [
        ("bandwidth", 2, 4, "socket", "zmq group"), ("bandwidth", 2, 10**6, "socket", "tcp lane")]
    for r in rows:
        _check_rounds(r)
    assert "rounds: the middle half of the ratios of each round" in " ".join(stdout.split())
    assert "via: 4 B on the zmq group, 1 MB on a tcp lane" in " ".join(stdout.split())


def test_bad_sizes_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "macfleet.cli", "benchmark", "--type", "allreduce", "--sizes",
                           "ten megs"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "is not a size like 1MB" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
