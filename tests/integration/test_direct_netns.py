"""Direct mode as on two Macs, with the README's commands: `python train.py cluster=pro_air
cluster.role=master` in one network namespace at 10.0.0.1 and `cluster.role=worker` in another at
10.0.0.2 (conf/cluster/pro_air.yaml's addresses and ports, unchanged), joined by a veth link.
Needs root for the namespaces (CI runs as root).
"""

from __future__ import annotations

import json
import os

import signal
import time

import pytest

from macfleet.cluster.netns import NetnsPair
from tests.integration.test_cluster_training import TrainProc

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SHORT = ["compression=none", "trainer.epochs=1", "trainer.max_steps=6", "trainer.progress=false",
         "cluster.heartbeat_interval=3.0", "cluster.wait_timeout=120"]


def test_master_and_worker_in_two_namespaces(tmp_path):
    env = {"MACFLEET_TOKEN": "netns-secret"}  # the README's way of giving both Macs the token
    master_cwd, worker_cwd = tmp_path / "pro", tmp_path / "air"
    with NetnsPair(prefix="mf-ct") as ns:
        master = TrainProc(["cluster=pro_air", "cluster.role=master", *SHORT], master_cwd, ns.prefix(0), env)
        worker = TrainProc(["cluster=pro_air", "cluster.role=worker", *SHORT], worker_cwd, ns.prefix(1), env)
        try:
            assert master.wait(180) == 0, master.text()[-3000:]
            assert worker.wait(60) == 0, worker.text()[-3000:]
        finally:
            worker.kill()
            master.kill()
    # Rank 0 wrote its run dir (Hydra's outputs/<run id>) where it was started ...
    runs = list((master_cwd / "outputs").iterdir())
    assert len(runs) == 1, runs
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    assert (runs[0] / ".hydra" / "config.yaml").is_file()
    # ... across the link: the worker reached the master at pro_air's address and trained as rank 1.
    assert "rank 1 of 2" in worker.text() and "weights [0.62, 0.38]" in worker.text()
    # Only rank 0 writes: the worker's directory stays empty (no outputs/, .hydra/ or log).
    assert list(worker_cwd.iterdir()) == []


LONG = ["compression=none", "trainer.epochs=1000", "trainer.max_steps=100000", "trainer.progress=false",
        "trainer.checkpoint_every=0", "trainer.checkpoint_every_steps=10", "scheduler=constant",
        "trainer.batch_size=32", "cluster.heartbeat_interval=1.0", "cluster.wait_timeout=120"]


def test_a_pulled_cable_leaves_the_master_going_on_and_the_worker_rejoins(tmp_path):
    """The Thunderbolt cable is pulled mid-run (`ip link set down` on the worker's side): the
    master goes on alone within 2x the heartbeat, the worker says its master went silent, and
    once the cable is back the worker's same command joins the run in progress."""
    env = {"MACFLEET_TOKEN": "netns-secret"}
    master_cwd, worker_cwd = tmp_path / "pro", tmp_path / "air"
    worker_args = ["cluster=pro_air", "cluster.role=worker", *LONG]
    with NetnsPair(prefix="mf-cb") as ns:
        master = TrainProc(["cluster=pro_air", "cluster.role=master", *LONG, "hydra.run.dir=run"], master_cwd,
                           ns.prefix(0), env)
        worker = TrainProc(worker_args, worker_cwd / "1", ns.prefix(1), env)
        again = None
        try:
            master.wait_line("checkpoints/step-", timeout=150)
            t_pull = time.monotonic()
            ns.set_link(1, up=False)
            t_on = master.wait_line("generation 2: 1 node(s), rank 0", timeout=30)
            assert worker.wait(30) == 1, worker.text()[-3000:]
            ns.set_link(1, up=True)
            again = TrainProc(worker_args, worker_cwd / "2", ns.prefix(1), env)
            t_join = master.wait_line("generation 3: 2 node(s), rank 0", timeout=90)
            master.wait_line("checkpoints/step-", timeout=60, after=t_join)
            master.signal(signal.SIGINT)  # Ctrl-C on the master stops the fleet
            assert master.wait(30) == 130 and again.wait(30) == 130, (master.text()[-3000:], again.text()[-3000:])
        finally:
            for proc in (worker, again, master):
                if proc is not None:
                    proc.kill()
    assert "answered no heartbeat" in worker.text("err"), worker.text()[-3000:]
    assert "joined the run at epoch" in again.text(), again.text()[-3000:]
    print(f"cable pulled: the master went on {t_on - t_pull:.2f} s later")
    assert t_on - t_pull < 2 * 1.0 + 1.0, f"{t_on - t_pull:.2f} s"
