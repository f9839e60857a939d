"""Long-lived agents (`macfleet launch`), job submission, and `macfleet status`.

* `MasterAgent` (``macfleet launch --role master``): a ROUTER on ``master_port`` (one service
  thread owns it) where worker agents register with the token challenge and then heartbeat
  (heartbeat.py); advertised with zeroconf as kind "agent" when discovery is on.
* `WorkerAgent` (``macfleet launch --role worker [--master ADDR]``): finds the master (address
  or zeroconf), registers, heartbeats, and runs the jobs it is sent; reconnects when the master
  goes away.
* `submit_job(master_addr, port, token, config_yaml, timeout)`: what ``python train.py`` does
  with ``cluster.mode=agent``. The master agent picks ``cluster.nodes - 1`` idle worker agents,
  chooses a free control port for the job, and sends each agent the resolved config YAML
  (text, never code or pickles) with its overrides (``cluster.role``, ``cluster.mode=direct``,
  ``cluster.master_addr`` / ``master_port``, the agent's ``weight``). Rank 0 runs on the
  master machine. Every node runs ``job_command`` (default ``{python} -m macfleet.run --config
  {config}``; the ``MACFLEET_JOB_COMMAND`` environment variable replaces it) as a subprocess
  with its installed macfleet; stdout/stderr lines stream back as ``[host] line`` and each exit
  code is reported. `submit_job` returns ``{"job_id", "exit_codes": {node: code}}`` and raises
  MacFleetError when a node failed.
* `status_main`: asks the master (coordinator or master agent; found by zeroconf without
  ``--master``) for its node table and prints it with rich, or as JSON. While a job runs, the
  master agent answers with the job coordinator's table (step, samples/s), else its agents'.

Messages on the agent socket (JSON, see protocol.py): registered, job, log, exit,
job_started, job_done.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

import zmq

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


class JobProcess:
    """One node's job subprocess; its output lines and exit code go to `emit`."""

    def __init__(self, config_yaml: str, emit: Callable[[dict], None], label: str, token: Optional[str] = None):
        fd, self.path = tempfile.mkstemp(prefix="macfleet-job-", suffix=".yaml")
        with os.fdopen(fd, "w") as fh:
            fh.write(config_yaml)
        argv = shlex.split(job_command_template().format(python=shlex.quote(sys.executable),
                                                         config=shlex.quote(self.path)))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if token:
            env["MACFLEET_TOKEN"] = token  # never in the config file (the job's rank 0 saves that config)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
        self._emit = emit
        self._label = label
        self._thread = threading.Thread(target=self._pump, name="macfleet-job-output", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._emit({"t": "log", "line": f"[{self._label}] {line.rstrip()}"})
        code = self.proc.wait()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self._emit({"t": "exit", "code": code})

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host not in ("", "*") else "0.0.0.0", 0))
        return s.getsockname()[1]


