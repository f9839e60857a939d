"""`macfleet benchmark --type ddp`: a plain DDP script under the real torchrun, per backend, beside
one process; its JSON rows (speeds are benchmark figures, never asserted) and a clear refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.test_benchmark_scaling import sigterm_mid_run


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "macfleet.cli", "benchmark", "--type", "ddp", *args],
                          capture_output=True, text=True, timeout=300)


def test_ddp_rows_beside_one_process(tmp_path):
    out = tmp_path / "ddp.json"
    proc = _cli("--backends", "macfleet,macfleet:lanes=2:allreduce=direct", "--model", "resnet18", "--batch", "2", "--steps", "1",
                "--warmup-steps", "1", "--repeats", "1", "--train-py", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    # An engine setting is one more backend of the same run; train.py runs the plain name only.
    # Rows say what the engine ran on (the default lane count follows the cores: 1 here).
    assert [(r["backend"], r["nodes"]) for r in rows] == [("none (1 process)", 1), ("macfleet (zmq)", 2),
                                                          ("macfleet:lanes=2:allreduce=direct (zmq + 2 tcp lanes)", 2),
                                                          ("train.py cluster=torchrun, macfleet", 2)]
    one, fleet, laned, train_py = rows
    assert (fleet["transport"], fleet["lanes"], laned["lanes"], one["lanes"]) == ("zmq", 1, 2, None)
    # train.py's row: the same job under torchrun on the macfleet backend, beside the plain loop
    assert train_py["vs_plain_ddp"] == pytest.approx(train_py["samples_per_s"] / fleet["samples_per_s"])
    for r in rows:
        assert r["samples_per_s"] > 0 and r["step_s"] > 0
        assert (r["model"], r["batch_per_rank"], r["device"]) == ("resnet18", 2, "cpu")
    assert one["vs_one_node"] == 1.0
    assert fleet["vs_one_node"] == pytest.approx(fleet["samples_per_s"] / one["samples_per_s"])
    assert fleet["vs_gloo"] is None  # gloo was not run: no ratio is made up
    assert "macfleet" in proc.stdout and "vs 1 node" in proc.stdout


def test_loader_refuses_bad_worker_counts():
    proc = subprocess.run([sys.executable, "-m", "macfleet.cli", "benchmark", "--type", "loader", "--workers", "two"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--workers 'two': give worker counts, e.g. 0,2,4" in proc.stderr


def test_a_bad_engine_setting_is_refused_in_one_line():
    proc = _cli("--backends", "gloo:stripes=2")
    assert proc.returncode == 1 and "engine settings go as macfleet:stripes=N" in proc.stderr


def test_nccl_on_cpu_is_refused_in_one_line():
    proc = _cli("--backends", "nccl,macfleet")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "macfleet benchmark: error: the nccl backend needs --device cuda"


def test_an_interrupted_run_reports_its_complete_rounds_and_leaves_no_rank(tmp_path):
    """SIGTERM (a `timeout` around a long benchmark) in round 2: the run in progress stops with
    its ranks, and the table and JSON hold round 1."""
    import psutil

    out = tmp_path / "ddp.json"
    args = ["--type", "ddp", "--backends", "macfleet", "--model", "resnet18", "--batch", "2", "--steps", "1",
            "--warmup-steps", "1", "--repeats", "20", "--json", str(out)]
    # Round 1 is complete; round 2's 2-rank run is up once torchrun and its 2 ranks are.
    text, ranks, _ = sigterm_mid_run(args, "round 2/20: gloo x1", lambda kids: len(kids) >= 3)
    assert "interrupted in round 2 of 20: the table has the 1 complete round(s)" in text
    assert "median of 1" in text  # the table, titled with the rounds it holds
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["repeats"], r["interrupted"]) for r in rows] == [("none (1 process)", 1, True),
                                                                               ("macfleet (zmq)", 1, True)]
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, [p.cmdline() for p in alive]  # torchrun and every rank it started are gone
