"""Agent mode end to end across two namespaces: `macfleet launch --role master` at 10.0.0.1,
`macfleet launch --role worker --master 10.0.0.1` at 10.0.0.2, and a job submitted as resolved
config YAML runs on both, its output and exit codes coming back to the submitter.

Until the trainer's `python -m macfleet.run` lands, the agents run this file as a stand-in job
(MACFLEET_JOB_COMMAND): it reads the config it was sent and forms a real membership through the
control plane with it (Coordinator on the master, join on the worker).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.integration.test_control_plane import netns  # noqa: F401  (fixture)

TOKEN = "agent-secret"
AGENT_PORT = 29300

JOB_YAML = textwrap.dedent("""\
    trainer:
      batch_size: 64
      max_steps: 3
    model:
      name: digits_cnn
    cluster:
      mode: agent
      nodes: 2
      heartbeat_interval: 0.5
      wait_timeout: 60
      tensor_port: 29410
      token: must-not-travel
    """)


def _stand_in_job(path: str) -> int:
    """What an agent runs in place of macfleet.run: join the run described by the config."""
    from omegaconf import OmegaConf

    from macfleet.cluster.coordinator import Coordinator
    from macfleet.cluster.facts import node_facts
    from macfleet.cluster.membership import join
    from macfleet.config import ClusterConfig, to_dataclass

    conf = OmegaConf.load(path)
    cfg = to_dataclass(ClusterConfig, conf.cluster)
    fingerprint = {"model": str(conf.model.name), "global_batch": str(conf.trainer.batch_size)}
    facts = node_facts(device="cpu")
    addr = f":{cfg.tensor_port}"
    if cfg.role.value == "master":
        coord = Coordinator(cfg, fingerprint, facts, {"run_id": "agent-run", "seed": 1}).start()
        m = coord.wait_for_nodes(addr)
    else:
        m = join(cfg, fingerprint, facts, addr)
    print(f"role={cfg.role.value} mode={cfg.mode} rank={m.rank} world={m.world_size} "
          f"addrs={','.join(m.addrs)} token_set={cfg.token == TOKEN} "
          f"config_file_holds_token={TOKEN in Path(path).read_text()}", flush=True)
    for step in range(1, conf.trainer.max_steps + 1):
        m.report(step, 50.0)
        time.sleep(0.1)
    m.log("stand-in job done")
    time.sleep(0.3)
    m.check()
    m.close()
    return 0


def _agent(prefix: list, *args: str) -> subprocess.Popen:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # PYTHONPATH: the stand-in job is this file, which imports from the tests package.
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=root,
               MACFLEET_JOB_COMMAND=f"{{python}} {os.path.abspath(__file__)} --config {{config}}")
    return subprocess.Popen(prefix + [sys.executable, "-m", "macfleet.cli", "launch", *args, "--token", TOKEN,
                                      "--master-port", str(AGENT_PORT)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _submit(prefix: list, token: str) -> subprocess.CompletedProcess:
    code = (
        "import json, sys\n"
        "from macfleet.cluster.agent import submit_job\n"
        "from macfleet.errors import MacFleetError\n"
        "lines = []\n"
        "try:\n"
        f"    r = submit_job('10.0.0.1', {AGENT_PORT}, {token!r}, sys.stdin.read(), timeout=90, on_line=lines.append)\n"
        "except MacFleetError as e:\n"
        "    r = {'error': str(e)}\n"
        "print(json.dumps({'result': r, 'lines': lines}))\n")
    return subprocess.run(prefix + [sys.executable, "-c", code], input=JOB_YAML, capture_output=True, text=True,
                          timeout=120)


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def test_agent_master_and_worker_run_a_submitted_config(netns):  # noqa: F811
    master = _agent(netns.prefix(0), "--role", "master", "--no-discovery")
    worker = _agent(netns.prefix(1), "--role", "worker", "--master", "10.0.0.1", "--no-discovery", "--weight", "1.0")
    try:
        # The worker agent keeps trying until the master agent is up and registered it.
        refused = None
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            done = _submit(netns.prefix(0), TOKEN)
            out = json.loads(done.stdout)
            if "error" in out["result"] and "only 0 worker agent" in out["result"]["error"]:
                refused = out["result"]["error"]
                time.sleep(0.5)
                continue
            break
        assert "error" not in out["result"], (out, done.stderr)
        codes = out["result"]["exit_codes"]
        assert sorted(codes.values()) == [0, 0] and len(codes) == 2
        text = "\n".join(out["lines"])
        # Both ranks ran the sent config with the agents' overrides, across the namespaces,
        # and the token reached the job from each agent's own setting, not from the wire.
        assert "role=master mode=direct rank=0 world=2" in text
        assert "role=worker mode=direct rank=1 world=2" in text
        assert "addrs=127.0.0.1:29410,10.0.0.2:29410" in text  # rank 0's own view
        assert "addrs=10.0.0.1:29410,10.0.0.2:29410" in text   # the worker's view
        assert text.count("token_set=True") == 2
        # ... in the job's environment: the config file each job runs (and rank 0 saves) has none.
        assert text.count("config_file_holds_token=False") == 2 and TOKEN not in text
        assert "stand-in job done" in text
        if refused is not None:
            assert "macfleet launch --role worker" in refused

        wrong = json.loads(_submit(netns.prefix(0), "not-the-token").stdout)
        assert "token" in wrong["result"]["error"]
    finally:
        worker_out = _stop(worker)
        master_out = _stop(master)
    assert "registered with the master agent at 10.0.0.1" in worker_out, worker_out
    assert "worker agent vm" in master_out or "registered" in master_out


if __name__ == "__main__":
    sys.exit(_stand_in_job(sys.argv[sys.argv.index("--config") + 1]))
