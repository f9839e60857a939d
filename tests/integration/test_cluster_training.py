"""Cluster training end to end through `python train.py` (issue #4): real processes, real
sockets, real Hydra composition of conf/.

- N nodes with unequal weights train exactly like one process on the global batch (local fleets,
  torch DDP and the flat fallback).
- BatchNorm: a 2-node run keeps the BN buffers identical on every node and converges.
- Agent mode with the real job command: `macfleet launch` agents run train.py's job.
- A worker with a wrong token or a config that differs is refused with a message naming every
  difference, on both sides; a Python-API master and `train.py` workers with the same settings
  train together (this file doubles as that master: `python test_cluster_training.py PORT DIR`).

Also the helpers the other cluster test files use: `TrainProc` (train.py as a live subprocess
whose output lines carry their arrival time) and `direct_args` (a 2-node direct-mode run).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from macfleet.comm.launch import free_ports, spawn_local
from tests.conftest import EXACT, ONE_PROCESS, PY, RELAXED, ROOT, WEIGHTED, run_train
from tests.integration.test_agents import Proc

TOKEN = "cluster-test-token"


def final_model(run_dir: Path) -> dict:
    """The "model" state of rank 0's newest checkpoint in `run_dir`."""
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    assert ckpts, f"no checkpoint in {run_dir}"
    return torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=False)["model"]


def assert_same_model(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def direct_args(role: str, port: int, extra: list[str] = (), addr: str = "127.0.0.1") -> list[str]:
    """train.py arguments of one node of a 2-node direct-mode run (conf/cluster/pro_air.yaml)."""
    return ["cluster=pro_air", f"cluster.role={role}", f"cluster.master_addr={addr}", f"cluster.master_port={port}",
            "cluster.tensor_port=0", f"cluster.token={TOKEN}", "compression=none", "trainer.progress=false",
            *extra]


class TrainProc:
    """`python train.py ARGS` (or another `script`) running in the background; every output line
    is kept with the monotonic time it arrived, so tests can wait for a line and time what
    follows it.

    With `group=True` it leads a process group of its own, as a job in a terminal does: signals
    (a Ctrl-C's SIGINT, kill) then reach it and every process it started, e.g. a local fleet."""

    def __init__(self, args: list[str], cwd: Path, prefix: list[str] = (), env: dict | None = None,
                 group: bool = False, script: Path = ROOT / "train.py"):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **(env or {}))
        env.pop("WANDB_API_KEY", None)
        cwd.mkdir(parents=True, exist_ok=True)
        self.group = group
        self.proc = subprocess.Popen([*prefix, PY, str(script), *args], cwd=str(cwd), env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=group)
        self.lines: list[tuple[float, str, str]] = []  # (arrival, "out" | "err", line)
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(s, n), daemon=True)
                         for s, n in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for t in self._readers:
            t.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            with self._cond:
                self.lines.append((time.monotonic(), name, line.rstrip("\n")))
                self._cond.notify_all()

    def wait_line(self, needle, timeout: float, stream: str | None = None, after: float = 0.0) -> float:
        """Arrival time of the first line containing `needle` (a str, or a compiled regex that
        searches the line) that arrived after `after` (waits up to `timeout` s)."""
        deadline = time.monotonic() + timeout
        found = needle.search if hasattr(needle, "search") else (lambda line: needle in line)
        with self._cond:
            while True:
                for t, name, line in self.lines:
                    if t > after and found(line) and stream in (None, name):
                        return t
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)):
                    raise AssertionError(f"no line with {needle!r} within {timeout:g} s; output:\n{self.text()[-4000:]}")
                self._cond.wait(min(left, 0.2))

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"train.py still running after {timeout:g} s; output:\n{self.text()[-4000:]}")
        for t in self._readers:
            t.join(5)
        return code

    def text(self, stream: str | None = None) -> str:
        with self._cond:
            return "\n".join(line for _, name, line in self.lines if stream in (None, name))

    def signal(self, sig: int) -> None:
        if self.group:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:  # the whole group is gone
                pass
        elif self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.group:
            self.signal(signal.SIGKILL)
        elif self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


# ------------------------------------------------------------------------------ equivalence
@pytest.fixture(scope="module")
def one_process(exact_run) -> dict:
    """The reference: one process on the global batch, same seed and steps (test_convergence
    compares with the same run)."""
    return final_model(exact_run(*ONE_PROCESS))


