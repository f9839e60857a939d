"""`macfleet benchmark --type convergence`: the real command trains a 2-node fleet with train.py,
once per codec, for one epoch of digits. As root (CI) the nodes sit in network namespaces on a
link shaped to 100 Mbit/s, elsewhere on loopback. Asserted: the JSON rows and how their figures
derive from each run's curve, the plot and the clean-up; never the speeds themselves."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_benchmark_scaling import assert_one_clear_line, left_behind, run_benchmark

KEYS = {"type", "run", "backend", "model", "dataset", "global_batch", "epochs", "device", "link", "nodes", "target", "codec", "ran",
        "auto_reason", "reached", "time_to_target_s", "epochs_to_target", "final_accuracy", "best_accuracy",
        "train_s", "startup_s", "samples_per_s", "wire_ratio", "curve"}


def _convergence(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_benchmark("convergence", tmp_path, *args, timeout=timeout)


def test_convergence_rows_table_plot_and_cleanup(tmp_path):
    root = os.geteuid() == 0
    out, png = tmp_path / "convergence.json", tmp_path / "convergence.png"
    extra = ["--netns", "--rate", "100mbit"] if root else []
    proc = _convergence(tmp_path, "--nodes", "2", "--cores-per-node", "1", "--codecs", "none,auto", "--target", "0.3",
                        "--json", str(out), "--plot", str(png), *extra, "trainer.epochs=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    # The default peer first: the same job under real torchrun on gloo, on the same nodes.
    assert [(r["run"], r["backend"], r["codec"]) for r in rows] == [
        ("torchrun", "gloo", "none"), ("fleet", "macfleet", "none"), ("fleet", "macfleet", "auto")]
    for r in rows:
        assert set(r) == KEYS
        assert (r["type"], r["model"], r["dataset"], r["global_batch"], r["epochs"], r["nodes"], r["target"]) == \
            ("convergence", "digits_cnn", "digits", 64, 1, 2, 0.3)
        assert r["link"] == ("veth shaped to 100mbit" if root else "loopback")
        # One evaluation per epoch, timed from the fleet's forming; every figure comes from that curve.
        assert [p["epoch"] for p in r["curve"]] == [1]
        assert all(0 < p["wall_s"] and 0 <= p["accuracy"] <= 1 for p in r["curve"])
        hit = next((p for p in r["curve"] if p["accuracy"] >= 0.3), None)
        assert r["reached"] == (hit is not None)
        assert (r["time_to_target_s"], r["epochs_to_target"]) == ((hit["wall_s"], hit["epoch"]) if hit else (None, None))
        assert r["final_accuracy"] == r["curve"][-1]["accuracy"] == r["best_accuracy"]
        assert r["train_s"] == r["curve"][-1]["wall_s"] and r["startup_s"] > 0
        assert r["samples_per_s"] > 0 and 0 < r["wire_ratio"] <= 1
    peer, none, auto = rows
    assert peer["ran"] == "none" and peer["auto_reason"] is None
    assert none["ran"] == "none" and none["auto_reason"] is None and none["wire_ratio"] == 1.0
    assert auto["ran"] in ("none", "fp16", "int8", "topk_fp16")
    # Measured; a candidate that could not win may be left untried ("~ estimated, not tried").
    assert auto["auto_reason"].startswith(("compression=auto: measured exchanges ",
                                           "compression=auto: exchanges (~ estimated, not tried) "))
    assert f": {auto['ran']}" in auto["auto_reason"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for said in ("fleet-none", f"fleet-auto (ran {auto['ran']})", "time to target", "vs none", "torchrun-gloo: ",
                 "torchrun gloo"):
        assert said in proc.stdout, proc.stdout
    assert f"    {auto['auto_reason']}\n" in proc.stdout  # auto's reasoning, under its progress line
    assert not list((tmp_path / "scratch").glob("macfleet-convergence-*"))  # run dirs and logs removed
    if root:
        assert not left_behind(proc.pid), "namespaces were not removed"


@pytest.mark.parametrize("args, said", [
    (["--target", "1.5"], "--target 1.5: give a test accuracy in (0, 1], e.g. 0.95"),
    (["trainer.max_steps=3"], "the convergence benchmark sets trainer.max_steps itself; use trainer.epochs"),
    (["dataset=text"], "--type convergence measures test accuracy: use a classification dataset"),
])
def test_bad_option_is_one_clear_line(tmp_path, args, said):
    assert_one_clear_line(_convergence(tmp_path, *args, timeout=120), said)
