"""The recipes compose the real conf/ (their overrides, then the command line's) and run end to
end in --smoke mode (offline), as a user runs them: a subprocess."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from macfleet.comm.launch import free_ports
from macfleet.config import NodeRole, check_keys

ROOT = Path(__file__).resolve().parents[2]


def recipe(monkeypatch, name: str):
    """The recipe module as `python recipes/<name>.py` imports it (recipes/ first on sys.path)."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    return importlib.import_module(name)


def test_resnet50_recipe_composes_the_real_conf(monkeypatch, tmp_path):
    mod = recipe(monkeypatch, "resnet50_cifar10")
    from _shared import recipe_config

    cfg = recipe_config(mod.OVERRIDES, None, [], str(tmp_path))
    assert cfg.model._target_ == "macfleet.models.resnet.resnet50"
    assert cfg.dataset._target_ == "macfleet.data.cifar10.build"
    assert (cfg.optimizer._target_, cfg.compression.name) == ("torch.optim.SGD", "topk_fp16")
    assert (cfg.scheduler.name, cfg.scheduler.warmup_steps) == ("cosine", 200)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.learning_rate) == (30, 256, 0.1)
    assert cfg.cluster.mode == "single"  # one Mac unless told
    check_keys(cfg)
    # The docstring's two-Mac line: the command line's group replaces the recipe's.
    cfg = recipe_config(mod.OVERRIDES, None, ["cluster=pro_air", "cluster.role=worker"], str(tmp_path))
    assert (cfg.cluster.mode, cfg.cluster.role, cfg.cluster.master_addr) == ("direct", NodeRole.WORKER, "10.0.0.1")
    assert cfg.model._target_ == "macfleet.models.resnet.resnet50"
    # --smoke: synthetic files in CIFAR-10's format under the run's temporary dir; the command line still wins.
    cfg = recipe_config(mod.OVERRIDES, mod.smoke, ["trainer.max_steps=2"], str(tmp_path))
    assert cfg.dataset.root == str(tmp_path) and (tmp_path / "cifar-10-batches-py" / "test_batch").is_file()
    assert (cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.trainer.output_dir) == (2, 8, f"{tmp_path}/run")
    check_keys(cfg)


def test_gpt2_recipe_composes_the_real_conf(monkeypatch, tmp_path):
    mod = recipe(monkeypatch, "gpt2_finetune")
    from _shared import recipe_config

    cfg = recipe_config(mod.OVERRIDES, None, ["dataset.path=corpus.txt"], str(tmp_path))
    assert (cfg.model._target_, cfg.model.pretrained, cfg.model.n_layer) == ("macfleet.models.gpt2.build", True, 12)
    assert (cfg.dataset.path, cfg.dataset.tokenizer, cfg.dataset.block_size) == ("corpus.txt", "gpt2", 256)
    assert (cfg.optimizer._target_, cfg.compression.name) == ("torch.optim.AdamW", "fp16")
    assert (cfg.scheduler.name, cfg.scheduler.warmup_steps, cfg.trainer.learning_rate) == ("cosine", 100, 1e-4)
    check_keys(cfg)
    cfg = recipe_config(mod.OVERRIDES, mod.smoke, [], str(tmp_path))
    assert (cfg.model.n_layer, cfg.model.pretrained, cfg.dataset.tokenizer) == (2, False, "byte")
    assert (cfg.trainer.max_steps, cfg.scheduler.warmup_steps, cfg.trainer.progress) == (12, 0, False)
    check_keys(cfg)


def run_recipe(name: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    # One thread per process: the CI machine has 2 cores shared with other tests.
    env = env or {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
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
    metrics = result_of(run_recipe("resnet50_cifar10.py", "--smoke", f"trainer.output_dir={tmp_path}"))
    assert metrics["steps"] == 3 and metrics["compression"] == "topk_fp16"
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 3


@pytest.mark.timeout(240)
def test_gpt2_finetune_smoke_as_master_and_worker(tmp_path):
    """The GPT-2 recipe's two-Mac lines (cluster=pro_air cluster.role=...) on 127.0.0.1, each
    process with its own tensor port."""
    master_port, tensor_master, tensor_worker = free_ports(3)
    # Both processes share this machine's cores: allow a busy moment, as conf/cluster/local.yaml does.
    common = ["--smoke", "cluster=pro_air", "cluster.master_addr=127.0.0.1", f"cluster.master_port={master_port}",
              "cluster.heartbeat_interval=2.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MACFLEET_TOKEN": "recipe-test"}
    script = str(ROOT / "recipes" / "gpt2_finetune.py")
    # The master's output goes to files: a pipe nobody reads while we wait on the worker fills
    # up and blocks the master mid-step.
    with open(tmp_path / "master.out", "w") as out, open(tmp_path / "master.err", "w") as err:
        master = subprocess.Popen(
            [sys.executable, script, *common, "cluster.role=master", f"cluster.tensor_port={tensor_master}",
             f"trainer.output_dir={tmp_path / 'master'}"],
            cwd=ROOT, env=env, stdout=out, stderr=err, text=True,
        )
        try:
            worker = run_recipe("gpt2_finetune.py", *common, "cluster.role=worker",
                                f"cluster.tensor_port={tensor_worker}", f"trainer.output_dir={tmp_path / 'worker'}",
                                env=env, timeout=180)
            master.wait(timeout=60)
        finally:
            if master.poll() is None:
                master.kill()
                master.wait()
    on_master = result_of(subprocess.CompletedProcess(
        master.args, master.returncode, (tmp_path / "master.out").read_text(), (tmp_path / "master.err").read_text()))
    on_worker = result_of(worker)
    assert on_master["world_size"] == on_worker["world_size"] == 2
    assert on_master["steps"] == on_worker["steps"] == 12
    # Smoke mode uses byte tokens: an untrained model scores ln(256) = 5.55 nats (measured after: 3.78).
    assert math.isfinite(on_master["test_loss"]) and on_master["test_loss"] < 5.0
    # Evaluation is sharded and all-reduced: both ranks report the same test loss.
    assert on_master["test_loss"] == pytest.approx(on_worker["test_loss"], rel=1e-6)
    assert (tmp_path / "master" / "metrics.json").exists() and not (tmp_path / "worker").exists()


def test_recipe_reports_missing_data_and_exits_nonzero(tmp_path):
    proc = run_recipe("resnet50_cifar10.py", f"dataset.root={tmp_path}", "trainer.epochs=1")
    assert proc.returncode == 1
    assert "cifar-10-batches-py" in proc.stderr and "Traceback" not in proc.stderr
