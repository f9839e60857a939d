"""Thermal pressure rides on heartbeats into `macfleet status` and the master's log: a real
coordinator and a real worker (sockets, signed heartbeats, the `macfleet status` command). The
thermal reading is macOS's; here `macos.thermal_cached` is replaced by one the test sets, the
way a Mac's level would move (off macOS the real one says "unknown")."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time

import pytest

from macfleet.cluster import macos
from macfleet.cluster.coordinator import Coordinator
from macfleet.cluster.membership import join
from macfleet.config import ClusterConfig

TOKEN = "thermal-secret"


def _until(what, timeout: float = 20.0):
    """Wait for `what()` to be true (polling the coordinator's table); its last value."""
    deadline = time.monotonic() + timeout
    while not (got := what()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def _status(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "macfleet.cli", "status", "--master", "127.0.0.1", "--master-port",
                           str(port), "--token", TOKEN, "--timeout", "20", *args],
                          capture_output=True, text=True, timeout=90)


@pytest.fixture
def level(monkeypatch):
    now = {"level": "unknown"}
    assert macos.thermal_level() == "unknown"  # off macOS: what every row says without the stand-in
    monkeypatch.setattr(macos, "thermal_cached", lambda: {"level": now["level"], "cpu_speed_limit": None})
    return now


def test_status_rows_and_log_follow_each_nodes_thermal_level(level, caplog):
    caplog.set_level(logging.INFO, logger="macfleet")
    cfg = ClusterConfig(master_port=0, nodes=2, token=TOKEN, heartbeat_interval=0.3, wait_timeout=30)
    coord = Coordinator(cfg, {"model": "m"}, {"host": "pro", "chip": "Apple M2 Pro", "device": "mps"}, {}).start()
    got = {}
    worker_cfg = ClusterConfig(master_port=coord.port, token=TOKEN, heartbeat_interval=0.3, wait_timeout=30)
    t = threading.Thread(target=lambda: got.update(w=join(worker_cfg, {"model": "m"},
                                                          {"host": "air", "chip": "Apple M1", "device": "mps"}, ":7101")))
    t.start()
    master = coord.wait_for_nodes(":7100")
    t.join(10)
    worker = got["w"]

    def thermals():
        return [r["thermal"] for r in coord.status()]

    def said():
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("thermal:")]
    try:
        level["level"] = "nominal"
        master.report(1, 100.0)
        assert _until(lambda: thermals() == ["nominal", "nominal"]), coord.status()
        assert not said()  # nothing to say yet

        level["level"] = "heavy"
        master.report(2, 90.0)
        assert _until(lambda: thermals() == ["heavy", "heavy"]), coord.status()
        # The heartbeat server logs a change just after it updates the table: wait for the line.
        assert _until(lambda: any(s.startswith("thermal: node rank 1 (air, ") and
                                  " is heavy (was nominal): macOS is slowing" in s for s in said())), said()
        assert _until(lambda: any(s.startswith("thermal: rank 0 (pro, the master) is heavy (was nominal)")
                                  for s in said())), said()

        out = _status(coord.port, "--json")
        assert out.returncode == 0, out.stderr
        assert [(r["host"], r["thermal"]) for r in json.loads(out.stdout)["nodes"]] == [("pro", "heavy"), ("air", "heavy")]
        table = _status(coord.port)
        assert table.returncode == 0, table.stderr
        assert "thermal" in table.stdout and "heavy" in table.stdout, table.stdout

        level["level"] = "moderate"
        assert _until(lambda: thermals()[1] == "moderate"), coord.status()
        assert _until(lambda: any(s.startswith("thermal: node rank 1 (air, ") and
                                  s.endswith("is back to moderate (was heavy)") for s in said())), said()
    finally:
        worker.close()
        master.close()
