"""Agent mode end to end across two namespaces: `macfleet launch --role master` at 10.0.0.1,
`macfleet launch --role worker --master 10.0.0.1` at 10.0.0.2, and a job submitted as resolved
config YAML runs on both, its output (as "[rank N] line") and exit codes coming back to the
submitter. On loopback, with short heartbeats: agents that leave (SIGTERM, Ctrl-C, kill -9) are
dropped; a job whose worker never joins fails naming it and frees the agents; `macfleet cancel`
and Ctrl-C on `python train.py` stop a running job on every agent; a refused join (wrong token,
config, protocol version) is logged by the master agent and the training master too, never the
token.

Until the trainer's `python -m macfleet.run` lands, the agents run this file as a stand-in job
(MACFLEET_JOB_COMMAND): it reads the config it was sent and forms a real membership through the
control plane with it (Coordinator on the master, join on the worker).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zmq

from macfleet.cluster.agent import submit_job
from macfleet.comm.launch import free_ports
from macfleet.cluster.membership import join
from macfleet.cluster.protocol import request
from macfleet.config import ClusterConfig
from macfleet.errors import JoinRefusedError, MacFleetError
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
    """What an agent runs in place of macfleet.run: join the run described by the config
    (`stand_in.hang_rank: N`: rank N hangs before joining, as one whose import or network stalls)."""
    from omegaconf import OmegaConf

    from macfleet.cluster.coordinator import Coordinator
    from macfleet.cluster.facts import node_facts
    from macfleet.cluster.membership import join
    from macfleet.config import ClusterConfig, to_dataclass

    conf = OmegaConf.load(path)
    rank = os.environ.get("MACFLEET_RANK")
    if rank is not None and OmegaConf.select(conf, "stand_in.hang_rank") == int(rank):
        print(f"rank {rank} hangs before joining", flush=True)
        time.sleep(3600)
    cfg = to_dataclass(ClusterConfig, conf.cluster)
    fingerprint = {"model": str(OmegaConf.to_container(conf.model)), "global_batch": str(conf.trainer.batch_size)}
    facts = node_facts(device="cpu")
    if rank is not None:
        facts["rank"] = int(rank)  # as ClusterWorld.connect does
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
    if not OmegaConf.select(conf, "stand_in.quick"):  # quick: end the moment the job formed
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
            if "error" in out["result"] and "no master agent answered" in out["result"]["error"]:
                continue  # the master agent is still starting (it imports torch for its facts)
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
        # Lines are labelled by rank, not host.
        assert "[rank 0] role=master" in text and "[rank 1] role=worker" in text
        if refused is not None:
            assert "macfleet launch --role worker" in refused

        wrong = json.loads(_submit(netns.prefix(0), "not-the-token").stdout)
        assert "token" in wrong["result"]["error"]
    finally:
        worker_out = _stop(worker)
        master_out = _stop(master)
    assert "registered with the master agent at 10.0.0.1" in worker_out, worker_out
    assert "worker agent vm" in master_out or "registered" in master_out


# -- loopback: agents' life cycle, cancel, refusals --------------------------------------------

HB = 0.4          # agents' heartbeat interval here: one killed with -9 is dropped after 0.7 s
ROOT = Path(__file__).resolve().parents[2]


def _until(check, timeout: float, what):
    """Poll `check` until it returns something truthy; fail after `timeout` s, saying `what()`."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what()}")
        time.sleep(0.05)


