"""`macfleet benchmark --type elastic`: the real command kills a worker of a 2-node train.py fleet
once and reads the master's history, and floods the master of another with a few hundred
malformed messages per port while it trains. Asserted: the JSON rows' fields and how they
relate, the table and the clean-up; never the times against their goals, nor any speed."""

from __future__ import annotations

import json
import subprocess

from tests.integration.test_benchmark_scaling import assert_one_clear_line, run_benchmark

KEYS = {"type", "case", "nodes", "link", "heartbeat_s", "trials", "ok", "measure", "goal", "times_s", "goals_s",
        "met", "median_s", "max_s", "detect_s", "regroup_s", "step_s", "said_s", "exit_s", "bytes", "hostile",
        "errors", "skipped"}


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
    assert row["said_s"] == row["exit_s"] == row["hostile"] == []
    assert "kill" in proc.stdout and "within goal" in proc.stdout, proc.stdout
    assert not list((tmp_path / "scratch").glob("macfleet-elastic-*"))  # run dirs and logs removed
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "scratch")], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes left behind: {left}"


def test_hostile_row_every_check_held(tmp_path):
    out = tmp_path / "elastic.json"
    proc = run_benchmark("elastic", tmp_path, "--cases", "hostile", "--nodes", "2", "--trials", "1", "--fuzz", "300",
                         "--json", str(out), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())
    assert set(row) == KEYS
    assert (row["type"], row["case"], row["nodes"], row["link"], row["goal"]) == ("elastic", "hostile", 2, "loopback", None)
    assert (row["trials"], row["ok"], row["errors"], row["skipped"], row["bytes"]) == (1, 1, [], None, None)
    (trial,) = row["hostile"]
    assert trial["failed"] is None and trial["fuzz"] == 300
    for port in ("control", "heartbeat"):
        # Every message answered but the one over the size limit, which libzmq drops.
        tally = trial[port]
        assert (tally["sent"], tally["answered"], tally["dropped"], tally["unanswered"]) == (300, 299, 1, 0), tally
        assert sum(sum(kinds.values()) for kinds in tally["answers"].values()) == 299
        assert tally["send_s"] > 0
    assert all(kind.startswith("error: ") for kinds in trial["heartbeat"]["answers"].values() for kind in kinds)
    assert all(kind.startswith("error: ") for kind in trial["control"]["answers"]["hostile join"])
    # The forged byes named a live member and were rejected; nobody left; the run ended well.
    assert trial["byes_forged"] == trial["byes_rejected"] > 0
    assert trial["heartbeat"]["answers"]["forged bye"]["error: forged heartbeat rejected"] > 0
    assert (trial["departures"], trial["exit_codes"], trial["members"]) == (0, [0, 0], 2)
    assert 0 < trial["step_after"] < trial["steps"]
    # Status answered before and after the flood; the figure is the answer after it.
    assert trial["status_before_s"] > 0 and row["times_s"] == [trial["status_s"]] and trial["status_s"] > 0
    assert row["median_s"] == row["max_s"] == trial["status_s"] and row["goals_s"] == [] and row["met"] == 0
    assert 0 < trial["log_lines"] < 20 and len(row["step_s"]) == 1
    assert "hostile" in proc.stdout and "forged byes rejected" in proc.stdout, proc.stdout
    assert not list((tmp_path / "scratch").glob("macfleet-elastic-*"))
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "scratch")], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes left behind: {left}"


def test_bad_options_are_one_clear_line(tmp_path):
    assert_one_clear_line(run_benchmark("elastic", tmp_path, "--cases", "unplug"), "--cases unplug: choose from")
    assert_one_clear_line(run_benchmark("elastic", tmp_path, "--nodes", "1"), "needs at least 2")
    assert_one_clear_line(run_benchmark("elastic", tmp_path, "--cases", "hostile", "--fuzz", "3"), "--fuzz 3")
    assert_one_clear_line(run_benchmark("scaling", tmp_path, "--nodes", "2", "3"), "several fleet sizes")
