"""`macfleet benchmark --type elastic`: the real command kills a worker of a 2-node train.py fleet
once and reads the master's history. Asserted: the JSON row's fields and how they relate, the
table and the clean-up; never the times against their goals."""

from __future__ import annotations

import json
import subprocess

from tests.integration.test_benchmark_scaling import assert_one_clear_line, run_benchmark

KEYS = {"type", "case", "nodes", "link", "heartbeat_s", "trials", "ok", "measure", "goal", "times_s", "goals_s",
        "met", "median_s", "max_s", "detect_s", "regroup_s", "step_s", "said_s", "exit_s", "bytes", "errors",
        "skipped"}


def test_kill_row_table_and_cleanup(tmp_path):
    out = tmp_path / "elastic.json"
    proc = run_benchmark("elastic", tmp_path, "--cases", "kill", "--nodes", "2", "--trials", "1", "--json", str(out),
                         timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())
    assert set(row) == KEYS
    assert (row["type"], row["case"], row["nodes"], row["link"], row["heartbeat_s"]) == \
        ("elastic", "kill", 2, "loopback", 1.0)
    assert (row["trials"], row["ok"], row["errors"], row["skipped"], row["bytes"]) == (1, 1, [], None, None)
    assert row["goal"] == "2x heartbeat + 2 steps"
    (took,), (goal,), (step,) = row["times_s"], row["goals_s"], row["step_s"]
    # The survivor caught the loss after the kill, and its next step came after that.
    (detect,), (regroup,) = row["detect_s"], row["regroup_s"]
    assert 0 < detect < took and 0 <= regroup < took and step > 0
    assert goal == 2 * row["heartbeat_s"] + 2 * step
    assert row["median_s"] == row["max_s"] == took and row["met"] == int(took <= goal)
    assert row["said_s"] == row["exit_s"] == []
    assert "kill" in proc.stdout and "within goal" in proc.stdout, proc.stdout
    assert not list((tmp_path / "scratch").glob("macfleet-elastic-*"))  # run dirs and logs removed
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "scratch")], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes left behind: {left}"


def test_bad_options_are_one_clear_line(tmp_path):
    assert_one_clear_line(run_benchmark("elastic", tmp_path, "--cases", "unplug"), "--cases unplug: choose from")
    assert_one_clear_line(run_benchmark("elastic", tmp_path, "--nodes", "1"), "needs at least 2")
    assert_one_clear_line(run_benchmark("scaling", tmp_path, "--nodes", "2", "3"), "several fleet sizes")