class Proc:
    """A subprocess whose merged output is read on a thread, so a test can wait for a line."""

    def __init__(self, argv: list, env: dict, cwd: Path):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=str(cwd))
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 30, start: int = 0) -> str:
        """The first output line (from line `start` on) holding `needle`."""
        return _until(lambda: next((l for l in self.lines[start:] if needle in l), None), timeout,
                      lambda: f"{needle!r} in the output of {self.proc.args[3:6]}:\n{self.text[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)


class Fleet:
    """`macfleet launch` processes on 127.0.0.1 at one free port; jobs run the stand-in above,
    with TMPDIR and the working directory in `tmp`."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.port = free_ports(1, "127.0.0.1")[0]
        self.started: list[Proc] = []

    def launch(self, role: str, token: str = TOKEN) -> Proc:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), TMPDIR=str(self.tmp),
                   MACFLEET_JOB_COMMAND=f"{{python}} {os.path.abspath(__file__)} --config {{config}}")
        env.pop("MACFLEET_TOKEN", None)
        where = ["--host", "127.0.0.1"] if role == "master" else ["--master", "127.0.0.1"]
        proc = Proc([sys.executable, "-m", "macfleet.cli", "launch", "--role", role, *where, "--master-port",
                     str(self.port), "--token", token, "--no-discovery", "--heartbeat-interval", str(HB)],
                    env, self.tmp)
        self.started.append(proc)
        return proc

    def status(self) -> dict:
        ctx = zmq.Context()
        try:
            return request(ctx, "127.0.0.1", self.port, TOKEN, "macfleet", "status", {}, timeout=5)
        finally:
            ctx.term()

    def workers(self) -> dict:
        """{label: state} of the worker agents the master agent lists while no job runs."""
        answer = self.status()
        return {row["host"]: row["state"] for row in answer["nodes"] if row.get("role") == "worker"}

    def idle(self) -> None:
        """Wait until no job runs and the shared worker agent is idle."""
        _until(lambda: self.status()["job_id"] is None and self.workers().get(self.label) == "idle", 10,
               lambda: f"an idle fleet: {self.status()}")


def _label(worker: Proc) -> str:
    return worker.wait_for("registered with the master agent", 60).rsplit(" as ", 1)[1]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A master agent and a worker agent shared by the loopback tests (each starts and leaves
    them idle); every process launched is stopped at the end."""
    fleet = Fleet(tmp_path_factory.mktemp("agents"))
    fleet.master = fleet.launch("master")
    fleet.worker = fleet.launch("worker")
    try:
        fleet.label = _label(fleet.worker)
        yield fleet
    finally:
        for proc in reversed(fleet.started):
            proc.stop()


def _job_yaml(steps: int = 3, **extra) -> str:
    conf = {"trainer": {"batch_size": 64, "max_steps": steps}, "model": {"name": "digits_cnn"},
            "cluster": {"mode": "agent", "nodes": 2, "heartbeat_interval": 0.5, "wait_timeout": 20,
                        "tensor_port": 29410}}
    for key, value in extra.items():
        section, name = key.split("__")
        conf.setdefault(section, {})[name] = value
    return json.dumps(conf)  # JSON is YAML


def test_agents_that_leave_are_dropped_from_status(fleet):
    termed, interrupted, killed = fleet.launch("worker"), fleet.launch("worker"), fleet.launch("worker")
    labels = [_label(w) for w in (termed, interrupted, killed)]
    _until(lambda: fleet.workers() == dict.fromkeys([fleet.label, *labels], "idle"), 10,
           lambda: f"four idle worker agents: {fleet.workers()}")

    # SIGTERM and Ctrl-C: the agent says goodbye and is dropped at once, not at a heartbeat deadline.
    termed.proc.send_signal(signal.SIGTERM)
    interrupted.proc.send_signal(signal.SIGINT)
    assert termed.proc.wait(10) == 0 and interrupted.proc.wait(10) == 0
    _until(lambda: sorted(fleet.workers()) == sorted([fleet.label, labels[2]]), 5,
           lambda: f"the stopped agents gone from status: {fleet.workers()}")
    for label in labels[:2]:
        fleet.master.wait_for(f"worker agent {label} left (stopped with SIGTERM or Ctrl-C); dropped", 1)

    # kill -9 says nothing: dropped when its heartbeats stop (1.75 x HB).
    killed.proc.kill()
    _until(lambda: list(fleet.workers()) == [fleet.label], 1.75 * HB + 3,
           lambda: f"the killed agent gone from status: {fleet.workers()}")
    fleet.master.wait_for(f"worker agent {labels[2]} stopped sending heartbeats (killed, frozen or unplugged); "
                          f"dropped", 1)


def test_a_job_whose_worker_never_joins_fails_naming_it(fleet):
    fleet.idle()
    lines: list[str] = []
    with pytest.raises(MacFleetError) as err:
        submit_job("127.0.0.1", fleet.port, TOKEN, _job_yaml(cluster__wait_timeout=2, stand_in__hang_rank=1),
                   timeout=30, on_line=lines.append)
    message = str(err.value)
    assert (f"did not start: rank 1 (agent {fleet.label}) never joined: rank 0 stopped first (exit code 1). "
            f"See the [rank 0] and [rank 1] lines above, check that `macfleet launch --role worker` runs on "
            f"{fleet.label} and reaches 127.0.0.1:") in message, message
    assert message.endswith("(cluster.master_addr, firewall), then submit again"), message
    # Output comes back labelled by rank, never by host.
    assert "[rank 1] rank 1 hangs before joining" in lines, lines
    assert any(line.startswith("[rank 0] ") and "only 1 of cluster.nodes=2 nodes joined" in line for line in lines)
    # The hung rank was stopped, and the agents take the next job at once.
    assert fleet.status()["job_id"] is None and fleet.workers()[fleet.label] == "idle"
    fleet.master.wait_for(message, 1)


def test_a_job_that_ends_as_soon_as_it_formed_succeeds(fleet):
    """Both ranks exit 0 the moment the job formed, before the master agent's watch (a status
    poll every 0.25 s) could see it form: seen once in CI with a 6-step train.py, which was then
    reported as "rank 1 never joined: its job exited first (exit code 0)". A rank that ended its
    job with success was in it."""
    fleet.idle()
    for _ in range(3):  # each try is a fresh race with the watch
        lines: list[str] = []
        result = submit_job("127.0.0.1", fleet.port, TOKEN, _job_yaml(steps=0, stand_in__quick=1), timeout=30,
                            on_line=lines.append)  # a job that did not start raises MacFleetError here
        assert sorted(result["exit_codes"].values()) == [0, 0], (result, lines)
        assert any(line.startswith("[rank 1] role=worker") for line in lines), lines
        assert fleet.status()["job_id"] is None


def test_cancel_and_ctrl_c_stop_the_job_on_every_agent(fleet, tmp_path):
    fleet.idle()
    cancel = [sys.executable, "-m", "macfleet.cli", "cancel", "--master", "127.0.0.1", "--master-port",
              str(fleet.port), "--token", TOKEN]
    idle = subprocess.run(cancel, capture_output=True, text=True, timeout=30)
    assert idle.returncode == 0 and "no job is running" in idle.stdout, idle.stdout + idle.stderr

    # `macfleet cancel` while a job runs (the stand-in's 100000 steps would take hours).
    lines: list[str] = []
    failed: list[Exception] = []

    def submit() -> None:
        try:
            submit_job("127.0.0.1", fleet.port, TOKEN, _job_yaml(steps=100000), timeout=60, on_line=lines.append)
        except MacFleetError as exc:
            failed.append(exc)

    submitter = threading.Thread(target=submit)
    submitter.start()
    _until(lambda: any(l.startswith("[rank 1] role=worker") for l in lines), 20, lambda: f"the job running: {lines}")
    done = subprocess.run(cancel, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cancelled; stopped on" in done.stdout and f"{fleet.label} (exit -15)" in done.stdout, done.stdout
    submitter.join(10)
    assert failed and "was cancelled (`macfleet cancel`)" in str(failed[0]), (failed, lines)
    fleet.idle()

    # Ctrl-C on `python train.py` (agent mode) cancels the job it submitted.
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), MACFLEET_TOKEN=TOKEN, OMP_NUM_THREADS="1")
    mark = len(fleet.master.lines)
    train = Proc([sys.executable, str(ROOT / "train.py"), "cluster.mode=agent", "cluster.master_addr=127.0.0.1",
                  f"cluster.master_port={fleet.port}", "cluster.nodes=2", "cluster.heartbeat_interval=0.5",
                  "trainer.max_steps=100000"], env, tmp_path)
    try:
        train.wait_for("[rank 1] role=worker", 40)
        train.proc.send_signal(signal.SIGINT)
        assert train.proc.wait(20) == 1
    finally:
        train.stop()
    assert "macfleet: error: job " in train.text and "was cancelled (Ctrl-C on the submitter)" in train.text, \
        train.text[-3000:]
    fleet.master.wait_for("cancelled by Ctrl-C on its submitter", 1, start=mark)
    fleet.idle()


