"""trainer.num_workers: batches and their augmentation come from DataLoader worker processes,
with the same results as the training process fetching them, and resume stays bit-exact."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from macfleet import ClusterConfig, NodeRole, Trainer, TrainingConfig

EPOCHS, STOP = 2, 7
"""100 synthetic images, global batch 20: 5 steps per epoch, so step 7 is mid-epoch 2."""


class PidLog:
    """Wraps a transform; appends the pid of the process that ran it to `path`, one line per item."""

    def __init__(self, transform, path: Path):
        self.transform, self.path = transform, str(path)

    def __call__(self, image):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return self.transform(image)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    from macfleet.data.cifar10 import write_cifar_format

    root = tmp_path_factory.mktemp("cifar")
    write_cifar_format(root, train_per_batch=20, test_size=20)
    return root


def _run(cifar_root: Path, out: Path, workers: int, pids: Path | None = None, **kw) -> torch.nn.Module:
    from macfleet.data.cifar10 import build as cifar10
    from macfleet.models.cnn import build as cnn

    data = cifar10(root=str(cifar_root), verify_checksums=False)  # augment=True: pad-crop and flip
    if pids is not None:
        data.train.transform = PidLog(data.train.transform, pids)
    torch.set_num_threads(1)  # module fixtures run before conftest's: one reduction order in every run
    torch.manual_seed(0)
    model = cnn(num_classes=10, in_channels=3, width=8)  # dropout draws from the training process's RNG
    tc = TrainingConfig(epochs=EPOCHS, batch_size=20, learning_rate=0.05, output_dir=str(out), progress=False,
                        num_workers=workers, **kw)
    trainer = Trainer(model, data, tc, ClusterConfig())
    if pids is not None:
        pids.unlink(missing_ok=True)  # the trainer read an item or two to check the data: not training
    trainer.fit()
    return model


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def _ran_in_workers(pids: Path) -> bool:
    ran_in = {int(line) for line in pids.read_text().split()}
    return bool(ran_in) and os.getpid() not in ran_in


@pytest.fixture(scope="module")
def straight(cifar_root, tmp_path_factory) -> torch.nn.Module:
    """A straight run with 2 workers; every augmented item ran in a worker process."""
    out = tmp_path_factory.mktemp("straight")
    model = _run(cifar_root, out, 2, pids=out / "pids")
    assert _ran_in_workers(out / "pids")
    return model


def test_two_workers_match_the_training_process(cifar_root, straight, tmp_path):
    _assert_same(straight, _run(cifar_root, tmp_path, 0))


def test_resume_with_workers_is_bit_exact(cifar_root, straight, tmp_path):
    _run(cifar_root, tmp_path, 2, pids=tmp_path / "pids", max_steps=STOP)
    resumed = _run(cifar_root, tmp_path, 2, pids=tmp_path / "pids", resume="auto")
    assert _ran_in_workers(tmp_path / "pids")
    _assert_same(straight, resumed)


_UNPICKLABLE = r"""
import multiprocessing, sys, torch
from macfleet import ClusterConfig, Trainer, TrainingConfig
from macfleet.data.cifar10 import build as cifar10
from macfleet.models.cnn import build as cnn
import macfleet.trainer

