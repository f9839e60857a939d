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


@pytest.fixture
def compose_cfg():
    return compose


@pytest.fixture(autouse=True)
def _one_thread():
    # Two cores are shared by test processes: keep in-process torch to one thread.
    import torch

    torch.set_num_threads(1)
    yield
