"""Direct mode as on two Macs, with the README's commands: `python train.py cluster=pro_air
cluster.role=master` in one network namespace at 10.0.0.1 and `cluster.role=worker` in another at
10.0.0.2 (conf/cluster/pro_air.yaml's addresses and ports, unchanged), joined by a veth link.
Needs root for the namespaces (CI runs as root).
"""

from __future__ import annotations

import json
import os

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
