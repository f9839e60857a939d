"""Long-lived agents (`macfleet launch`), job submission, `macfleet status` and `macfleet cancel`.

* `MasterAgent` (``macfleet launch --role master``): a ROUTER on ``master_port`` (one service
  thread owns it) where worker agents register with the token challenge and then heartbeat
  (heartbeat.py); advertised with zeroconf as kind "agent" when discovery is on. A worker agent
  that says goodbye (SIGTERM, Ctrl-C) is dropped at once, one whose heartbeats stop (kill -9,
  a pulled cable) after 1.75 x its heartbeat interval. A refused agent or request is logged here
  too (coordinator.say_refused), never the token.
* `WorkerAgent` (``macfleet launch --role worker [--master ADDR]``): finds the master (address
  or zeroconf), registers, heartbeats, and runs the jobs it is sent; reconnects when the master
  goes away.
* `submit_job(master_addr, port, token, config_yaml, timeout)`: what ``python train.py`` does
  with ``cluster.mode=agent``. The master agent picks ``cluster.nodes - 1`` idle worker agents,
  gives them ranks 1..n-1, chooses a free control port for the job, and sends each agent the
  resolved config YAML (text, never code or pickles) with its overrides (``cluster.role``,
  ``cluster.mode=direct``, ``cluster.master_addr`` / ``master_port``, the agent's ``weight``)
  and its rank (``MACFLEET_RANK`` in the job's environment). Rank 0 runs on the master machine.
  Every node runs ``job_command`` (default ``{python} -m macfleet.run --config {config}``; the
  ``MACFLEET_JOB_COMMAND`` environment variable replaces it) as a subprocess with its installed
  macfleet; stdout/stderr lines stream back to the submitter as ``[rank N] line`` and each exit
  code is reported. `submit_job` returns ``{"job_id", "exit_codes": {node: code}}`` and raises
  MacFleetError when a node failed, when the job did not start (a rank that never joined: the
  error names it and says what to check; the other ranks are stopped), or when it was cancelled.
* Cancelling: ``macfleet cancel`` (`cancel_main`) or Ctrl-C on the submitter. Every rank's
  process gets SIGTERM, then SIGKILL after `STOP_GRACE` s; the agents are free again.
* `status_main`: asks the master (coordinator or master agent; found by zeroconf without
  ``--master``) for its node table and prints it with rich, or as JSON. While a job runs, the
  master agent answers with the job coordinator's table (step, samples/s), else its agents'.

Messages on the agent socket (JSON, see protocol.py): registered, job {job_id, rank, config_yaml},
cancel {job_id}, log, exit, job_started, job_done {job_id, exit_codes, error}, cancelled.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

import zmq

from macfleet.cluster.coordinator import answer_hello, answer_node_refusal, peer_address, say_refused
from macfleet.cluster.facts import node_facts
from macfleet.cluster.heartbeat import HeartbeatClient, HeartbeatServer
from macfleet.cluster.membership import say
from macfleet.cluster.protocol import (Handshake, client_handshake, decode, encode, make_socket,
                                       request, tcp)
from macfleet.config import ClusterConfig, join_token
from macfleet.errors import FrameError, JoinRefusedError, MacFleetError

DEFAULT_JOB_COMMAND = "{python} -m macfleet.run --config {config}"


def job_command_template() -> str:
    return os.environ.get("MACFLEET_JOB_COMMAND") or DEFAULT_JOB_COMMAND


def with_overrides(config_yaml: str, overrides: dict) -> str:
    """The job's YAML with `cluster.*` keys replaced (OmegaConf round trip, no code)."""
    from omegaconf import OmegaConf

    conf = OmegaConf.create(config_yaml) if config_yaml.strip() else OmegaConf.create({})
    for key, value in overrides.items():
        OmegaConf.update(conf, key, value, force_add=True)
    return OmegaConf.to_yaml(conf)


def _job_nodes(config_yaml: str) -> int:
    from omegaconf import OmegaConf

    conf = OmegaConf.create(config_yaml)
    return int(OmegaConf.select(conf, "cluster.nodes", default=1) or 1)


STOP_GRACE = 5.0
"""Seconds a stopped job's processes get between SIGTERM and SIGKILL."""