@pytest.mark.parametrize("nodes,fleet", [
    (2, WEIGHTED),  # PyTorch DDP, the engine's choice of algorithm; test_convergence reads this run too
    (3, ("cluster=local", "cluster.nodes=3", "cluster.weights=[0.5,0.3,0.2]", "cluster.ddp=flat",
         "cluster.allreduce=ring")),
], ids=["2-torch-auto", "3-flat-ring"])
def test_weighted_fleet_equals_one_process(exact_run, one_process, nodes, fleet):
    run_dir = exact_run("compression=none", *fleet)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == nodes and metrics["steps"] == 8
    assert_same_model(final_model(run_dir), one_process)


def test_train_py_under_torchrun_equals_one_process(tmp_path, one_process):
    """`cluster=torchrun`: the same train.py as ranks of the real torchrun, on gloo, with
    weighted shares; one run id, one run dir written by rank 0 only."""
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / "train.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([*torchrun, *EXACT, "compression=none", "cluster=torchrun", "cluster.weights=[0.62,0.38]",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 8
    assert_same_model(final_model(tmp_path / "run"), one_process)
    ids = set(re.findall(r"\| run (\S+)", res.stdout + res.stderr))
    assert len(ids) == 1 and metrics["run_id"] in ids, ids  # both ranks logged the one run id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # rank 1 made no dir of its own


# ------------------------------------------------------------------------------ BatchNorm
def _bn_rank(rank: int, world_size: int, addrs: list[str], port: int, out: str) -> dict:
    from macfleet import ClusterConfig, Trainer, TrainingConfig
    from macfleet.data.digits import build as digits
    from macfleet.models.cnn import build as cnn

    torch.manual_seed(0)
    model = cnn(num_classes=10, in_channels=1)  # the default digits_cnn: BatchNorm and dropout on
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    tc = TrainingConfig(epochs=4, batch_size=64, learning_rate=0.1, lr_schedule="cosine", progress=False,
                        output_dir=out, device="cpu")
    cc = ClusterConfig(role="master" if rank == 0 else "worker", mode="direct", nodes=2, master_addr="127.0.0.1",
                       master_port=port, tensor_port=int(addrs[rank].rsplit(":", 1)[1]), weights=[0.62, 0.38],
                       token=TOKEN, heartbeat_interval=3.0, wait_timeout=120, ddp="torch")
    metrics = Trainer(model, digits(), tc, cc).fit()
    return {"buffers": {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k},
            "metrics": metrics}


def test_batchnorm_buffers_agree_across_nodes_and_converge(tmp_path):
    ranks = spawn_local(_bn_rank, 2, (free_ports(1)[0], str(tmp_path)), timeout=200)
    b0, b1 = ranks[0]["buffers"], ranks[1]["buffers"]
    assert b0 and b0.keys() == b1.keys()
    for key in b0:
        assert torch.equal(b0[key], b1[key]), f"BatchNorm buffer {key} differs between rank 0 and rank 1"
    # What rank 0 checkpointed is what every node holds.
    saved = final_model(tmp_path)
    for key in b0:
        assert torch.equal(saved[key], b0[key]), key
    # Evaluation is split across the nodes: both report the same global accuracy.
    acc = [r["metrics"]["test_accuracy"] for r in ranks]
    assert acc[0] == acc[1] and acc[0] >= 0.93, acc
    assert ranks[0]["metrics"]["world_size"] == 2


# ------------------------------------------------------------------------------ agent mode
def _agent(role: str, port: int, cwd: Path, *extra: str) -> Proc:
    cwd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MACFLEET_JOB_COMMAND", None)  # the real job: python -m macfleet.run
    return Proc([PY, "-m", "macfleet.cli", "launch", "--role", role, "--token", TOKEN, "--master-port", str(port),
                 "--no-discovery", *extra], env, cwd)


def _stop(proc: Proc) -> str:
    proc.stop()
    return proc.text


