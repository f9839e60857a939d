"""The recipes run end to end in --smoke mode (offline), as a user runs them: a subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_recipe(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # One thread per process: the CI machine has 2 cores shared with other tests.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "recipes" / name), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.timeout(180)
def test_resnet50_cifar10_smoke(tmp_path):
    metrics = result_of(run_recipe("resnet50_cifar10.py", "--smoke", "--output-dir", str(tmp_path)))
    assert metrics["steps"] == 3 and metrics["compression"] == "topk_fp16"
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 3


@pytest.mark.timeout(180)
def test_gpt2_finetune_smoke_lowers_loss(tmp_path):
    metrics = result_of(run_recipe("gpt2_finetune.py", "--smoke", "--output-dir", str(tmp_path)))
    assert metrics["steps"] == 12
    # Smoke mode uses byte tokens: an untrained model scores ln(256) = 5.55 nats (measured after: 3.78).
    assert math.isfinite(metrics["test_loss"]) and metrics["test_loss"] < 5.0


def test_recipe_reports_missing_data_and_exits_nonzero(tmp_path):
    proc = run_recipe("resnet50_cifar10.py", "--data-dir", str(tmp_path), "--epochs", "1")
    assert proc.returncode == 1
    assert "cifar-10-batches-py" in proc.stderr and "Traceback" not in proc.stderr
