"""`compression=auto` end to end through `python train.py`: real processes, real sockets, the
engine's own collectives for the probe and the trial exchanges. On an unshaped loopback link
auto keeps the gradient dense; on a 100 Mbit/s link (two network namespaces joined by veth,
shaped with tbf, as root) it picks a compressed codec. Both nodes decide the same (rank 0
decides and broadcasts: a node that built another codec would hang or fail the exchange), and
metrics.json says what and why."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from macfleet.comm.launch import Netns
from tests.conftest import run_train
from tests.integration.test_cluster_training import TrainProc

SHORT = ["compression=auto", "trainer.epochs=1", "trainer.max_steps=4", "trainer.progress=false",
         "trainer.checkpoint_every=0", "cluster.heartbeat_interval=3.0", "cluster.wait_timeout=120"]


def _metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _pair(ns: Netns, args: list[str], tmp_path, run) -> tuple[TrainProc, TrainProc]:
    """A master (its run folder `run`) and a worker, `cluster=pro_air`, in namespaces 1 and 2."""
    env = {"MACFLEET_TOKEN": "auto-secret"}
    nodes = [["cluster=pro_air", f"cluster.role={role}", "cluster.master_addr=10.0.0.1", *args]
             for role in ("master", "worker")]
    master = TrainProc([*nodes[0], f"hydra.run.dir={run}"], tmp_path / "pro", ["ip", "netns", "exec", ns.names[0]],
                       env)
    worker = TrainProc(nodes[1], tmp_path / "air", ["ip", "netns", "exec", ns.names[1]], env)
    return master, worker


def test_auto_keeps_dense_on_loopback(tmp_path):
    out = tmp_path / "run"
    # 128 images a node: backward outlasts dense's loopback exchange of the 0.6 MB gradient even
    # beside another test on the 2 cores (at 32, CI once measured fp16 as the one that fits).
    proc = run_train(["cluster=local", *SHORT, "trainer.batch_size=256", f"hydra.run.dir={out}"], cwd=tmp_path,
                     timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = _metrics(out)
    assert m["world_size"] == 2 and m["compression"] == "none", m
    # Dense was tried first and its measured exchange fits behind backward: nothing else is tried.
    assert re.fullmatch(r"compression=auto: measured exchanges none [0-9.]+ ms; backward [0-9.]+ ms; "
                        r"link [0-9]+ MB/s, [0-9.]+ ms: none \(fits behind backward\)", m["compression_auto_reason"]), m
    assert m["wire_ratio"] == 1.0
    # The reasoning is one log line, and the model line names the codec that runs.
    assert "compression=auto: measured exchanges none " in proc.stdout + proc.stderr
    assert "compression none | local batch 128 of 256" in proc.stdout + proc.stderr


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
@pytest.mark.skipif(shutil.which("ip") is None or shutil.which("tc") is None, reason="needs iproute2's ip and tc")
def test_auto_compresses_on_a_100mbit_link(tmp_path):
    with Netns(2, rate="100mbit", prefix="mf-auto") as ns:
        # A small batch keeps backward short (a few ms), far below dense's 48 ms at 100 Mbit/s, so
        # two busy shared cores cannot tip the decision.
        master, worker = _pair(ns, ["trainer.batch_size=8", *SHORT], tmp_path, tmp_path / "run")
        try:
            codes = [master.wait(240), worker.wait(60)]
        finally:
            for node in (worker, master):
                node.kill()
    assert codes == [0, 0], f"{master.text()[-3000:]}\n--- worker:\n{worker.text()[-3000:]}"
    m = _metrics(tmp_path / "run")
    reason = m["compression_auto_reason"]
    assert m["world_size"] == 2 and m["compression"] in ("fp16", "int8", "topk_fp16"), reason
    # Tried least lossy first until one fits behind backward: the digits CNN's exchanges are short
    # even at 100 Mbit/s, so dense is measured; a later one that could not win is skipped (~).
    assert re.match(r"compression=auto: (measured exchanges|exchanges \(~ estimated, not tried\)) none [0-9.]+ ms, "
                    r"fp16 ~?[0-9.]+ ms(, int8 ~?[0-9.]+ ms(, topk_fp16 10% ~?[0-9.]+ ms(, [0-9.]+% ~?[0-9.]+ ms)*)?)?; "
                    r"backward ", reason), reason
    link_mb_s = float(re.search(r"; link ([0-9.]+) MB/s", reason).group(1))
    assert link_mb_s < 40, reason  # the probe saw the shaped link (100 Mbit/s = 12.5 MB/s), not loopback's
    # Measured (no ~), whichever head the line has.
    dense_ms = float(re.search(r"(?:exchanges|\)) none ([0-9.]+) ms", reason).group(1))
    # Dense's 0.6 MB crossed the shaped link: 48 ms at 12.5 MB/s, but tbf's 1 MB burst (Netns) can
    # pass one exchange faster after an idle gap (10.4 ms seen once); loopback takes about 1 ms.
    assert dense_ms > 5, reason
    assert m["wire_ratio"] < 1.0  # the chosen codec really ran
    # The worker took the same decision (one line, as on rank 0).
    assert f"compression {m['compression']} | local batch 3 of 8" in worker.text()  # pro_air: 0.62 / 0.38


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
@pytest.mark.skipif(shutil.which("ip") is None or shutil.which("tc") is None, reason="needs iproute2's ip and tc")
def test_auto_decides_again_when_the_fleet_changes(tmp_path):
    """Two nodes on a 100 Mbit/s link pick a compressed codec; the worker leaves (Ctrl-C) and the
    master, alone in generation 2, decides again two steps later: one process needs no codec, so
    it moves to none, paying out top-k's residuals when it ran top-k. It trains on to its end."""
    import signal

    steps = ["compression=auto", "trainer.epochs=1000", "trainer.max_steps=400", "trainer.progress=false",
             "trainer.checkpoint_every=0", "trainer.checkpoint_every_steps=10", "trainer.batch_size=8",
             "scheduler=constant",
             "cluster.heartbeat_interval=1.0", "cluster.wait_timeout=120"]
    with Netns(2, rate="100mbit", prefix="mf-redo") as ns:
        master, worker = _pair(ns, steps, tmp_path, tmp_path / "run")
        try:
            t_picked = master.wait_line(re.compile(r"compression=auto: (measured )?exchanges"), timeout=180)
            master.wait_line(f"checkpoint {tmp_path / 'run'}", timeout=120, after=t_picked)  # training is under way
            worker.signal(signal.SIGINT)
            assert worker.wait(60) == 130, worker.text()[-3000:]
            master.wait_line("generation 2: 1 node(s), rank 0", timeout=60)
            t_again = master.wait_line("compression=auto, generation 2 (1 node(s)):", timeout=60)
            code = master.wait(240)
        finally:
            for node in (worker, master):
                node.kill()
    text = master.text()
    assert code == 0, text[-3000:]
    first = re.search(r"compression=auto: .*: (fp16|int8|topk_fp16 at [0-9.]+%) \(", text)
    assert first, text[-3000:]  # the pair compressed (see test_auto_compresses_on_a_100mbit_link)
    again = re.search(r"compression=auto, generation 2 \(1 node\(s\)\): (.*) -> (.*) at step (\d+)", text)
    assert again, text[-3000:]
    was, now = again.group(1), again.group(2)
    print(first.group(0), "|", again.group(0))
    assert was == first.group(1)
    # One process: "none". From top-k or int8 it runs as topk at 100%, so the residuals are sent, not dropped.
    assert now == ("none (as topk at 100%, paying out the residuals)" if was != "fp16" else "none")
    assert "compression=auto: one process, nothing to exchange: none" in text
    m = _metrics(tmp_path / "run")
    assert m["world_size"] == 1 and m["compression"] in ("none", "topk"), m
    assert t_again > t_picked