def test_agent_mode_runs_the_real_job_on_both_agents(tmp_path):
    port = free_ports(1)[0]
    master = _agent("master", port, tmp_path / "master-agent")
    worker = _agent("worker", port, tmp_path / "worker-agent", "--master", "127.0.0.1", "--weight", "1.0")
    run_dir = tmp_path / "run"
    (tmp_path / "submitter").mkdir()
    args = direct_args("master", port, ["trainer.max_steps=6", "trainer.epochs=1", *RELAXED,
                                        f"hydra.run.dir={run_dir}"])
    try:
        # Submitted once the worker agent says it registered: each retry below is a train.py start.
        worker.wait_for("registered with the master agent at 127.0.0.1", timeout=90)
        deadline = time.monotonic() + 90
        while True:
            res = run_train(args, cwd=tmp_path / "submitter", timeout=240)
            if res.returncode == 0 or "worker agent(s) are connected" not in res.stderr or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    finally:
        worker_out = _stop(worker)
        master_out = _stop(master)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:] + master_out[-2000:] + worker_out[-2000:]
    out = res.stdout + res.stderr
    assert "submitting the job to the agents" in out
    # Lines of both ranks came back to the submitter: rank 0 on the master agent, rank 1 on the worker's.
    assert "rank 0 of 2" in out and "rank 1 of 2" in out, out[-4000:]
    # Rank 0 wrote into the submitter's run dir (next to its .hydra), not into the agent's cwd.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert not (tmp_path / "master-agent" / "outputs").exists()
    assert not any((tmp_path / "worker-agent").iterdir())
    assert "registered with the master agent at 127.0.0.1" in worker_out


# ------------------------------------------------------------------------------ refusals
def _api_master(port: int, out: str) -> None:
    """`train.py cluster=pro_air compression=none trainer.max_steps=4 trainer.epochs=1`, through
    the Python API."""
    from macfleet import ClusterConfig, Trainer, TrainingConfig
    from macfleet.data.digits import build as digits
    from macfleet.models.cnn import build as cnn

    torch.manual_seed(0)
    tc = TrainingConfig(epochs=1, max_steps=4, progress=False, output_dir=out)
    cc = ClusterConfig(role="master", mode="direct", nodes=2, master_addr="127.0.0.1", master_port=port,
                       tensor_port=0, token=TOKEN, wait_timeout=120)
    metrics = Trainer(cnn(num_classes=10, in_channels=1), digits(), tc, cc).fit()
    print(json.dumps({"steps": metrics["steps"], "world_size": metrics["world_size"]}), flush=True)


def test_wrong_token_and_differing_config_are_refused(tmp_path):
    port = free_ports(1)[0]
    short = ["trainer.max_steps=4", "trainer.epochs=1"]
    # A Python-API master: train.py workers with the same settings must be able to join it.
    master = TrainProc([str(port), str(tmp_path / "run")], tmp_path / "m", script=Path(__file__))
    try:
        master.wait_line("waiting for nodes: 1 of 2 joined", timeout=90, stream="err")
        # Two bad workers, not three: one with a wrong token, one whose codec and learning rate
        # both differ (every difference must be named, so one node checks both).
        bad = {
            "token": ["cluster.token=not-the-token"],
            "config": ["compression=fp16", "trainer.learning_rate=0.5"],
        }
        procs = {name: TrainProc([*direct_args("worker", port, short), *extra], tmp_path / name)
                 for name, extra in bad.items()}
        codes = {name: p.wait(120) for name, p in procs.items()}
        for name, p in procs.items():
            err = p.text("err")
            assert codes[name] != 0, (name, p.text())
            assert "Traceback" not in err, (name, err)
            assert "macfleet: error:" in err, (name, err)
        assert "use the same cluster.token on every node" in procs["token"].text("err")
        # Every key that differs is named with both values, and nothing else: the API master and
        # train.py agree on everything else.
        want = {"compression.name: master none, this node fp16", "optimizer.lr: master 0.05, this node 0.5",
                "trainer.learning_rate: master 0.05, this node 0.5"}
        err = procs["config"].text("err")
        named = re.search(r"what must match: (.*?)\. Use the same", err)
        assert named and set(named.group(1).split("; ")) == want, err
        # The master says so too (it used to take that worker and train a wrong model).
        assert any("refused a node's join from 127.0.0.1" in line and all(w in line for w in want)
                   for line in master.text().splitlines()), master.text()
        # The refusals did not disturb the master: a matching worker still joins and the run finishes.
        good = TrainProc(direct_args("worker", port, short), tmp_path / "good")
        assert good.wait(180) == 0, good.text()[-3000:]
        assert master.wait(180) == 0, master.text()[-3000:]
    finally:
        master.kill()
    assert json.loads(master.text("out").splitlines()[-1]) == {"steps": 4, "world_size": 2}


if __name__ == "__main__":
    import sys

    _api_master(int(sys.argv[1]), sys.argv[2])