_MASTER_PROGRAM = """
import sys
from macfleet.cluster.coordinator import Coordinator
from macfleet.config import ClusterConfig
cfg = ClusterConfig(master_port=int(sys.argv[1]), host="127.0.0.1", nodes=2, token=sys.argv[2], wait_timeout=60)
Coordinator(cfg, {"model": "digits_cnn", "global_batch": "64"}, {"host": "pro"}, {"run_id": "r"}).start()
print("coordinator up", flush=True)
sys.stdin.read()
"""

# A node of another release: a worker joining the training master, then a worker agent's
# registration (WorkerAgent's handshake, without its torch import for facts) at the master agent.
_OTHER_VERSION = """
import sys
import zmq
import macfleet.config
macfleet.config.PROTOCOL_VERSION += 1  # before the protocol module reads it
from macfleet.cluster.membership import join
from macfleet.cluster.protocol import request
from macfleet.config import ClusterConfig
from macfleet.errors import JoinRefusedError
coord_port, agent_port, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = ClusterConfig(role="worker", master_addr="127.0.0.1", master_port=coord_port, token=token, wait_timeout=20)
for attempt in (lambda: join(cfg, {"model": "digits_cnn", "global_batch": "64"}, {}, ":1"),
                lambda: request(zmq.Context(), "127.0.0.1", agent_port, token, "macfleet", "agent",
                                {"facts": {"host": "air"}, "master_addr": "127.0.0.1"}, timeout=20)):
    try:
        attempt()
    except JoinRefusedError as exc:
        print("refused:", exc, flush=True)
"""


