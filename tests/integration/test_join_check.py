"""The join check compares the whole setup, through real processes on 127.0.0.1.

- A Python-API `Trainer` master and `python train.py` workers with the same settings agree (they
  computed different fingerprints and refused each other), while a worker whose only
  difference is trainer.learning_rate=0.5 is refused, the difference named on both sides (it
  used to join and train a wrong model).
- A local fleet (cluster=local) listens on 127.0.0.1 only, and its normal end is no departure.

This file doubles as the Python-API master (`python test_join_check.py PORT OUTPUT_DIR`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from macfleet.comm.launch import free_ports
from tests.integration.test_cluster_training import TOKEN, TrainProc, direct_args

SHORT = ["trainer.max_steps=4", "trainer.epochs=1"]


def _api_master(port: int, out: str) -> None:
    """The settings of `train.py cluster=pro_air compression=none` + SHORT, through the Python API."""
    import torch

    from macfleet import ClusterConfig, Trainer, TrainingConfig
    from macfleet.data.digits import build as digits
    from macfleet.models.cnn import build as cnn

    torch.manual_seed(0)
    tc = TrainingConfig(epochs=1, max_steps=4, progress=False, output_dir=out)
    cc = ClusterConfig(role="master", mode="direct", nodes=2, master_addr="127.0.0.1", master_port=port,
                       tensor_port=0, token=TOKEN, wait_timeout=60)
    metrics = Trainer(cnn(num_classes=10, in_channels=1), digits(), tc, cc).fit()
    print(json.dumps({"steps": metrics["steps"], "world_size": metrics["world_size"]}), flush=True)


def test_api_master_takes_a_train_py_worker_and_names_a_differing_value(tmp_path):
    port = free_ports(1)[0]
    master = TrainProc([str(port), str(tmp_path / "run")], tmp_path / "m", script=Path(__file__))
    bad = TrainProc(direct_args("worker", port, [*SHORT, "trainer.learning_rate=0.5"]), tmp_path / "bad")
    good = TrainProc(direct_args("worker", port, SHORT), tmp_path / "good")
    try:
        assert bad.wait(120) == 1, bad.text()[-3000:]
        assert good.wait(120) == 0, good.text()[-3000:]
        assert master.wait(60) == 0, master.text()[-3000:]
    finally:
        for proc in (bad, good, master):
            proc.kill()
    # The one setting (and the optimizer built from it), and nothing else: the API node and
    # train.py agree on everything else.
    named = "trainer.learning_rate: master 0.05, this node 0.5"
    assert f"what must match: optimizer.lr: master 0.05, this node 0.5; {named}. Use the same" in bad.text("err"), \
        bad.text("err")[-3000:]
    assert "Traceback" not in bad.text()
    assert any("refused the node" in line and named in line for line in master.text().splitlines()), master.text()
    assert json.loads(master.text("out").splitlines()[-1]) == {"steps": 4, "world_size": 2}


def _listening(pid: int) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of `pid` and its children."""
    import psutil

    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
        except psutil.NoSuchProcess:
            continue
        found += [(proc.pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def test_local_fleet_listens_on_loopback_only_and_ends_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    fleet = TrainProc(["cluster=local", "compression=none", "trainer.progress=false", "trainer.epochs=1",
                       "trainer.max_steps=60", "trainer.batch_size=16", "trainer.checkpoint_every=0",
                       f"hydra.run.dir={run_dir}"], tmp_path)
    try:
        fleet.wait_line("rank 0 of 2", timeout=90)
        # Master: coordinator, heartbeats, data plane; worker: its data plane. Seen while training.
        deadline = time.monotonic() + 10
        while len(sockets := _listening(fleet.proc.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        code = fleet.wait(120)
    finally:
        fleet.kill()
    assert len({pid for pid, _, _ in sockets}) == 2 and len(sockets) >= 4, sockets
    assert all(addr == "127.0.0.1" for _, addr, _ in sockets), sockets
    assert code == 0, fleet.text()[-3000:]
    assert "left (" not in fleet.text(), fleet.text()[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["world_size"] == 2


if __name__ == "__main__":
    _api_master(int(sys.argv[1]), sys.argv[2])
