"""A node that leaves says so, and the others stop at once naming it, on 127.0.0.1.

- A node that leaves in the middle of a collective (a second Ctrl-C): the others stop within
  about a second with "rank N left (Ctrl-C)", either way round (node programs of
  test_control_plane.py, no torch).
- Ctrl-C on one node of a `python train.py` direct-mode pair: both stop at the step they agree
  on within seconds, and the one that saw no Ctrl-C reports no departure (its peer's bye names
  the collectives it finished, none of which this node still needs). It used to wait out the
  60 s data-plane timeout and then blame the network.
- A node that ends its run normally while the other still trains (fewer epochs, behind a
  fingerprint that hides it): the other stops as soon as it needs that node again, naming it.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from macfleet.comm.launch import free_ports, spawn_local
from tests.integration.test_cluster_training import TOKEN, TrainProc, direct_args
from tests.integration.test_control_plane import Node

PROMPT_S = 1.5
"""'Within about a second': the bye's trip plus a step on a loaded 2-core machine."""


@pytest.mark.parametrize("leaver", [1, 0])
def test_a_node_leaving_mid_collective_is_named_at_once(leaver):
    port = free_ports(1)[0]
    nodes = [Node([], "master", "127.0.0.1", port=port, interval=1.0),
             Node([], "worker", "127.0.0.1", port=port, interval=1.0)]
    try:
        for node in nodes:
            node.wait_for("formed")
        t0 = time.time()
        nodes[leaver].send("leave")
        nodes[leaver].wait_for("closed")
        lost = nodes[1 - leaver].wait_for("lost", timeout=10)
    finally:
        for node in nodes:
            node.kill()
    assert lost["rank"] == leaver and lost["msg"].startswith(f"rank {leaver} left (Ctrl-C)"), lost
    # A worker's departure leaves the master going on (elastic, the default); the master's ends the run.
    assert ("trainer.resume=auto" if leaver == 0 else "the others go on without it") in lost["msg"], lost["msg"]
    assert lost["t"] - t0 < PROMPT_S, lost["t"] - t0


# Long enough to be interrupted mid-training; a checkpoint every 10 steps says training is under way.
ENDLESS = ["trainer.epochs=1000", "trainer.max_steps=100000", "trainer.checkpoint_every=0",
           "trainer.checkpoint_every_steps=10", "scheduler=constant", "trainer.batch_size=32",
           "cluster.heartbeat_interval=1.0", "cluster.wait_timeout=60", "trainer.log_every=5"]
STOPPED = re.compile(r"interrupted at step (\d+)")


def test_ctrl_c_on_a_worker_leaves_alone_and_the_master_goes_on(tmp_path):
    """Elastic (the default) in direct mode, where each Mac has its own terminal: the worker's
    Ctrl-C makes it leave at the next step boundary, and the master goes on alone at once."""
    port = free_ports(1)[0]
    run_dir = tmp_path / "run"
    master = TrainProc(direct_args("master", port, [*ENDLESS, f"hydra.run.dir={run_dir}"]), tmp_path / "m")
    worker = TrainProc(direct_args("worker", port, ENDLESS), tmp_path / "w")
    try:
        master.wait_line(f"checkpoint {run_dir}", timeout=90)
        t_sig = time.monotonic()
        worker.signal(signal.SIGINT)
        assert worker.wait(30) == 130, worker.text()[-3000:]
        t_on = master.wait_line("generation 2: 1 node(s), rank 0", timeout=30)
        t_step = master.wait_line(re.compile(r"checkpoint .*step-\d+"), timeout=30, after=t_on)
        master.signal(signal.SIGINT)
        assert master.wait(30) == 130, master.text()[-3000:]
    finally:
        worker.kill()
        master.kill()
    left = re.search(r"rank 1 left the run at step (\d+) \(Ctrl-C\); the others go on", worker.text("err"))
    assert left, worker.text()[-3000:]
    assert "macfleet: error" not in master.text(), master.text()[-3000:]
    print(f"Ctrl-C on the worker: the master went on {t_on - t_sig:.2f} s later, its next checkpoint "
          f"{t_step - t_sig:.2f} s later")
    assert t_on - t_sig < PROMPT_S + 2.0, f"{t_on - t_sig:.2f} s"