def test_refused_joins_are_logged_on_both_sides_never_the_token(fleet, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    env.pop("MACFLEET_TOKEN", None)
    mark = len(fleet.master.lines)
    port = free_ports(1, "127.0.0.1")[0]
    coordinator = subprocess.Popen([sys.executable, "-c", _MASTER_PROGRAM, str(port), TOKEN], env=env,
                                   cwd=str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    wrong = "wrong-" + TOKEN
    # A worker agent with the wrong token, and a node of another protocol version trying the
    # training master, then the master agent; both refused with the reason.
    bad_agent = fleet.launch("worker", token=wrong)
    other = subprocess.Popen([sys.executable, "-c", _OTHER_VERSION, str(port), str(fleet.port), TOKEN], env=env,
                             cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert coordinator.stdout.readline().strip() == "coordinator up"
        # A worker with the wrong token, and one whose config differs, at the training master.
        for token, fingerprint, says in ((wrong, {"model": "digits_cnn", "global_batch": "64"}, "join token"),
                                         (TOKEN, {"model": "resnet18", "global_batch": "64"}, "model: master")):
            cfg = ClusterConfig(role="worker", master_addr="127.0.0.1", master_port=port, token=token, wait_timeout=20)
            with pytest.raises(JoinRefusedError, match=says):
                join(cfg, fingerprint, {"host": "air"}, ":1")
        other_out, _ = other.communicate(timeout=60)
        assert other_out.count("refused: protocol version differs") == 2, other_out
        assert bad_agent.proc.wait(60) == 1
        assert "macfleet launch: error: the master could not prove it knows the join token" in bad_agent.text
    finally:
        _, coord_log = coordinator.communicate(input="", timeout=20)
        if other.poll() is None:
            other.kill()

    # The training master: one line per refused node, naming its address and the reason.
    refusals = sorted(l for l in coord_log.splitlines() if "refused" in l)
    assert len(refusals) == 3, coord_log
    assert refusals[0].startswith("macfleet: a node's join from 127.0.0.1 refused this master: the master could not "
                                  "prove it knows the join token"), refusals
    assert refusals[1].startswith("macfleet: refused a node's join from 127.0.0.1 (air): this node's config differs "
                                  "from the master's in what must match: model: master digits_cnn, this node "
                                  "resnet18"), refusals
    assert refusals[2].startswith("macfleet: refused a node's join from 127.0.0.1: protocol version differs"), refusals
    # The master agent: the same for worker agents.
    refusals = _until(lambda: (lambda r: r if len(r) == 2 else None)(
        sorted(l for l in fleet.master.lines[mark:] if "refused" in l)), 5, lambda: fleet.master.text[-3000:])
    assert refusals[0].startswith("macfleet: a worker agent from 127.0.0.1 refused this master: the master could not "
                                  "prove it knows the join token"), refusals
    assert refusals[1].startswith("macfleet: refused a worker agent from 127.0.0.1: protocol version differs"), refusals
    # Neither token in any log, nor in any file the processes wrote (their TMPDIR and cwd).
    logs = coord_log + fleet.master.text + fleet.worker.text + bad_agent.text + other_out
    assert TOKEN not in logs and wrong not in logs
    for path in [*tmp_path.rglob("*"), *fleet.tmp.rglob("*")]:
        if path.is_file():
            assert TOKEN not in path.read_text(errors="replace"), path

if __name__ == "__main__":
    sys.exit(_stand_in_job(sys.argv[sys.argv.index("--config") + 1]))