class JobProcess:
    """One node's job subprocess; its output lines and exit code go to `emit`."""

    def __init__(self, config_yaml: str, emit: Callable[[dict], None], token: Optional[str] = None,
                 rank: Optional[int] = None):
        fd, self.path = tempfile.mkstemp(prefix="macfleet-job-", suffix=".yaml")
        with os.fdopen(fd, "w") as fh:
            fh.write(config_yaml)
        argv = shlex.split(job_command_template().format(python=shlex.quote(sys.executable),
                                                         config=shlex.quote(self.path)))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if token:
            env["MACFLEET_TOKEN"] = token  # never in the config file (the job's rank 0 saves that config)
        if rank:
            env["MACFLEET_RANK"] = str(rank)  # the rank the master agent gave this node, so "[rank N]" is true
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
        self._emit = emit
        self._thread = threading.Thread(target=self._pump, name="macfleet-job-output", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._emit({"t": "log", "line": line.rstrip()})
        code = self.proc.wait()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self._emit({"t": "exit", "code": code})

    def terminate(self) -> None:
        """SIGTERM the job's process group now and SIGKILL it after STOP_GRACE s; returns at once
        (the exit code still comes through `emit`)."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            timer = threading.Timer(STOP_GRACE, self._signal, args=(signal.SIGKILL,))
            timer.daemon = True
            timer.start()

    def _signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """terminate() and wait for the process."""
        self.terminate()
        try:
            self.proc.wait(timeout=STOP_GRACE + 2)
        except subprocess.TimeoutExpired:
            pass


class MasterAgent:
    """The agent on the master Mac; see the module docstring."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.facts = node_facts()
        self.facts["weight"] = cfg.weight
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._events: queue.Queue = queue.Queue()   # from job and watcher threads to the service thread
        self._agents: dict[str, dict] = {}           # peer_id -> agent
        self._lock = threading.Lock()
        self._job: Optional[dict] = None
        self._hb = HeartbeatServer(self._ctx, cfg.host, cfg.heartbeat_interval, self._on_agent_lost)
        self.port = cfg.master_port
        self._ready = threading.Event()
        self._error: Optional[Exception] = None

    def serve_forever(self) -> None:
        """Run until stop() or Ctrl-C."""
        self._hb.start()
        advert = None
        if self.cfg.discovery_enabled:
            from macfleet.cluster.discovery import advertise

            advert = advertise(self.cfg, port=self.port, kind="agent").__enter__()
        try:
            self._serve()
        finally:
            if advert is not None:
                advert.__exit__(None, None, None)
            self._hb.stop()
            self._ctx.term()

    def stop(self) -> None:
        self._stop.set()

    def _on_agent_lost(self, peer_id: str, message: str) -> None:
        self._events.put({"t": "agent_lost", "peer_id": peer_id})

    def _serve(self) -> None:
        sock = make_socket(self._ctx, zmq.ROUTER, self.cfg.heartbeat_interval)
        try:
            sock.bind(tcp(self.cfg.host, self.cfg.master_port))
        except zmq.ZMQError as exc:
            sock.close(0)
            raise MacFleetError(f"cannot listen on {self.cfg.host}:{self.cfg.master_port} ({exc}); is another "
                                f"master running? Stop it or pass --master-port") from None
        say(f"master agent for cluster {self.cfg.name!r} listening on {self.cfg.host}:{self.port}")
        shake = Handshake(self.cfg.token, self.cfg.name)
        next_check = 0.0
        try:
            while not self._stop.is_set():
                self._drain_events(sock)
                if time.monotonic() >= next_check:
                    self._check(sock)
                    next_check = time.monotonic() + 0.1
                if not sock.poll(50, zmq.POLLIN):
                    continue
                try:
                    # Frames, not bytes: a refusal is logged with the sender's address.
                    ident, frame = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    msg = decode(frame.bytes)
                except (zmq.Again, ValueError, FrameError):
                    continue
                self._handle(sock, shake, ident.bytes, msg, frame)
        finally:
            if self._job is not None and self._job.get("local") is not None:
                self._job["local"].stop()
            sock.close(0)

    def _send(self, sock, ident: bytes, msg_type: str, **fields) -> None:
        try:
            sock.send_multipart([ident, encode(msg_type, **fields)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _handle(self, sock, shake: Handshake, ident: bytes, msg: dict, frame: zmq.Frame) -> None:
        t = msg["t"]
        if t == "hello":
            sock.send_multipart([ident, answer_hello(shake, ident, msg, frame)])
            return
        if t == "refuse":
            sock.send_multipart([ident, answer_node_refusal(frame, msg)])
            return
        if t in ("log", "exit"):
            self._job_event(sock, msg, ident=ident)
            return
        if t == "cancel":
            # Ctrl-C on the submitter: only the connection that submitted the running job may.
            job = self._job
            if job is not None and ident == job["submitter"]:
                say(f"job {job['id']} cancelled by Ctrl-C on its submitter")
                self._cancel(sock, job, f"job {job['id']} was cancelled (Ctrl-C on the submitter)")
            return
        if t != "auth":
            return
        reason = shake.check_auth(ident, msg)
        if reason is not None:
            say_refused(frame, msg, reason)
            self._send(sock, ident, "refuse", reason=reason)
            return
        purpose = msg.get("purpose")
        if purpose == "agent":
            facts = dict(msg.get("facts", {}))
            with self._lock:
                # Labels key exit codes, so two Macs with one hostname stay apart.
                taken = {a["label"] for a in self._agents.values()} | {self.facts.get("host")}
                label, n = str(facts.get("host", "?")), 2
                while label in taken:
                    label, n = f"{facts.get('host', '?')}-{n}", n + 1
                peer_id = f"agent-{label}-{os.urandom(3).hex()}"
                self._agents[peer_id] = {"ident": ident, "facts": facts, "label": label, "state": "idle",
                                         "master_addr": msg.get("master_addr", "")}
            self._hb.expect(peer_id, f"agent {label}")
            self._send(sock, ident, "registered", hb_port=self._hb.port, peer_id=peer_id, label=label)
            say(f"worker agent {label} registered from {peer_address(frame)}")
        elif purpose == "status":
            self._send(sock, ident, "status", **self._status())
        elif purpose == "submit":
            self._submit(sock, ident, str(msg.get("config_yaml", "")))
        elif purpose == "cancel":
            job = self._job
            if job is None:
                self._send(sock, ident, "cancelled", job_id=None, exit_codes={})
                return
            say(f"job {job['id']} cancelled by `macfleet cancel` from {peer_address(frame)}")
            job["waiters"].append(ident)  # answered once every rank stopped
            self._cancel(sock, job, f"job {job['id']} was cancelled (`macfleet cancel`)")
        else:
            reason = f"unknown request {purpose!r}"
            say_refused(frame, msg, reason)
            self._send(sock, ident, "refuse", reason=reason)

    def _job_status(self, job: dict, timeout: float) -> Optional[dict]:
        """The job coordinator's status answer; None while it is not up (or gone)."""
        try:
            return request(self._ctx, job["addr"], job["port"], self.cfg.token, self.cfg.name, "status", {},
                           timeout=timeout)
        except (MacFleetError, zmq.ZMQError):
            return None

    def _status(self) -> dict:
        job = self._job
        if job is not None:
            answer = self._job_status(job, 1.0)
            if answer is not None:
                return {"nodes": answer["nodes"], "kind": "job", "job_id": job["id"]}
        hb = self._hb.snapshot()
        from macfleet.cluster.macos import thermal_level

        rows = [{"rank": None, "host": self.facts.get("host"), "chip": self.facts.get("chip"),
                 "device": self.facts.get("device"), "weight": self.cfg.weight,
                 "state": "running" if job else "idle", "last_heartbeat_s": 0.0, "step": None,
                 "samples_per_s": None, "thermal": thermal_level(), "role": "master"}]
        with self._lock:
            for pid, agent in self._agents.items():
                live = hb.get(pid, {})
                f = agent["facts"]
                rows.append({"rank": None, "host": agent["label"], "chip": f.get("chip"), "device": f.get("device"),
                             "weight": f.get("weight"), "state": agent["state"], "last_heartbeat_s": live.get("age"),
                             "step": None, "samples_per_s": None, "thermal": live.get("thermal"), "role": "worker"})
        return {"nodes": rows, "kind": "agents", "job_id": job["id"] if job else None}

    def _submit(self, sock, ident: bytes, config_yaml: str) -> None:
        if self._job is not None:
            self._send(sock, ident, "refuse", reason=(f"job {self._job['id']} is still running; wait for it to "
                                                      f"finish or stop it with `macfleet cancel`"))
            return
        try:
            nodes = _job_nodes(config_yaml)
        except Exception as exc:
            self._send(sock, ident, "refuse", reason=f"the job's config is not valid YAML ({exc})")
            return
        with self._lock:
            idle = sorted((a for a in self._agents.items() if a[1]["state"] == "idle"), key=lambda kv: kv[1]["label"])
        if len(idle) < nodes - 1:
            self._send(sock, ident, "refuse", reason=(
                f"the job wants cluster.nodes={nodes} but only {len(idle)} worker agent(s) are connected and idle; "
                f"run `macfleet launch --role worker --master <this Mac>` on {nodes - 1 - len(idle)} more Mac(s)"))
            return
        job_id = f"job-{int(time.time())}-{os.urandom(2).hex()}"
        from macfleet.comm.launch import free_ports

        port = free_ports(1, self.cfg.host if self.cfg.host not in ("", "*") else "0.0.0.0")[0]
        master_addr = self.cfg.host if self.cfg.host not in ("0.0.0.0", "", "*") else "127.0.0.1"
        # Rank 0 is this Mac; ranks 1..n-1 the chosen agents, in label order.
        ranks = {0: {"label": self.facts["host"], "host": self.facts.get("host"), "ident": None, "peer_id": None,
                     "master_addr": master_addr}}
        for rank, (pid, agent) in enumerate(idle[: nodes - 1], start=1):
            ranks[rank] = {"label": agent["label"], "host": agent["facts"].get("host"), "ident": agent["ident"],
                           "peer_id": pid, "master_addr": agent["master_addr"]}
        job = {"id": job_id, "port": port, "addr": master_addr, "submitter": ident, "ranks": ranks, "codes": {},
               "formed": nodes == 1, "joined_hosts": [], "error": None, "stop_by": None, "waiters": []}
        # The token never travels: each agent hands its own to its job process in the environment.
        common = {"cluster.mode": "direct", "cluster.master_port": port, "cluster.discovery_enabled": False,
                  "cluster.token": None}
        for rank, node in list(ranks.items())[1:]:
            self._agents[node["peer_id"]]["state"] = "running"
            overrides = dict(common, **{"cluster.role": "worker", "cluster.master_addr": node["master_addr"]})
            weight = self._agents[node["peer_id"]]["facts"].get("weight")
            if weight not in (None, ""):
                overrides["cluster.weight"] = weight
            self._send(sock, node["ident"], "job", job_id=job_id, rank=rank,
                       config_yaml=with_overrides(config_yaml, overrides))
        self._job = job
        where = [f"rank {r} ({n['label']})" for r, n in ranks.items()]
        self._send(sock, ident, "job_started", job_id=job_id, nodes=where)
        say(f"job {job_id} started on {', '.join(where)}")
        local_yaml = with_overrides(config_yaml, dict(common, **{"cluster.role": "master",
                                                                  "cluster.master_addr": master_addr,
                                                                  "cluster.host": self.cfg.host}))
        try:
            job["local"] = JobProcess(local_yaml, lambda ev: self._events.put(dict(ev, job_id=job_id, rank=0)),
                                      token=self.cfg.token)
        except OSError as exc:  # a job command that cannot start must not take the service thread down
            job["local"] = None
            self._rank_ended(sock, job, 0, -1, f"rank 0 could not start {job_command_template()!r} ({exc})")
            return
        if not job["formed"]:
            threading.Thread(target=self._watch, args=(job,), name="macfleet-job-watch", daemon=True).start()

    def _watch(self, job: dict) -> None:
        """Until the job's coordinator formed its membership: which hosts joined so far, so a job
        that cannot start names the ranks that never joined. Posts to the service thread."""
        while not self._stop.is_set() and self._job is job:
            answer = self._job_status(job, 0.5)
            if answer is not None:
                formed = int(answer.get("generation") or 0) > 0
                self._events.put({"t": "joined", "job_id": job["id"], "formed": formed,
                                  "hosts": [str(row.get("host")) for row in answer.get("nodes", [])[1:]]})
                if formed:
                    return
            self._stop.wait(0.25)

    def _drain_events(self, sock) -> None:
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return
            if ev["t"] == "agent_lost":
                self._drop_agent(sock, ev["peer_id"], "stopped sending heartbeats (killed, frozen or unplugged)")
            elif ev["t"] == "joined":
                job = self._job
                if job is not None and job["id"] == ev["job_id"]:
                    job["formed"] = job["formed"] or ev["formed"]
                    job["joined_hosts"] = ev["hosts"]
            else:
                self._job_event(sock, ev, rank=ev["rank"])

    def _check(self, sock) -> None:
        """Drop agents that said goodbye; give up on ranks that outlived a cancel's grace."""
        for pid, row in self._hb.snapshot().items():
            if row.get("state") == "left":
                self._drop_agent(sock, pid, "left (stopped with SIGTERM or Ctrl-C)")
        job = self._job
        if job is not None and job["stop_by"] is not None and time.monotonic() > job["stop_by"]:
            for rank in [r for r in job["ranks"] if r not in job["codes"]]:
                if self._job is job:
                    self._rank_ended(sock, job, rank, -1, f"did not stop within {STOP_GRACE + 5:g} s of the cancel")

    def _drop_agent(self, sock, peer_id: str, cause: str) -> None:
        with self._lock:
            agent = self._agents.pop(peer_id, None)
        self._hb.forget(peer_id)
        if agent is None:
            return
        say(f"worker agent {agent['label']} {cause}; dropped")
        job = self._job
        if job is not None:
            for rank, node in job["ranks"].items():
                if node["peer_id"] == peer_id and rank not in job["codes"]:
                    self._rank_ended(sock, job, rank, -1, f"its agent {cause}")

    def _job_event(self, sock, msg: dict, ident: Optional[bytes] = None, rank: Optional[int] = None) -> None:
        job = self._job
        if job is None or msg.get("job_id") != job["id"]:
            return
        if rank is None:
            rank = next((r for r, n in job["ranks"].items() if r and n["ident"] == ident), None)
            if rank is None:
                return
        if msg["t"] == "log":
            self._send(sock, job["submitter"], "log", line=f"[rank {rank}] {msg.get('line', '')}")
        elif msg["t"] == "exit":
            code = msg.get("code")
            self._rank_ended(sock, job, rank, code if isinstance(code, int) else -1, None)

    def _rank_ended(self, sock, job: dict, rank: int, code: int, cause: Optional[str]) -> None:
        """Record a rank's exit (`cause`: why, when it did not exit by itself); a rank gone before
        the job formed means the job cannot start: say which ranks never joined, stop the rest."""
        if rank in job["codes"]:
            return
        job["codes"][rank] = code
        if code == 0 and cause is None:
            # A rank whose job ended by itself with success was in the formed job: a job of a few
            # steps can end between two of `_watch`'s polls, before it saw the job form.
            job["formed"] = True
        node = job["ranks"][rank]
        with self._lock:
            if node["peer_id"] in self._agents:
                self._agents[node["peer_id"]]["state"] = "idle"
        if cause and job["formed"]:
            self._send(sock, job["submitter"], "log", line=f"[rank {rank}] {cause}")
        self._send(sock, job["submitter"], "exit", node=node["label"], rank=rank, code=code)
        if not job["formed"] and job["error"] is None:
            self._cancel(sock, job, self._never_joined(job, rank, code, cause))
        if len(job["codes"]) == len(job["ranks"]):
            self._end(sock, job)

    def _never_joined(self, job: dict, rank: int, code: int, cause: Optional[str]) -> str:
        """The error of a job that did not start, naming the ranks that never joined and what to do."""
        if cause is None:
            cause = (f"rank 0 stopped first (exit code {code})" if rank == 0
                     else f"its job exited first (exit code {code})")
        # Match the hosts the job's coordinator saw join against each rank's agent.
        hosts = list(job["joined_hosts"])
        if rank and job["ranks"][rank]["host"] in hosts:
            hosts.remove(job["ranks"][rank]["host"])
        missing = [rank] if rank else []
        for r, node in sorted(job["ranks"].items()):
            if r in (0, rank):
                continue
            if node["host"] in hosts:
                hosts.remove(node["host"])
            else:
                missing.append(r)
        if not missing:
            return f"job {job['id']} did not start: {cause}; see the [rank 0] lines above"
        first = job["ranks"][missing[0]]
        names = ", ".join(f"rank {r} (agent {job['ranks'][r]['label']})" for r in missing)
        look = " and ".join(f"[rank {r}]" for r in sorted({rank, missing[0]}))
        return (f"job {job['id']} did not start: {names} never joined: {cause}. See the {look} lines above, check "
                f"that `macfleet launch --role worker` runs on {first['label']} and reaches "
                f"{first['master_addr']}:{job['port']} (cluster.master_addr, firewall), then submit again")

    def _cancel(self, sock, job: dict, error: str) -> None:
        """Stop every rank still running; the job ends with `error` once they all reported."""
        if job["error"] is None:
            job["error"] = error
        if job["stop_by"] is not None:
            return
        job["stop_by"] = time.monotonic() + STOP_GRACE + 5
        for rank, node in job["ranks"].items():
            if rank in job["codes"]:
                continue
            if rank == 0:
                if job["local"] is not None:
                    job["local"].terminate()
            else:
                self._send(sock, node["ident"], "cancel", job_id=job["id"])

    def _end(self, sock, job: dict) -> None:
        codes = {job["ranks"][r]["label"]: c for r, c in sorted(job["codes"].items())}
        self._send(sock, job["submitter"], "job_done", job_id=job["id"], exit_codes=codes, error=job["error"])
        for ident in job["waiters"]:
            self._send(sock, ident, "cancelled", job_id=job["id"], exit_codes=codes)
        say(job["error"] or f"job {job['id']} finished: exit codes {codes}")
        self._job = None


class WorkerAgent:
    """The agent on a worker Mac; see the module docstring."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.facts = node_facts()
        self.facts["weight"] = cfg.weight
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _find_master(self) -> list[tuple[str, int]]:
        from macfleet.cluster.membership import uses_discovery

        if uses_discovery(self.cfg):
            from macfleet.cluster.discovery import browse

            return [(a, s["port"]) for s in browse(self.cfg.name, timeout=3.0, kind="agent") for a in s["addresses"]]
        return [(self.cfg.master_addr, self.cfg.master_port)]

    def serve_forever(self) -> None:
        """Register with the master, run its jobs; on losing it, find it again. Until stop()."""
        last_said = 0.0
        while not self._stop.is_set():
            for host, port in self._find_master():
                try:
                    self._session(host, port)
                except TimeoutError:
                    pass
                if self._stop.is_set():
                    return
            if time.monotonic() - last_said > 10:
                where = "by zeroconf" if self.cfg.master_addr in ("", "auto") else f"at {self.cfg.master_addr}:{self.cfg.master_port}"
                say(f"worker agent: no master agent {where} yet; retrying")
                last_said = time.monotonic()
            self._stop.wait(1.0)

    def _session(self, host: str, port: int) -> None:
        """One connection to one master agent, until it is lost or we stop. Stopping says goodbye
        on the heartbeat socket (HeartbeatClient.stop), so the master drops this agent at once."""
        from macfleet.cluster.protocol import route_address

        ctx = zmq.Context()
        sock = make_socket(ctx, zmq.DEALER, self.cfg.heartbeat_interval)
        hb = None
        job: Optional[JobProcess] = None
        job_id = None
        events: queue.Queue = queue.Queue()
        lost = threading.Event()
        try:
            sock.connect(tcp(host, port))
            answer = client_handshake(sock, self.cfg.token, self.cfg.name, "agent",
                                      {"facts": self.facts, "master_addr": host,
                                       "my_addr": route_address(host)}, timeout=3.0)
            if answer["t"] != "registered":
                raise JoinRefusedError(f"unexpected answer {answer['t']!r} from the master agent")
            say(f"worker agent registered with the master agent at {host}:{port} as {answer['label']}")
            hb = HeartbeatClient(ctx, host, int(answer["hb_port"]), str(answer["peer_id"]), self.cfg.heartbeat_interval,
                                 on_lost=lambda text: (say(f"worker agent: {text}"), lost.set()),
                                 on_bye=lost.set)
            hb.start()
            while not self._stop.is_set() and not lost.is_set():
                while True:
                    try:
                        ev = events.get_nowait()
                    except queue.Empty:
                        break
                    sock.send(encode(ev.pop("t"), job_id=job_id, **ev))
                    if "code" in ev:
                        job = None
                        hb.report(state="idle")
                if not sock.poll(50, zmq.POLLIN):
                    continue
                try:
                    msg = decode(sock.recv(), ("job", "cancel"))
                except FrameError:
                    continue
                if msg["t"] == "cancel":
                    if job is not None and msg.get("job_id") == job_id:
                        say(f"worker agent: job {job_id} cancelled by the master agent")
                        job.terminate()  # its exit code goes back like any other
                    continue
                if job is not None:
                    continue  # the master agent only sends one job at a time
                job_id = msg["job_id"]
                hb.report(state="running")
                config_yaml = with_overrides(str(msg["config_yaml"]), {"cluster.token": None})
                rank = msg.get("rank")
                job = JobProcess(config_yaml, events.put, token=self.cfg.token,
                                 rank=rank if isinstance(rank, int) else None)
            # Flush the last lines and the exit code if the job just ended.
            time.sleep(0.1)
        finally:
            if job is not None:
                job.stop()
            if hb is not None:
                hb.stop()
            sock.close(0)
            ctx.term()


CANCEL_WAIT = STOP_GRACE + 10
"""Seconds a Ctrl-C'd submitter waits for the job's nodes to stop."""


def submit_job(master_addr: str, port: int, token: Optional[str], config_yaml: str, timeout: float,
               name: str = "macfleet", on_line: Optional[Callable[[str], None]] = None) -> dict:
    """Run a resolved config on the agents; stream their output to on_line (default print).
    Ctrl-C cancels the job on every node, then raises MacFleetError."""
    on_line = on_line or (lambda line: print(line, flush=True))
    # The token proves itself by challenge; it never rides along inside the config text.
    config_yaml = with_overrides(config_yaml, {"cluster.token": None})
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER)
    job_id = None
    try:
        sock.connect(tcp(master_addr, port))
        try:
            try:
                started = client_handshake(sock, token, name, "submit", {"config_yaml": config_yaml},
                                           timeout=min(10.0, timeout))
            except TimeoutError:
                raise MacFleetError(f"no master agent answered at {master_addr}:{port}; start it with "
                                    f"`macfleet launch --role master` on the master Mac") from None
            job_id = started["job_id"]
            on_line(f"job {job_id} started on {', '.join(started['nodes'])}")
            return _follow(sock, job_id, timeout, on_line)
        except KeyboardInterrupt:
            # The master agent takes a cancel only from the connection that submitted the job.
            sock.send(encode("cancel"), zmq.NOBLOCK)
            if job_id is None:
                raise MacFleetError("cancelled (Ctrl-C) while submitting the job; `macfleet status` shows "
                                    "whether it started, `macfleet cancel` stops it") from None
            on_line(f"cancelling job {job_id} on every node (Ctrl-C) ...")
            _follow(sock, job_id, CANCEL_WAIT, on_line)
            raise MacFleetError(f"job {job_id} was cancelled (Ctrl-C)") from None
    finally:
        sock.close(linger=500)  # lets a cancel sent during the handshake leave
        ctx.term()


def _follow(sock, job_id: str, timeout: float, on_line: Callable[[str], None]) -> dict:
    """Print a submitted job's lines until it ends; its result, or MacFleetError."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MacFleetError(f"job {job_id} did not finish within {timeout:g} s; `macfleet status` shows "
                                f"its nodes, `macfleet cancel` stops it")
        if not sock.poll(int(min(remaining, 1.0) * 1000), zmq.POLLIN):
            continue
        msg = decode(sock.recv())
        if msg["t"] == "log":
            on_line(msg["line"])
        elif msg["t"] == "job_done":
            if msg.get("error"):
                raise MacFleetError(msg["error"])
            codes = dict(msg["exit_codes"])
            failed = {k: v for k, v in codes.items() if v != 0}
            if failed:
                raise MacFleetError(f"job {msg['job_id']} failed on {', '.join(f'{k} (exit {v})' for k, v in failed.items())}; "
                                    f"see the lines above")
            return {"job_id": msg["job_id"], "exit_codes": codes}


def _cluster_config(args, role: str) -> ClusterConfig:
    return ClusterConfig(role=role, master_addr=getattr(args, "master", None) or "auto",
                         master_port=args.master_port, tensor_port=getattr(args, "tensor_port", 50052),
                         name=getattr(args, "name", "macfleet"), token=args.token,
                         weight=getattr(args, "weight", 1.0), host=getattr(args, "host", "0.0.0.0"),
                         discovery_enabled=not getattr(args, "no_discovery", False),
                         heartbeat_interval=getattr(args, "heartbeat_interval", 1.0))


def launch_main(args) -> int:
    """`macfleet launch --role master|worker`: run an agent until Ctrl-C or SIGTERM."""
    cfg = _cluster_config(args, args.role)
    if args.role == "worker" and cfg.master_addr == "auto" and not cfg.discovery_enabled:
        raise MacFleetError("a worker agent needs --master ADDR when --no-discovery is given")
    agent = MasterAgent(cfg) if args.role == "master" else WorkerAgent(cfg)

    def leave(*_) -> None:
        # Leave cleanly (a worker stops its job and says goodbye); a second Ctrl-C stops at once.
        agent.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    try:
        agent.serve_forever()
    except KeyboardInterrupt:
        agent.stop()
    return 0


def _fmt(value, kind: str) -> str:
    if value is None or (kind == "thermal" and value == "unknown"):  # unknown: off macOS, or no reading yet
        return "-"
    if kind == "age":
        return f"{float(value):.1f} s ago"
    if kind == "float":
        return f"{float(value):.3g}" if isinstance(value, (int, float)) else str(value)
    return str(value)


def _master(args, name: str, kind: Optional[str]) -> tuple[str, int]:
    """--master/--master-port, or the first master of cluster `name` (and `kind`) zeroconf finds."""
    if args.master:
        return args.master, args.master_port
    from macfleet.cluster.discovery import browse

    found = [(a, s["port"]) for s in browse(name, timeout=args.timeout, kind=kind) for a in s["addresses"]]
    if not found:
        raise MacFleetError(f"no MacFleet {'master agent' if kind else 'master'} of cluster {name!r} answered on "
                            f"zeroconf within {args.timeout:g} s; pass --master ADDR")
    return found[0]


def _ask(args, purpose: str, kind: Optional[str] = None) -> tuple[str, dict]:
    """One authenticated request to the master; ("host:port", its answer)."""
    name = getattr(args, "name", "macfleet")
    host, port = _master(args, name, kind)
    ctx = zmq.Context()
    try:
        return f"{host}:{port}", request(ctx, host, port, join_token(args.token), name, purpose, {},
                                         timeout=args.timeout)
    finally:
        ctx.term()


def status_main(args) -> int:
    """`macfleet status`: the node table of the master at --master (or found by zeroconf)."""
    where, answer = _ask(args, "status")
    if args.json:
        print(json.dumps({"master": where, "kind": answer.get("kind"), "generation": answer.get("generation"),
                          "nodes": answer["nodes"], "events": answer.get("events", [])}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    generation = f", generation {answer['generation']}" if answer.get("generation") else ""
    table = Table(title=f"MacFleet {answer.get('kind', '')} at {where}{generation}")
    columns = [("rank", "rank", "str"), ("host", "host", "str"), ("chip", "chip", "str"), ("device", "device", "str"),
               ("weight", "weight", "float"), ("state", "state", "str"), ("last heartbeat", "last_heartbeat_s", "age"),
               ("step", "step", "str"), ("samples/s", "samples_per_s", "float"), ("thermal", "thermal", "thermal")]
    for title, _, _ in columns:
        table.add_column(title)
    for row in answer["nodes"]:
        table.add_row(*[_fmt(row.get(key), kind) for _, key, kind in columns])
    console = Console(width=140)
    console.print(table)
    events = answer.get("events") or []
    if events:
        console.print("membership events (newest last):")
        for e in events[-10:]:
            console.print(f"  {time.strftime('%H:%M:%S', time.localtime(e['time']))}  {e['what']}", markup=False)
    return 0


def cancel_main(args) -> int:
    """`macfleet cancel`: stop the job the master agent runs, on every node; returns once they stopped."""
    where, answer = _ask(args, "cancel", kind="agent")
    if answer["t"] != "cancelled":
        raise MacFleetError(f"unexpected answer {answer['t']!r} from the master agent at {where}")
    if answer.get("job_id") is None:
        print(f"no job is running on the master agent at {where}; nothing to cancel")
        return 0
    codes = ", ".join(f"{node} (exit {code})" for node, code in dict(answer.get("exit_codes", {})).items())
    print(f"job {answer['job_id']} cancelled; stopped on {codes}")
    return 0
