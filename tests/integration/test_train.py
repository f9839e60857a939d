"""The single-process product end to end: train.py, the Python API, resume, W&B, sweeps."""

import json
import re
from pathlib import Path

import pytest
import torch

from macfleet import ClusterConfig, NodeRole, Trainer, TrainingConfig
from tests.conftest import compose, run_train


def test_default_job_learns_digits(tmp_path):
    res = run_train([f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.95
    assert metrics["world_size"] == 2 and metrics["compression"] == "topk_fp16"  # the default fleet
    assert metrics["wire_ratio"] <= 0.15
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert metrics["steps"] > 0 and metrics["samples_per_s"] > 0 and metrics["wall_s"] > 0
    assert "test_accuracy" in res.stdout and "MacFleet run" in res.stdout  # the summary table
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())  # checkpoints written


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _api_run(out: Path, epochs: int, **kw):
    from macfleet.data.digits import build as digits
    from macfleet.models.cnn import build as cnn

    torch.manual_seed(0)
    model = cnn(num_classes=10, in_channels=1)
    tc = TrainingConfig(epochs=epochs, batch_size=64, learning_rate=0.05, output_dir=str(out), progress=False, **kw)
    metrics = Trainer(model, digits(), tc, ClusterConfig()).fit()
    return model, metrics


def test_resume_is_bit_exact(tmp_path):
    straight, _ = _api_run(tmp_path / "a", epochs=4)
    # Interrupted after 2 epochs (33 of 88 steps is mid-epoch 2: also checks the data position) ...
    _api_run(tmp_path / "b", epochs=4, max_steps=33)
    resumed, m = _api_run(tmp_path / "b", epochs=4, resume="auto")
    assert m["steps"] == 88
    for a, b in zip(_params(straight), _params(resumed)):
        assert torch.equal(a, b)
    # ... and the seed's wording: 2 epochs, then resume for 2 more (constant LR, so the schedule agrees).
    straight, _ = _api_run(tmp_path / "c", epochs=4, lr_schedule="constant")
    _api_run(tmp_path / "d", epochs=2, lr_schedule="constant")
    resumed, _ = _api_run(tmp_path / "d", epochs=4, lr_schedule="constant", resume="auto")
    for a, b in zip(_params(straight), _params(resumed)):
        assert torch.equal(a, b)


def read_wandb_records(path: Path) -> list:
    """Records of a .wandb file: a 7-byte header, then LevelDB-log framing in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, out, parts = 7, 32768, [], b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(raw[pos + 4 : pos + 6], "little")
        kind = raw[pos + 6]
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        parts += data
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


@pytest.fixture(scope="module")
def wandb_sweep(tmp_path_factory) -> Path:
    """One sweep read by three tests: `-m compression=none,fp16 logger=wandb cluster=single`, one
    epoch per job, W&B without WANDB_API_KEY or WANDB_MODE (offline into each job's dir by itself)."""
    out = tmp_path_factory.mktemp("sweep")
    res = run_train(["-m", "compression=none,fp16", "logger=wandb", "cluster=single", "trainer.epochs=1",
                     "trainer.log_every=5", f"hydra.sweep.dir={out}"])
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_wandb_offline_holds_logged_metrics(wandb_sweep):
    job = wandb_sweep / "0"  # a sweep's job is a run of its own, with its own W&B run
    runs = list((job / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((job / "wandb").iterdir())
    files = [f for f in runs[0].iterdir() if f.suffix == ".wandb"]
    records = read_wandb_records(files[0])
    def items(updates) -> dict:
        return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in updates}

    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(losses) >= 4 and losses[-1] < losses[0]  # per-step metrics, and they fell
    assert any("samples_per_s" in h and "lr" in h for h in history)
    assert any(h.get("test/accuracy", 0) > 0.5 for h in history)
    config_keys = {k for r in records if r.WhichOneof("record_type") in ("run", "config")
                   for k in items(r.run.config.update if r.HasField("run") else r.config.update)}
    assert {"trainer", "model", "dataset", "compression"} <= config_keys  # the resolved config
    summary = {k: v for r in records if r.WhichOneof("record_type") == "summary" for k, v in items(r.summary.update).items()}
    assert summary.get("test_accuracy", 0) > 0.5


def test_multirun_writes_a_dir_per_job(wandb_sweep):
    jobs = sorted(p for p in wandb_sweep.iterdir() if p.is_dir() and (p / "metrics.json").is_file())
    assert [p.name for p in jobs] == ["0", "1"]
    from omegaconf import OmegaConf

    codecs = [OmegaConf.load(p / ".hydra" / "config.yaml").compression.name for p in jobs]
    assert codecs == ["none", "fp16"]
    assert all(json.loads((p / "metrics.json").read_text())["test_accuracy"] > 0.5 for p in jobs)


@pytest.mark.parametrize("args,needle", [
    (["trainer.epochz=3"], "epochz"),
    (["trainer.epochs=three"], "three"),
    (["compression=zip"], "compression/zip"),
    (["trainer.device=tpu"], "choose one of auto, cpu, cuda, mps"),
])
def test_bad_overrides_fail_before_training(tmp_path, args, needle):
    res = run_train([f"hydra.run.dir={tmp_path}", *args], timeout=60)
    assert res.returncode != 0
    assert needle in res.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_missing_cifar10_says_how_to_provide_it(tmp_path):
    res = run_train([f"hydra.run.dir={tmp_path}", "model=resnet50", "dataset=cifar10", "compression=topk_fp16",
                     "cluster=single", f"dataset.root={tmp_path}/data"], timeout=90)
    assert res.returncode == 1
    assert "cifar-10-batches-py" in res.stderr and "dataset.download=true" in res.stderr
    assert "Traceback" not in res.stderr


def test_hydras_plus_hint_for_an_unknown_key_ends_in_one_clear_line(tmp_path):
    # Hydra answers `trainer.epoch=2` with "use +trainer.epoch=2"; that must not reach TrainingConfig(**...).
    res = run_train([f"hydra.run.dir={tmp_path}", "+trainer.epoch=2"], timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == ["macfleet: error: trainer.epoch is not an option; did you mean trainer.epochs?"]
    assert not (tmp_path / "metrics.json").exists()


# Starts train.py at a wall-clock instant read from stdin once its imports are done (it says
# "ready"): "started in the same second" made exact.
_AT_INSTANT = """
import runpy, sys, time
import hydra, omegaconf  # noqa: F401 - imported before the instant, so both start alike
print("ready", flush=True)
at = float(sys.stdin.readline())
sys.argv = sys.argv[1:]
time.sleep(max(0.0, at - time.time()))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_runs_started_in_the_same_second_get_their_own_run_dirs(tmp_path):
    import math
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["cluster=single", "trainer.max_steps=2", "trainer.epochs=1", "trainer.progress=false"]
    procs = [subprocess.Popen([sys.executable, "-c", _AT_INSTANT, str(ROOT / "train.py"), *args], cwd=tmp_path,
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for _ in range(2)]
    for p in procs:  # each says "ready" (or ends, and the returncode check below says how)
        next((line for line in iter(p.stdout.readline, "") if line.strip() == "ready"), None)
    at = math.ceil(time.time() + 0.2) + 0.05  # the start of a second, both interpreters up and told
    for p in procs:
        p.stdin.write(f"{at}\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for out in outs:  # stopped by max_steps mid-epoch: the evaluation says where, not "epoch 0"
        assert re.search(r"step 2 \(2 of \d+ steps into epoch 1, stopped there\): test loss \d", out), out[-2000:]
    dirs = sorted((tmp_path / "outputs").iterdir())
    assert len(dirs) == 2, dirs
    for d in dirs:
        assert json.loads((d / "metrics.json").read_text())["run_id"] == d.name


def test_each_sweep_job_is_its_own_wandb_run(wandb_sweep):
    ids = []
    for job in ("0", "1"):
        runs = list((wandb_sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        ids.append(runs[0].name.split("-", 3)[3])  # offline-run-<time>-<id>
        assert json.loads((wandb_sweep / job / "metrics.json").read_text())["run_id"] == ids[-1]
    assert ids[0] != ids[1] and ids[0].endswith("_0") and ids[1].endswith("_1"), ids


TOKEN = "s3cret-XYZ"


def _files_holding(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.mark.parametrize("cluster,source", [
    ("cluster=local", "override"),          # a 2-node fleet: the worker must get the token to join
    ("cluster=single", "conf/local"),        # (a fleet's worker getting the token: the override case)
    ("cluster=single", "composed yaml"),    # cluster.token in conf/local/default.yaml: composed, Hydra saved it
])
def test_the_join_token_is_never_persisted(tmp_path, cluster, source):
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", cluster, "logger=wandb", "trainer.max_steps=3", "trainer.epochs=1",
            "trainer.checkpoint_every_steps=1", "trainer.progress=false"]
    env = {"WANDB_MODE": "offline"}
    if source == "override":
        args.append(f"cluster.token={TOKEN}")
    elif source == "composed yaml":  # a conf/local/default.yaml of its own, found on the search path
        (tmp_path / "extra" / "local").mkdir(parents=True)
        (tmp_path / "extra" / "local" / "default.yaml").write_text(f"# @package _global_\ncluster:\n  token: {TOKEN}\n")
        args = [*args, f"hydra.searchpath=[file://{tmp_path / 'extra'}]"]
    else:  # git-ignored conf/local/secrets.yaml under the working directory
        (tmp_path / "conf" / "local").mkdir(parents=True)
        (tmp_path / "conf" / "local" / "secrets.yaml").write_text(f"token: {TOKEN}\n")
    res = run_train(args, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if cluster == "cluster=local":
        assert metrics["world_size"] == 2  # the worker proved it knows the token
        assert "join token: required" in (run_dir / "train.log").read_text()
    assert list(run_dir.glob("checkpoints/step-*/meta.json")) and list(run_dir.glob("wandb/offline-run-*"))
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    if source == "composed yaml":  # it was composed, and scrubbed from what Hydra saved
        assert "token: <redacted>" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert _files_holding(run_dir, TOKEN) == []
    assert TOKEN not in res.stdout + res.stderr