@pytest.mark.parametrize("leaver", ["worker"])  # the master's Ctrl-C: test_stop_resume.py
def test_ctrl_c_on_one_node_stops_both_at_once_without_a_false_departure(tmp_path, leaver):
    """cluster.elastic=false: a Ctrl-C on either node stops both at the step they agree on."""
    port = free_ports(1)[0]
    run_dir = tmp_path / "run"
    fixed = [*ENDLESS, "cluster.elastic=false"]
    master = TrainProc(direct_args("master", port, [*fixed, f"hydra.run.dir={run_dir}"]), tmp_path / "m")
    worker = TrainProc(direct_args("worker", port, fixed), tmp_path / "w")
    leaving, staying = (worker, master) if leaver == "worker" else (master, worker)
    try:
        master.wait_line(f"checkpoint {run_dir}", timeout=90)
        t_sig = time.monotonic()
        leaving.signal(signal.SIGINT)
        t_end = staying.wait_line("interrupted at step", timeout=70, stream="err")
        codes = staying.wait(30), leaving.wait(30)
    finally:
        worker.kill()
        master.kill()
    assert codes == (130, 130), (codes, staying.text()[-3000:])
    steps = [STOPPED.search(proc.text("err")).group(1) for proc in (staying, leaving)]
    assert steps[0] == steps[1], steps
    assert "left (" not in staying.text() and "macfleet: error" not in staying.text(), staying.text()[-3000:]
    print(f"Ctrl-C on the {leaver}: the other stopped {t_end - t_sig:.2f} s later")
    # A master writes metrics.json, history.json and curves.png before its line (about 1 s here).
    assert t_end - t_sig < PROMPT_S + 2.0, f"{t_end - t_sig:.2f} s"


def _node(rank: int, world_size: int, addrs: list[str], port: int, out: str, epochs: list[int],
          elastic: bool) -> dict:
    import time

    from macfleet import ClusterConfig, Trainer, TrainingConfig
    from macfleet.data.digits import build as digits
    from macfleet.errors import PeerLostError
    from macfleet.models.cnn import build as cnn

    # log_every=1: with other epochs, the last step's loss report would otherwise differ too.
    tc = TrainingConfig(epochs=epochs[rank], batch_size=256, progress=False, output_dir=out, device="cpu", log_every=1)
    cc = ClusterConfig(role="master" if rank == 0 else "worker", mode="direct", nodes=2, master_addr="127.0.0.1",
                       master_port=port, tensor_port=int(addrs[rank].rsplit(":", 1)[1]), token=TOKEN,
                       heartbeat_interval=1.0, wait_timeout=60, elastic=elastic)
    # The same claimed fingerprint on both: the join check cannot see the different epochs.
    trainer = Trainer(cnn(num_classes=10, in_channels=1), digits(), tc, cc, fingerprint={"claimed": "same"})
    try:
        metrics = trainer.fit()
    except PeerLostError as exc:
        return {"error": str(exc), "rank": exc.rank, "t": time.time()}
    return {"steps": metrics["steps"], "t": time.time(), "regroups": metrics.get("regroups", 0)}


def test_a_node_that_finishes_early_leaves_the_master_going_on_alone(tmp_path):
    # digits: 1438 training items, 5 full steps of 256 per epoch. The worker leaves after epoch 1.
    master, worker = spawn_local(_node, 2, (free_ports(1)[0], str(tmp_path), [3, 1], True), timeout=60)
    assert worker["steps"] == 5, worker
    assert master.get("steps") == 15 and master["regroups"] == 1, master


def test_a_node_that_finishes_early_is_named_when_the_other_needs_it(tmp_path):
    # cluster.elastic=false: the master stops at its next exchange, naming the worker.
    master, worker = spawn_local(_node, 2, (free_ports(1)[0], str(tmp_path), [3, 1], False), timeout=60)
    assert worker["steps"] == 5, worker
    assert master.get("rank") == 1, master
    assert "rank 1 left (finished its run) at step 5" in master["error"], master["error"]
    print(f"the master stopped {master['t'] - worker['t']:.2f} s after the worker left")
    assert master["t"] - worker["t"] < PROMPT_S