class MasterAgent:
    """The agent on the master Mac; see the module docstring."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.facts = node_facts()
        self.facts["weight"] = cfg.weight
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._events: queue.Queue = queue.Queue()   # from job threads to the service thread
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
        self._events.put(({"t": "agent_lost", "peer_id": peer_id, "message": message}, None))

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
        try:
            while not self._stop.is_set():
                self._drain_events(sock)
                if not sock.poll(50, zmq.POLLIN):
                    continue
                try:
                    ident, frame = sock.recv_multipart(zmq.NOBLOCK)
                    msg = decode(frame)
                except (zmq.Again, ValueError, FrameError):
                    continue
                self._handle(sock, shake, ident, msg)
        finally:
            if self._job is not None and self._job.get("local") is not None:
                self._job["local"].stop()
            sock.close(0)

    def _send(self, sock, ident: bytes, msg_type: str, **fields) -> None:
        try:
            sock.send_multipart([ident, encode(msg_type, **fields)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _handle(self, sock, shake: Handshake, ident: bytes, msg: dict) -> None:
        t = msg["t"]
        if t == "hello":
            sock.send_multipart([ident, shake.on_hello(ident, msg)])
            return
        if t in ("log", "exit"):
            self._job_event(sock, msg, ident)
            return
        if t != "auth":
            return
        reason = shake.check_auth(ident, msg)
        if reason is not None:
            self._send(sock, ident, "refuse", reason=reason)
            return
        purpose = msg.get("purpose")
        if purpose == "agent":
            facts = dict(msg.get("facts", {}))
            with self._lock:
                # Labels key exit codes and logs, so two Macs with one hostname stay apart.
                taken = {a["label"] for a in self._agents.values()} | {self.facts.get("host")}
                label, n = str(facts.get("host", "?")), 2
                while label in taken:
                    label, n = f"{facts.get('host', '?')}-{n}", n + 1
                peer_id = f"agent-{label}-{os.urandom(3).hex()}"
                self._agents[peer_id] = {"ident": ident, "facts": facts, "label": label, "state": "idle",
                                         "master_addr": msg.get("master_addr", "")}
            self._hb.expect(peer_id, f"agent {label}")
            self._send(sock, ident, "registered", hb_port=self._hb.port, peer_id=peer_id, label=label)
            say(f"worker agent {label} registered")
        elif purpose == "status":
            self._send(sock, ident, "status", **self._status())
        elif purpose == "submit":
            self._submit(sock, ident, str(msg.get("config_yaml", "")))
        else:
            self._send(sock, ident, "refuse", reason=f"unknown request {purpose!r}")

    def _status(self) -> dict:
        job = self._job
        if job is not None:
            try:
                answer = request(self._ctx, "127.0.0.1", job["port"], self.cfg.token, self.cfg.name, "status", {},
                                 timeout=1.0)
                return {"nodes": answer["nodes"], "kind": "job", "job_id": job["id"]}
            except MacFleetError:
                pass  # the job's coordinator is not up yet (or gone): show the agents
        hb = self._hb.snapshot()
        rows = [{"rank": None, "host": self.facts.get("host"), "chip": self.facts.get("chip"),
                 "device": self.facts.get("device"), "weight": self.cfg.weight,
                 "state": "running" if job else "idle", "last_heartbeat_s": 0.0, "step": None,
                 "samples_per_s": None, "role": "master"}]
        with self._lock:
            for pid, agent in self._agents.items():
                live = hb.get(pid, {})
                f = agent["facts"]
                rows.append({"rank": None, "host": agent["label"], "chip": f.get("chip"), "device": f.get("device"),
                             "weight": f.get("weight"), "state": agent["state"], "last_heartbeat_s": live.get("age"),
                             "step": None, "samples_per_s": None, "role": "worker"})
        return {"nodes": rows, "kind": "agents", "job_id": job["id"] if job else None}

    def _submit(self, sock, ident: bytes, config_yaml: str) -> None:
        if self._job is not None:
            self._send(sock, ident, "refuse", reason=f"job {self._job['id']} is still running; wait for it to finish")
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
        port = free_port(self.cfg.host)
        chosen = idle[: nodes - 1]
        job = {"id": job_id, "port": port, "submitter": ident, "codes": {}, "waiting": {self.facts["host"]},
               "agents": {}}
        # The token never travels: each agent hands its own to its job process in the environment.
        common = {"cluster.mode": "direct", "cluster.master_port": port, "cluster.discovery_enabled": False,
                  "cluster.token": None}
        for pid, agent in chosen:
            agent["state"] = "running"
            job["agents"][agent["ident"]] = agent["label"]
            job["waiting"].add(agent["label"])
            overrides = dict(common, **{"cluster.role": "worker", "cluster.master_addr": agent["master_addr"]})
            if agent["facts"].get("weight") not in (None, ""):
                overrides["cluster.weight"] = agent["facts"]["weight"]
            self._send(sock, agent["ident"], "job", job_id=job_id, config_yaml=with_overrides(config_yaml, overrides))
        self._job = job
        self._send(sock, ident, "job_started", job_id=job_id, nodes=[self.facts["host"]] + [a["label"] for _, a in chosen])
        master_addr = self.cfg.host if self.cfg.host not in ("0.0.0.0", "", "*") else "127.0.0.1"
        local_yaml = with_overrides(config_yaml, dict(common, **{"cluster.role": "master",
                                                                  "cluster.master_addr": master_addr,
                                                                  "cluster.host": self.cfg.host}))
        label = self.facts["host"]
        job["local"] = JobProcess(local_yaml, lambda ev: self._events.put((ev, label)), label, token=self.cfg.token)

    def _drain_events(self, sock) -> None:
        while True:
            try:
                ev, label = self._events.get_nowait()
            except queue.Empty:
                return
            if ev["t"] == "agent_lost":
                with self._lock:
                    agent = self._agents.pop(ev["peer_id"], None)
                self._hb.forget(ev["peer_id"])
                if agent is not None:
                    say(f"worker agent {agent['label']} lost: {ev['message']}")
                    if self._job is not None and agent["label"] in self._job["waiting"]:
                        self._finish_node(sock, agent["label"], -1, f"[{agent['label']}] agent lost: {ev['message']}")
                continue
            self._job_event(sock, ev, None, label)

    def _job_event(self, sock, msg: dict, ident: Optional[bytes], label: Optional[str] = None) -> None:
        job = self._job
        if job is None:
            return
        if label is None:
            label = job["agents"].get(ident)
            if label is None or msg.get("job_id") != job["id"]:
                return
        if msg["t"] == "log":
            self._send(sock, job["submitter"], "log", line=str(msg.get("line", "")))
        elif msg["t"] == "exit":
            self._finish_node(sock, label, int(msg.get("code", -1)), None)

    def _finish_node(self, sock, label: str, code: int, line: Optional[str]) -> None:
        job = self._job
        if line:
            self._send(sock, job["submitter"], "log", line=line)
        job["codes"][label] = code
        job["waiting"].discard(label)
        self._send(sock, job["submitter"], "exit", node=label, code=code)
        with self._lock:
            for agent in self._agents.values():
                if agent["label"] == label:
                    agent["state"] = "idle"
        if not job["waiting"]:
            self._send(sock, job["submitter"], "job_done", job_id=job["id"], exit_codes=job["codes"])
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
        """One connection to one master agent, until it is lost or we stop."""
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
                    msg = decode(sock.recv(), ("job",))
                except FrameError:
                    continue
                if job is not None:
                    continue  # the master agent only sends one job at a time
                job_id = msg["job_id"]
                hb.report(state="running")
                config_yaml = with_overrides(str(msg["config_yaml"]), {"cluster.token": None})
                job = JobProcess(config_yaml, events.put, self.facts["host"], token=self.cfg.token)
            # Flush the last lines and the exit code if the job just ended.
            time.sleep(0.1)
        finally:
            if job is not None:
                job.stop()
            if hb is not None:
                hb.stop()
            sock.close(0)
            ctx.term()


def submit_job(master_addr: str, port: int, token: Optional[str], config_yaml: str, timeout: float,
               name: str = "macfleet", on_line: Optional[Callable[[str], None]] = None) -> dict:
    """Run a resolved config on the agents; stream their output to on_line (default print)."""
    on_line = on_line or (lambda line: print(line, flush=True))
    # The token proves itself by challenge; it never rides along inside the config text.
    config_yaml = with_overrides(config_yaml, {"cluster.token": None})
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER)
    try:
        sock.connect(tcp(master_addr, port))
        try:
            started = client_handshake(sock, token, name, "submit", {"config_yaml": config_yaml}, timeout=min(10.0, timeout))
        except TimeoutError:
            raise MacFleetError(f"no master agent answered at {master_addr}:{port}; start it with "
                                f"`macfleet launch --role master` on the master Mac") from None
        on_line(f"job {started['job_id']} started on {', '.join(started['nodes'])}")
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MacFleetError(f"job {started['job_id']} did not finish within {timeout:g} s")
            if not sock.poll(int(min(remaining, 1.0) * 1000), zmq.POLLIN):
                continue
            msg = decode(sock.recv())
            if msg["t"] == "log":
                on_line(msg["line"])
            elif msg["t"] == "job_done":
                codes = dict(msg["exit_codes"])
                failed = {k: v for k, v in codes.items() if v != 0}
                if failed:
                    raise MacFleetError(f"job {msg['job_id']} failed on {', '.join(f'{k} (exit {v})' for k, v in failed.items())}; "
                                        f"see the lines above")
                return {"job_id": msg["job_id"], "exit_codes": codes}
    finally:
        sock.close(0)
        ctx.term()


def _cluster_config(args, role: str) -> ClusterConfig:
    return ClusterConfig(role=role, master_addr=getattr(args, "master", None) or "auto",
                         master_port=args.master_port, tensor_port=getattr(args, "tensor_port", 50052),
                         name=getattr(args, "name", "macfleet"), token=args.token,
                         weight=getattr(args, "weight", 1.0), host=getattr(args, "host", "0.0.0.0"),
                         discovery_enabled=not getattr(args, "no_discovery", False))


def launch_main(args) -> int:
    """`macfleet launch --role master|worker`: run an agent until Ctrl-C."""
    cfg = _cluster_config(args, args.role)
    if args.role == "worker" and cfg.master_addr == "auto" and not cfg.discovery_enabled:
        raise MacFleetError("a worker agent needs --master ADDR when --no-discovery is given")
    agent = MasterAgent(cfg) if args.role == "master" else WorkerAgent(cfg)
    signal.signal(signal.SIGTERM, lambda *a: agent.stop())
    try:
        agent.serve_forever()
    except KeyboardInterrupt:
        agent.stop()
    return 0


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "age":
        return f"{float(value):.1f} s ago"
    if kind == "float":
        return f"{float(value):.3g}" if isinstance(value, (int, float)) else str(value)
    return str(value)


def status_main(args) -> int:
    """`macfleet status`: the node table of the master at --master (or found by zeroconf)."""
    token = join_token(args.token)
    name = getattr(args, "name", "macfleet")
    if args.master:
        targets = [(args.master, args.master_port)]
    else:
        from macfleet.cluster.discovery import browse

        targets = [(a, s["port"]) for s in browse(name, timeout=args.timeout) for a in s["addresses"]]
        if not targets:
            raise MacFleetError(f"no MacFleet master of cluster {name!r} answered on zeroconf within "
                                f"{args.timeout:g} s; pass --master ADDR")
    ctx = zmq.Context()
    try:
        answer = request(ctx, targets[0][0], targets[0][1], token, name, "status", {}, timeout=args.timeout)
    finally:
        ctx.term()
    if args.json:
        print(json.dumps({"master": f"{targets[0][0]}:{targets[0][1]}", "kind": answer.get("kind"),
                          "nodes": answer["nodes"]}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MacFleet {answer.get('kind', '')} at {targets[0][0]}:{targets[0][1]}")
    columns = [("rank", "rank", "str"), ("host", "host", "str"), ("chip", "chip", "str"), ("device", "device", "str"),
               ("weight", "weight", "float"), ("state", "state", "str"), ("last heartbeat", "last_heartbeat_s", "age"),
               ("step", "step", "str"), ("samples/s", "samples_per_s", "float")]
    for title, _, _ in columns:
        table.add_column(title)
    for row in answer["nodes"]:
        table.add_row(*[_fmt(row.get(key), kind) for _, key, kind in columns])
    Console(width=140).print(table)
    return 0
