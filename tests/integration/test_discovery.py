"""Zero-config discovery with real zeroconf, only inside our own namespaces (10.0.0.1 / 10.0.0.2).

The master advertises ``_macfleet._tcp.local.`` on its namespace's veth; a browser and a worker
with no master address, in the other namespace, find it over mDNS and join.
"""

from __future__ import annotations

import json
import subprocess
import sys

from macfleet.config import PROTOCOL_VERSION
from tests.integration.test_control_plane import PORT, Node, netns  # noqa: F401  (fixture)

BROWSE = "import json; from macfleet.cluster.discovery import browse; print(json.dumps(browse('macfleet', 20)))"


def test_worker_finds_master_by_zeroconf_across_namespaces(netns):  # noqa: F811
    master = Node(netns.prefix(0), "master", "auto")
    worker = None
    try:
        found = subprocess.run(netns.prefix(1) + [sys.executable, "-c", BROWSE], capture_output=True,
                               text=True, timeout=60)
        services = json.loads(found.stdout)
        assert len(services) == 1, found.stderr
        svc = services[0]
        assert svc["addresses"] == ["10.0.0.1"] and svc["port"] == PORT
        assert (svc["cluster"], svc["proto"], svc["kind"]) == ("macfleet", str(PROTOCOL_VERSION), "coordinator")
        # Another cluster name finds nothing.
        other = subprocess.run(netns.prefix(1) + [sys.executable, "-c", BROWSE.replace("'macfleet', 20", "'other', 1.5")],
                               capture_output=True, text=True, timeout=60)
        assert json.loads(other.stdout) == []

        worker = Node(netns.prefix(1), "worker", "auto")
        w = worker.wait_for("formed", timeout=40)
        m = master.wait_for("formed", timeout=10)
        assert w["addrs"] == ["10.0.0.1:29200", "10.0.0.2:29201"]
        assert m["addrs"][1] == "10.0.0.2:29201" and m["world_size"] == 2
    finally:
        master.kill()
        if worker is not None:
            worker.kill()
