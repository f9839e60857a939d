"""`macfleet status`: every node of a running training job (coordinator) or of an agent cluster,
found by address or by zeroconf inside our own namespaces, as JSON or a rich table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from macfleet.cluster.coordinator import Coordinator
from macfleet.cluster.membership import join
from macfleet.config import ClusterConfig
from tests.integration.test_control_plane import netns  # noqa: F401  (fixture)

TOKEN = "status-secret"


def _status(prefix: list, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(prefix + [sys.executable, "-m", "macfleet.cli", "status", "--token", TOKEN,
                                    "--timeout", "20", *args], capture_output=True, text=True, timeout=90)


def test_status_of_a_training_job_lists_every_rank_with_progress():
    cfg = ClusterConfig(master_port=0, nodes=3, token=TOKEN, heartbeat_interval=0.3, wait_timeout=30)
    coord = Coordinator(cfg, {"model": "m"}, {"host": "pro", "chip": "Apple M2 Pro", "device": "mps"}, {}).start()
    import threading

    workers = {}
    threads = [threading.Thread(target=lambda h=h, r=r: workers.__setitem__(h, join(
        ClusterConfig(master_port=coord.port, token=TOKEN, heartbeat_interval=0.3, wait_timeout=30), {"model": "m"},
        {"host": h, "chip": "Apple M1", "device": "mps", "rank": r}, f":{7000 + r}"))) for h, r in (("air", 1), ("mini", 2))]
    for t in threads:
        t.start()
    master = coord.wait_for_nodes(":7000")
    for t in threads:
        t.join(10)
    try:
        master.report(40, 900.0)
        workers["air"].report(40, 350.5)
        workers["mini"].report(39, 420.0, state="evaluating")
        time.sleep(1.0)
        out = _status([], "--master", "127.0.0.1", "--master-port", str(coord.port), "--json")
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)["nodes"]
        got = [(r["rank"], r["host"], r["step"], r["samples_per_s"], r["state"]) for r in rows]
        assert got == [(0, "pro", 40, 900.0, "training"), (1, "air", 40, 350.5, "training"),
                       (2, "mini", 39, 420.0, "evaluating")]
        assert all(r["last_heartbeat_s"] < 1.0 for r in rows)
        assert [round(r["weight"], 3) for r in rows] == [0.333] * 3

        table = _status([], "--master", "127.0.0.1", "--master-port", str(coord.port))
        assert table.returncode == 0, table.stderr
        for word in ("host", "chip", "device", "weight", "state", "last heartbeat", "step", "samples/s",
                     "mini", "Apple M1", "evaluating", "350"):
            assert word in table.stdout, table.stdout
        bad = subprocess.run([sys.executable, "-m", "macfleet.cli", "status", "--master", "127.0.0.1",
                              "--master-port", str(coord.port), "--token", "wrong"], capture_output=True, text=True,
                             timeout=60)
        assert bad.returncode == 1 and "token" in bad.stderr

        # A node leaves (Ctrl-C on it): the next generation forms without it, and status says so.
        workers["mini"].close(reason="Ctrl-C")
        deadline = time.monotonic() + 10
        while coord.generation < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        after = json.loads(_status([], "--master", "127.0.0.1", "--master-port", str(coord.port), "--json").stdout)
        assert after["generation"] == 2, after
        assert [(r["rank"], r["host"], r["state"]) for r in after["nodes"]] == [
            (0, "pro", "training"), (1, "air", "training"), (None, "mini", "left")]
        assert "rank 2 left (Ctrl-C)" in after["events"][-1]["what"], after["events"]
        shown = _status([], "--master", "127.0.0.1", "--master-port", str(coord.port)).stdout
        assert "generation 2" in shown and "membership events" in shown and "rank 2 left (Ctrl-C)" in shown, shown
    finally:
        for w in workers.values():
            w.close()
        master.close()


def test_status_finds_agent_cluster_by_zeroconf(netns):  # noqa: F811
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    launch = [sys.executable, "-m", "macfleet.cli", "launch", "--token", TOKEN, "--master-port", "29500"]
    master = subprocess.Popen(netns.prefix(0) + launch + ["--role", "master", "--weight", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    # No --master: the worker agent finds the master agent by zeroconf.
    worker = subprocess.Popen(netns.prefix(1) + launch + ["--role", "worker", "--weight", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        rows = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(rows) < 2:
            out = _status(netns.prefix(1), "--json")  # no --master either
            if out.returncode == 0:
                rows = json.loads(out.stdout)["nodes"]
            time.sleep(0.5)
        assert [(r["role"], r["state"]) for r in rows] == [("master", "idle"), ("worker", "idle")], rows
        assert json.loads(out.stdout)["master"] == "10.0.0.1:29500"
        assert rows[1]["last_heartbeat_s"] < 2.0 and str(rows[1]["weight"]) == "1"
    finally:
        for p in (worker, master):
            p.terminate()
            try:
                p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
