"""Shared test helpers: compose the real conf/ with Hydra, run train.py as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# spawn_local's ranks fork from one server that imported torch once, instead of each importing it
# (seconds per rank on 2 cores); subprocesses inherit it (the benchmarks' ranks).
os.environ.setdefault("MACFLEET_START_METHOD", "forkserver")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PY = sys.executable


def compose(overrides: list[str] | None = None):
    """The real config tree from conf/, with `overrides`, as train.py would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from macfleet.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def run_train(args: list[str], cwd: Path | None = None, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess; output captured."""
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("WANDB_API_KEY", None)
    if env:
        e.update(env)
    return subprocess.run([PY, str(ROOT / "train.py"), *args], cwd=str(cwd or ROOT), capture_output=True,
                          text=True, timeout=timeout, env=e)


EXACT = ["model.batchnorm=false", "model.dropout=0", "scheduler=constant", "trainer.progress=false",
         "trainer.max_steps=8", "trainer.seed=3"]
"""A deterministic model and schedule (no BatchNorm, no dropout, constant LR): an N-node step
equals one process on the global batch. Add a codec and a cluster."""
RELAXED = ["cluster.heartbeat_interval=3.0", "cluster.wait_timeout=120"]
"""Generous where liveness is not the point: two shared cores can stall a process for a second."""
ONE_PROCESS = ("compression=none", "cluster=single")
WEIGHTED = ("cluster=local", "cluster.nodes=2", "cluster.weights=[0.62,0.38]", "cluster.ddp=torch",
            "cluster.allreduce=auto")
"""2 nodes with unequal shares: local batches 40 + 24 of 64."""


@pytest.fixture(scope="session")
def exact_run(tmp_path_factory):
    """`exact_run(*overrides)`: the run dir of `train.py EXACT RELAXED overrides`, run once per
    session on first use. test_cluster_training and test_convergence both compare ONE_PROCESS with
    ("compression=none", *WEIGHTED): each such fleet is started once."""
    runs: dict[tuple, Path] = {}

    def get(*overrides: str) -> Path:
        if overrides not in runs:
            out = tmp_path_factory.mktemp("exact")
            res = run_train([*EXACT, *RELAXED, *overrides, f"hydra.run.dir={out}"])
            assert res.returncode == 0, f"train.py {' '.join(overrides)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            runs[overrides] = out
        return runs[overrides]

    return get


@pytest.fixture
def compose_cfg():
    return compose


@pytest.fixture(autouse=True)
def _one_thread():
    # Two cores are shared by test processes: keep in-process torch to one thread.
    import torch

    torch.set_num_threads(1)
    yield