multiprocessing.set_start_method("spawn", force=True)  # as on macOS: each worker gets a pickled dataset
macfleet.trainer.resolve_workers = lambda setting, dataset, device: 2  # what auto gives beside a GPU
data = cifar10(root=sys.argv[1], verify_checksums=False)
inner = data.train.transform
data.train.transform = lambda image: inner(image)  # a lambda: no pickle can carry it
torch.manual_seed(0)
tc = TrainingConfig(epochs=1, max_steps=3, batch_size=20, output_dir=sys.argv[2], progress=False)
assert tc.num_workers == "auto"
metrics = Trainer(cnn(num_classes=10, in_channels=3, width=8), data, tc, ClusterConfig()).fit()
print("steps", metrics.get("steps"))
"""


def test_auto_workers_fall_back_to_this_process_for_a_dataset_no_worker_can_receive(cifar_root, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    res = subprocess.run([sys.executable, "-c", _UNPICKLABLE, str(cifar_root), str(tmp_path / "out")], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DataLoader workers need a dataset they can pickle" in res.stderr, res.stderr[-3000:]
    assert "trainer.num_workers=0" in res.stderr
    assert (tmp_path / "out").exists()


def test_a_killed_worker_stops_the_run_with_what_to_do(cifar_root, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    args = [sys.executable, str(ROOT / "train.py"), "model=digits_cnn", "dataset=cifar10", f"dataset.root={cifar_root}",
            "dataset.verify_checksums=false", "cluster=single", "trainer.num_workers=2", "trainer.max_steps=100000",
            "trainer.epochs=100000", "trainer.progress=false", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
            "trainer.checkpoint_every_steps=1"]  # a checkpoint per step: the sign that training runs
    proc = subprocess.Popen(args, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        deadline = time.monotonic() + 120
        workers: list[int] = []
        saved = tmp_path / "run" / "checkpoints"
        while (len(workers) < 2 or not any(saved.glob("step-*"))) and proc.poll() is None \
                and time.monotonic() < deadline:  # both DataLoader workers up, a step taken
            workers = [int(p) for p in children.read_text().split()]
            time.sleep(0.05)
        assert len(workers) == 2, proc.communicate(timeout=30)
        os.kill(workers[-1], signal.SIGKILL)  # as the kernel's OOM killer would
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("macfleet: error: a DataLoader worker process died at step "), last
    # torch says "is killed by signal: Killed" or "exited unexpectedly", depending on when it saw it
    assert f"{workers[-1]})" in last and "trainer.resume=auto" in last
    assert re.search(r"(is killed by signal: Killed|exited unexpectedly)\. A worker killed by SIGKILL", last), last
    assert "trainer.num_workers=0" in last


WORKER_DIES_WHILE_LOGGING = r"""
import logging, os, signal, sys, time
import torch
from torch.utils.data import DataLoader, TensorDataset
from macfleet.trainer import WorkerDied, worker_deaths_pass_through

loader = DataLoader(TensorDataset(torch.zeros(64, 2)), batch_size=2, num_workers=1)
it = iter(loader)  # starts the worker and sets PyTorch's SIGCHLD handler
next(it)
if sys.argv[1] == "wrapped":
    worker_deaths_pass_through()
worker = it._workers[0].pid

class Terminal:
    # A stream as slow as a terminal can be: the worker dies while a log line is being written.
    def write(self, text):
        os.kill(worker, signal.SIGKILL)
        time.sleep(60)  # the SIGCHLD that follows ends this wait
    def flush(self):
        pass

log = logging.getLogger("probe")
log.addHandler(logging.StreamHandler(Terminal()))
try:
    log.warning("a line")
except WorkerDied as exc:
    print("passed through:", exc)
else:
    print("swallowed")
"""


@pytest.mark.parametrize("mode", ["wrapped", "plain"])
def test_a_worker_death_is_not_swallowed_by_a_log_line(tmp_path, mode):
    """PyTorch's SIGCHLD handler raises wherever the main thread is; inside a log line logging
    used to swallow it (a "--- Logging error ---" traceback, the run failing a batch later).
    Wrapped, it passes through as WorkerDied; plain is PyTorch's own behaviour, kept here so the
    test shows it still needs the wrapper."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(WORKER_DIES_WHILE_LOGGING)
    out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    if mode == "wrapped":
        assert out.stdout.startswith("passed through: DataLoader worker (pid "), out.stdout + out.stderr
        assert "Logging error" not in out.stderr, out.stderr
    else:
        assert out.stdout.strip() == "swallowed" and "--- Logging error ---" in out.stderr, out.stdout + out.stderr
