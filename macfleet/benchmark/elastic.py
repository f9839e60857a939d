"""`macfleet benchmark --type elastic`: how fast an elastic fleet gets over losing a node, measured.

Every trial is the real product: a fleet of `--nodes` runs `python train.py` in direct mode, as
the README's two-Mac flow starts it (`cluster=pro_air cluster.role=master|worker`, node 0 the
master, token in MACFLEET_TOKEN), on 127.0.0.1 (or, for `cable` and with --netns, in network
namespaces at 10.0.0.i+1 over veth). It trains the digits CNN (trailing Hydra overrides change
that) on a run far longer than the trial, with a checkpoint every few steps as the sign that
training is under way. Then one disruption hits the last worker (or the master), and the time
it is recorded (time.time(), right after the signal or `ip link set down`) is compared with
what the master's history.json says (the generation event's "t": a survivor caught the failure;
"first_step_t": the first step of the new generation completed), read once the master has
saved a checkpoint in the new generation (a checkpoint writes history.json). Every process of
the trial is then killed (SIGKILL to its process group) and its folder removed.

Cases (`--cases`, default all):
- kill: SIGKILL a worker; stop: SIGSTOP it; cable: `ip link set down` on its veth (root and
  iproute2, else the row says why it was skipped); ctrl-c: SIGINT to its process (direct mode:
  it leaves alone; "said_s": the time to its "left the run" line, "exit_s": to its exit).
  Figure: the survivors' next completed step after the disruption, first_step_t -
  t_disruption; goal 2 x heartbeat + 2 step times (step_s: the global batch over the median
  samples/s of the history's rows, time inside training steps only).
- master: SIGKILL the master; figure: the time from the signal to each worker's exit; goal
  2 x heartbeat ("said_s": to its "answered no heartbeat" line).
- rejoin: after a kill (and the survivors' new generation) the same worker command starts
  again; figure: its process start to the first completed step of the generation it joined
  (that event's first_step_t); goal 10 s.
- hostile: no disruption but a flood, from this process, at the training master on loopback:
  `--fuzz` malformed messages to its control port (garbage, hostile joins behind a valid token
  proof) and as many to its heartbeat port (forged byes for every live worker, forged
  heartbeats, garbage; macfleet/benchmark/hostile.py), the last one on each over the size limit.
  The run is `hostile_steps(--fuzz)` steps, to outlast the flood and end by itself. Checked: every
  message answered (the over-size ones dropped with their connection), `macfleet status`'s query
  answered with every member present and heard from, no departure (the forged byes rejected: no
  generation event in history.json), every node's exit code 0, the master's log naming the
  rejected messages (rate-limited) and no file of the trial holding the token. Figure: the status
  answer after the flood (before it: the reference); no goal. "ok": trials where every check held.
- state-transfer: two processes on loopback, a real macfleet.comm.Group, GroupWorld's
  broadcast_object of a ResNet-50 TrainState (model + SGD momentum) as a joining node receives
  it; figure: the receiver's time for the broadcast plus load_state_dict; no goal.

JSON rows, one per case and fleet size: {"type", "case", "nodes", "link", "heartbeat_s",
"trials" (asked), "ok" (trials that measured), "measure", "goal", "times_s", "goals_s", "met"
(how many times were within their goal), "median_s", "max_s", "detect_s" (event t -
disruption; rejoin: start -> the fleet began taking it in), "regroup_s", "step_s", "said_s",
"exit_s", "bytes" (state-transfer), "hostile" (per trial: {"fuzz", "control" and "heartbeat" (each
{"sent", "answered", "dropped", "unanswered", "send_s", "answers": what was sent -> how it was
answered -> count}), "status_before_s", "status_s", "members", "byes_forged", "byes_rejected",
"departures", "exit_codes", "log_lines" (the master's complaint lines), "steps" (the run's),
"step_after" (the master's step in the status answer after the flood), "failed"}),
"errors" (one line per failed trial), "skipped" (why the case did not run, else null)}; lists
run per trial (master: per worker per trial).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from macfleet.benchmark.scaling import ROOT, bench_dir, check_can_run, parse_overrides, removed_unless_failed, report
from macfleet.errors import ConfigError, MacFleetError

CASES = ("kill", "stop", "cable", "ctrl-c", "master", "rejoin", "hostile", "state-transfer")
REJOIN_GOAL_S = 10.0
START_TIMEOUT_S = 180.0   # the fleet formed and training under way (2 shared cores start 3 torch processes slowly)
STEP_TIMEOUT_S = 60.0     # the disruption to the new generation's first step
STOP_TIMEOUT_S = 30.0     # a worker's Ctrl-C to its exit
CKPT_EVERY = 20           # steps between checkpoints: their log lines say training moves
FUZZ_PER_STEP = 10        # hostile: flood messages (both ports) the run allows a step for (2 shared cores: ~120
                          # alone; 25 once ran out of steps before the flood ended, beside another test in CI)
HOSTILE_WINDOW = 64       # hostile: messages in flight per socket

CONTROLLED = {
    "cluster": "(always pro_air, direct mode)", "cluster.role": "--nodes", "cluster.mode": "--nodes",
    "cluster.nodes": "--nodes", "cluster.master_addr": "--netns", "cluster.master_port": "--netns",
    "cluster.tensor_port": "--netns", "cluster.host": "--netns", "cluster.heartbeat_interval": "--heartbeat",
    "cluster.elastic": "(always true)", "trainer.max_steps": "(a run longer than a trial)",
    "trainer.epochs": "(a run longer than a trial)", "trainer.checkpoint_every_steps": "(the sign of progress)",
    "trainer.resume": "(always none)", "hydra.run.dir": "(a benchmark folder)", "trainer.progress": "(always false)",
}
DEFAULTS = {"trainer.progress": "false", "trainer.epochs": "1000", "trainer.max_steps": "10000000",
            "trainer.checkpoint_every": "0", "trainer.checkpoint_every_steps": str(CKPT_EVERY),
            "trainer.keep_checkpoints": "1", "trainer.log_every": "10", "trainer.timing_warmup_steps": "5",
            "trainer.resume": "none", "trainer.device": "cpu", "scheduler": "constant", "logger": "none",
            "cluster.weights": "null", "cluster.wait_timeout": "60", "cluster.elastic": "true"}
_CHECKPOINT = re.compile(r"checkpoint \S+step-\d+")


# --------------------------------------------------------------------------------------- processes
class Proc:
    """One train.py process of a trial, its own process group; output in `log`, read as it grows."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path, cwd: Path):
        self.name, self.argv, self.env, self.log, self.cwd = name, argv, env, log, cwd
        cwd.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)
        self._pos = 0

    def again(self, log: Path) -> "Proc":
        """The same command started again (a rejoin)."""
        return Proc(self.name, self.argv, self.env, log, self.cwd)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_line(self, pattern: re.Pattern | str, timeout: float, fleet: "list[Proc]" = ()) -> str:
        """The next line (after the last one matched) matching `pattern`; a clear error when it
        does not come within `timeout` s or a process of `fleet` exits first."""
        found = pattern.search if hasattr(pattern, "search") else (lambda line: pattern in line)
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log, "rb") as fh:
                fh.seek(self._pos)
                chunk = fh.read()
            for raw in chunk.split(b"\n")[:-1]:  # the last piece: a line still being written, read again
                self._pos += len(raw) + 1
                line = raw.decode(errors="replace")
                if found(line):
                    return line
            dead = [p for p in [self, *fleet] if p.proc.poll() is not None]
            if dead:
                p = dead[0]
                raise MacFleetError(f"{p.name} exited ({p.proc.returncode}) before {self.name} said "
                                    f"{_shown(pattern)}: {_last_error(p)}")
            if time.monotonic() > deadline:
                raise MacFleetError(f"{self.name} did not say {_shown(pattern)} within {timeout:g} s: {_last_error(self)}")
            time.sleep(0.01)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL its whole process group (DataLoader workers included); a stopped process dies too."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def _shown(pattern) -> str:
    return repr(pattern.pattern if hasattr(pattern, "pattern") else pattern)


def _last_error(p: Proc) -> str:
    lines = [ln.strip() for ln in p.text().splitlines() if ln.strip()]
    said = [ln for ln in lines if "error:" in ln.lower() or ln.startswith(("Error", "Traceback"))]
    return (said[-1] if said else lines[-1] if lines else "no output")[:300] + f" (log: {p.log})"


def wait_exit(procs: list[Proc], timeout: float, said: str | None = None) -> tuple[list, list]:
    """time.time() at which each of `procs` exited (polled every 5 ms; None for one still
    running after `timeout` s), and at which its output first held `said` (None: never)."""
    ended: list[float | None] = [None] * len(procs)
    lines: list[float | None] = [None] * len(procs)
    deadline = time.monotonic() + timeout
    while any(e is None for e in ended) and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if said is not None and lines[i] is None and said in p.text():
                lines[i] = time.time()
            if ended[i] is None and p.proc.poll() is not None:
                ended[i] = time.time()
                if said is not None and lines[i] is None and said in p.text():
                    lines[i] = ended[i]
        time.sleep(0.005)
    return ended, lines


# --------------------------------------------------------------------------------------- a fleet
class Fleet:
    """`n` train.py nodes of one trial in `out` (node 0 the master, writing `out/run`): on
    loopback, or in fresh network namespaces (`netns`)."""

    def __init__(self, out: Path, n: int, heartbeat: float, user: dict, netns=None, max_steps: int | None = None):
        from macfleet.comm.launch import free_ports

        self.out, self.n, self.netns = out, n, netns
        self.run_dir = out / "run"
        if netns is not None:  # every namespace has its own ports
            addrs, ports = [f"10.0.0.{i + 1}" for i in range(n)], [50051] + [50052] * n
        else:
            addrs, ports = ["127.0.0.1"] * n, free_ports(1 + n)
        self.ports = ports
        self.token = secrets.token_hex(16)  # in the environment only, as on two Macs; never on disk
        self.procs: list[Proc] = []
        self.spawned: list[Proc] = []
        for i in range(n):
            role = {"cluster": "pro_air", "cluster.role": "master" if i == 0 else "worker", "cluster.nodes": str(n),
                    "cluster.master_addr": addrs[0], "cluster.master_port": str(ports[0]),
                    "cluster.tensor_port": str(ports[1 + i]), "cluster.heartbeat_interval": f"{heartbeat:g}"}
            if netns is None:
                role["cluster.host"] = "127.0.0.1"
            if i == 0:
                role["hydra.run.dir"] = str(self.run_dir)
            if max_steps is not None:
                role["trainer.max_steps"] = str(max_steps)
            argv = [sys.executable, str(ROOT / "train.py"), *[f"{k}={v}" for k, v in {**DEFAULTS, **user, **role}.items()]]
            if netns is not None:
                argv = ["ip", "netns", "exec", netns.names[i], *argv]
            env = dict(os.environ, MACFLEET_TOKEN=self.token, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                       PYTHONUNBUFFERED="1",
                       PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
            env.pop("WANDB_API_KEY", None)
            self.procs.append(self.spawn(f"node {i}" + (" (master)" if i == 0 else ""), argv, env, i))

    def spawn(self, name: str, argv: list[str], env: dict, i: int) -> Proc:
        p = Proc(name, argv, env, self.out / f"node{i}-{len(self.spawned)}.log", self.out / f"node{i}.cwd")
        self.spawned.append(p)
        return p

    def rejoin(self, i: int) -> Proc:
        old = self.procs[i]
        p = old.again(self.out / f"node{i}-{len(self.spawned)}.log")
        self.spawned.append(p)
        self.procs[i] = p
        return p

    @property
    def master(self) -> Proc:
        return self.procs[0]

    def under_way(self) -> None:
        """Returns once the master has saved a checkpoint: every node joined and steps run."""
        self.master.wait_line(_CHECKPOINT, START_TIMEOUT_S, self.procs)

    def heartbeat_port(self) -> int:
        """The master's heartbeat port. It binds a free one and names it only to the nodes it
        welcomes, so: the port its process listens on that is neither its control nor its data port."""
        import psutil

        proc = psutil.Process(self.master.proc.pid)
        conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
        listening = {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}
        others = listening - {self.ports[0], self.ports[1]}
        if len(others) != 1:
            raise MacFleetError(f"cannot tell the master's heartbeat port: besides its control port {self.ports[0]} "
                                f"and data port {self.ports[1]} it listens on {sorted(others) or 'no port'}")
        return others.pop()

    def history(self) -> tuple[list[dict], float]:
        """The master's history.json as its last checkpoint wrote it (a checkpoint writes it before
        its log line), and the run's step time: the global batch over the median samples/s of its
        rows (time inside training steps only)."""
        try:
            history = json.loads((self.run_dir / "history.json").read_text())
        except (OSError, ValueError) as exc:
            raise MacFleetError(f"the master left no readable history.json ({exc}): {_last_error(self.master)}") from None
        batch = re.search(r"local batch \d+ of (\d+)", self.master.text())
        rates = [row["samples_per_s"] for row in history if row.get("samples_per_s")]
        if batch is None or not rates:
            raise MacFleetError(f"no step time: the master's log names no global batch or history.json has no "
                                f"samples_per_s row (log: {self.master.log})")
        return history, int(batch.group(1)) / statistics.median(rates)

    def close(self) -> None:
        for p in self.spawned:
            p.kill()


def veth_of(ns: str) -> str:
    """The veth device inside namespace `ns` (the node's cable)."""
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show", "type", "veth"], capture_output=True, text=True,
                         check=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    if not names:
        raise MacFleetError(f"no veth device in namespace {ns}")
    return names[0]


# --------------------------------------------------------------------------------------- trials
def _event(history: list[dict], generation: int) -> dict:
    for row in history:
        if "event" in row and row.get("generation") == generation:
            if "first_step_t" not in row:
                raise MacFleetError(f"generation {generation}'s event has no first_step_t: {row}")
            return row
    events = [row["event"] for row in history if "event" in row]
    raise MacFleetError(f"the master's history.json has no generation {generation} event (events: {events or 'none'})")


def survivor_trial(case: str, out: Path, n: int, hb: float, user: dict, netns=None) -> dict:
    """One trial of kill, stop, cable, ctrl-c or rejoin on a fleet of `n`; its figures."""
    fleet = Fleet(out, n, hb, user, netns)
    try:
        fleet.under_way()
        time.sleep(random.uniform(0.1, 0.6))  # land anywhere in a step, not just after a save
        victim = fleet.procs[-1]
        dev = veth_of(netns.names[-1]) if case == "cable" else None
        if case == "cable":
            subprocess.run(["ip", "-n", netns.names[-1], "link", "set", dev, "down"], check=True, capture_output=True)
        else:
            victim.signal({"kill": signal.SIGKILL, "rejoin": signal.SIGKILL, "stop": signal.SIGSTOP,
                           "ctrl-c": signal.SIGINT}[case])
        t_dis = time.time()
        left = []
        if case == "ctrl-c":  # the master's figures come from its history, written meanwhile
            (ended,), (said,) = wait_exit([victim], STOP_TIMEOUT_S, "left the run at step")
            if ended is None or said is None or victim.proc.returncode != 130:
                raise MacFleetError(f"the worker's Ctrl-C did not end it with 130 and 'left the run' within "
                                    f"{STOP_TIMEOUT_S:g} s (exit {victim.proc.returncode}): {_last_error(victim)}")
            left = [said - t_dis, ended - t_dis]
        survivors = fleet.procs[:-1]
        fleet.master.wait_line("generation 2:", STEP_TIMEOUT_S, survivors)
        fleet.master.wait_line(_CHECKPOINT, STEP_TIMEOUT_S, survivors)  # steps of generation 2 ran
        generation, t_start = 2, None
        if case == "rejoin":
            victim.kill()
            fresh = fleet.rejoin(n - 1)
            t_start = fresh.started
            fleet.master.wait_line("generation 3:", STEP_TIMEOUT_S, fleet.procs)
            fleet.master.wait_line(_CHECKPOINT, STEP_TIMEOUT_S, fleet.procs)
            generation = 3
        history, step_s = fleet.history()
    finally:
        fleet.close()
    ev = _event(history, generation)
    if case == "rejoin":
        took, goal = ev["first_step_t"] - t_start, REJOIN_GOAL_S
    else:
        took, goal = ev["first_step_t"] - t_dis, 2 * hb + 2 * step_s
    return {"times_s": [took], "goals_s": [goal], "detect_s": [ev["t"] - (t_start or t_dis)],
            "regroup_s": [ev["regroup_s"]], "step_s": [step_s], "said_s": left[:1], "exit_s": left[1:]}


def master_trial(out: Path, n: int, hb: float, user: dict, netns=None) -> dict:
    """SIGKILL the master of a fleet of `n`; each worker's time to its exit."""
    fleet = Fleet(out, n, hb, user, netns)
    try:
        fleet.under_way()
        time.sleep(random.uniform(0.1, 0.6))
        fleet.master.signal(signal.SIGKILL)
        t_dis = time.time()
        workers = fleet.procs[1:]
        ended, said = wait_exit(workers, max(20.0, 10 * hb), "answered no heartbeat")
        for w, e, s in zip(workers, ended, said):
            if e is None or s is None:
                raise MacFleetError(f"{w.name} did not exit saying the master 'answered no heartbeat' within "
                                    f"{max(20.0, 10 * hb):g} s of the master's SIGKILL: {_last_error(w)}")
    finally:
        fleet.close()
    return {"times_s": [e - t_dis for e in ended], "goals_s": [2 * hb] * len(ended), "detect_s": [],
            "regroup_s": [], "step_s": [], "said_s": [s - t_dis for s in said], "exit_s": [e - t_dis for e in ended]}


def hostile_steps(fuzz: int) -> int:
    """The hostile case's run: the first checkpoint (training under way) and a step for every
    FUZZ_PER_STEP messages of the flood, so it outlasts the flood and the status queries, then
    ends by itself."""
    return 2 * CKPT_EVERY + math.ceil(2 * fuzz / FUZZ_PER_STEP)


def _status(ctx, fleet: Fleet, when: str) -> tuple[float, dict]:
    """The query `macfleet status` makes, to the master of `fleet`: (seconds to its answer, the answer)."""
    from macfleet.cluster.protocol import request

    t0 = time.perf_counter()
    try:
        answer = request(ctx, "127.0.0.1", fleet.ports[0], fleet.token, "macfleet", "status", {}, timeout=10.0)
    except MacFleetError as exc:
        raise MacFleetError(f"`macfleet status` got no answer {when}: {exc}") from None
    return time.perf_counter() - t0, answer


def _absent(answer: dict, n: int, hb: float) -> str:
    """What a status answer lacks of a fleet of `n` all training ('' when nothing)."""
    rows = {row.get("rank"): row for row in answer["nodes"]}
    if sorted(r for r in rows if r is not None) != list(range(n)):
        return f"ranks {sorted(r for r in rows if r is not None)} of {n}"
    stale = [f"rank {r} {rows[r]['state']}, heard from {rows[r]['last_heartbeat_s']} s ago" for r in range(1, n)
             if rows[r]["state"] in ("left", "lost") or (rows[r]["last_heartbeat_s"] or 0) > 2 * hb]
    return "; ".join(stale)


_COMPLAINT = re.compile(r"(coordinator|heartbeat server): ([a-z -]+):")


def _complaints(text: str) -> dict[str, int]:
    """The master's complaint lines (protocol.Complaints) by what they say."""
    found: dict[str, int] = {}
    for m in _COMPLAINT.finditer(text):
        found[f"{m.group(1)}: {m.group(2)}"] = found.get(f"{m.group(1)}: {m.group(2)}", 0) + 1
    return found


def _holds_token(out: Path, token: str) -> list[str]:
    """The files of a trial (logs, run folder, checkpoints) that hold the token."""
    return [str(f.relative_to(out)) for f in sorted(out.rglob("*")) if f.is_file() and token.encode() in f.read_bytes()]


def hostile_trial(out: Path, n: int, hb: float, user: dict, fuzz: int, seed: int) -> dict:
    """Flood the master of a training fleet of `n` with `fuzz` malformed messages per port; its
    figures, and "failed": the checks that did not hold (None when all did)."""
    import zmq

    from macfleet.benchmark.hostile import FORGED_BYE, flood_control, flood_heartbeat

    steps = hostile_steps(fuzz)
    fleet = Fleet(out, n, hb, user, max_steps=steps)
    ctx = zmq.Context()
    failed: list[str] = []
    try:
        fleet.under_way()
        hb_port = fleet.heartbeat_port()
        before_s, before = _status(ctx, fleet, "before the flood")
        missing = _absent(before, n, hb)
        if missing:
            raise MacFleetError(f"the fleet was not whole before the flood: {missing}")
        peers = [f"g{before['generation']}-r{rank}" for rank in range(1, n)]  # the coordinator's peer ids
        rng = random.Random(seed)
        control = flood_control(ctx, "127.0.0.1", fleet.ports[0], fleet.token, fuzz, rng, HOSTILE_WINDOW)
        heartbeat = flood_heartbeat(ctx, "127.0.0.1", hb_port, peers, fuzz, rng, HOSTILE_WINDOW)
        flood_s = control.seconds + heartbeat.seconds
        try:
            status_s, after = _status(ctx, fleet, "after the flood")
        except MacFleetError as exc:
            status_s, after = None, None
            failed.append(f"the run ({steps} steps) ended before the flood ({flood_s:.1f} s) and the status query did"
                          if fleet.master.proc.poll() == 0 else str(exc))
        if after is not None:
            missing = _absent(after, n, hb)
            if missing or after.get("generation") != before.get("generation"):
                failed.append(f"after the flood the status shows generation {after.get('generation')} "
                              f"(before: {before.get('generation')}); {missing or 'every rank in'}")
        for port, tally in (("control", control), ("heartbeat", heartbeat)):
            if tally.unanswered or tally.answered + tally.dropped != tally.sent or tally.sent != fuzz:
                failed.append(f"the {port} port answered {tally.answered} of {tally.sent} messages "
                              f"({tally.dropped} dropped as too big, {tally.unanswered} unanswered) of {fuzz}")
        forged, rejected = heartbeat.count(FORGED_BYE), heartbeat.count(FORGED_BYE, "error: ")
        if forged == 0 or rejected != forged:
            failed.append(f"{rejected} of {forged} forged byes were rejected")
        exit_codes = _run_to_end(fleet)
        history, step_s = fleet.history()
    finally:
        ctx.term()
        fleet.close()
    departures = sum(1 for row in history if "event" in row)
    if departures:
        failed.append(f"{departures} generation change(s) in the master's history: "
                      f"{[row['event'] for row in history if 'event' in row]}")
    if exit_codes != [0] * n:
        failed.append(f"exit codes {exit_codes}, not all 0: {_last_error(fleet.master)}")
    log = fleet.master.text()
    said = _complaints(log)
    if "coordinator: malformed message" not in said or "heartbeat server: forged heartbeat rejected" not in said:
        failed.append(f"the master's log does not name the rejected messages (it has {sorted(said) or 'none'})")
    flooded = max(said.values()) if said else 0
    if flooded > 2 + flood_s / 10:
        failed.append(f"the master logged one kind of rejected message {flooded} times in a {flood_s:.0f} s flood: "
                      f"not rate-limited")
    text = "\n".join(p.text() for p in fleet.spawned)
    if "Traceback" in text or "Exception in thread" in text:
        failed.append("a node's log has a traceback")
    holders = _holds_token(out, fleet.token)
    if holders:
        failed.append(f"the join token was written to {', '.join(holders)}")
    return {"times_s": [] if status_s is None else [status_s], "step_s": [step_s],
            "hostile": [{"fuzz": fuzz, "control": control.as_dict(), "heartbeat": heartbeat.as_dict(),
                         "status_before_s": before_s, "status_s": status_s,
                         "members": None if after is None else len(after["nodes"]),
                         "step_after": None if after is None else after["nodes"][0].get("step"),
                         "byes_forged": forged, "byes_rejected": rejected, "departures": departures,
                         "exit_codes": exit_codes, "log_lines": sum(said.values()), "steps": steps,
                         "failed": "; ".join(failed) or None}],
            "failed": "; ".join(failed) or None}


def _run_to_end(fleet: Fleet) -> list:
    """Each node's exit code once the run ends by itself (None: still running when the master
    went STEP_TIMEOUT_S without a checkpoint)."""
    saved = len(_CHECKPOINT.findall(fleet.master.text()))
    while True:
        ended, _ = wait_exit(fleet.procs, STEP_TIMEOUT_S)
        now = len(_CHECKPOINT.findall(fleet.master.text()))
        if all(e is not None for e in ended) or now == saved:
            return [p.proc.poll() for p in fleet.procs]
        saved = now


def _transfer(rank: int, world_size: int, addrs: list[str], trials: int) -> dict:
    """One rank of the state-transfer figure: rank 0 sends a ResNet-50 TrainState, rank 1
    receives it (broadcast_object, then load_state_dict), `trials` times."""
    import torch

    from macfleet.cluster.fleet import GroupWorld
    from macfleet.comm import Group
    from macfleet.models.resnet import resnet50
    from macfleet.statepack import pack
    from macfleet.trainer import TrainState

    torch.manual_seed(0)
    model = resnet50(num_classes=10, in_channels=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # SGD's momentum buffers, as after a step
        opt.state[p]["momentum_buffer"] = torch.randn_like(p)
    state = TrainState(model, opt, torch.optim.lr_scheduler.StepLR(opt, 30), step=1234, epoch=3, step_in_epoch=56)
    world = GroupWorld()
    world.rank = rank
    times, nbytes = [], 0
    with Group(rank, world_size, addrs, timeout=300) as world.group:
        if rank == 0:
            nbytes = int(pack({"state": state.state_dict()}).numel())
        for _ in range(trials):
            world.all_reduce_sum(torch.zeros(1))  # both ranks start together
            t0 = time.perf_counter()
            got = world.broadcast_object({"state": state.state_dict()} if rank == 0 else None, src=0)
            if rank == 1:
                state.load_state_dict(got["state"])
            times.append(time.perf_counter() - t0)
            del got
        world.all_reduce_sum(torch.zeros(1))
    return {"times_s": times, "bytes": nbytes}


def state_transfer(trials: int) -> dict:
    from macfleet.comm.launch import spawn_local

    sender, receiver = spawn_local(_transfer, 2, (trials,), timeout=600)
    return {"times_s": receiver["times_s"], "bytes": sender["bytes"]}


# --------------------------------------------------------------------------------------- rows
MEASURES = {
    "kill": "disruption -> survivors' next completed step", "stop": "disruption -> survivors' next completed step",
    "cable": "disruption -> survivors' next completed step", "ctrl-c": "disruption -> survivors' next completed step",
    "master": "master's SIGKILL -> each worker's exit", "rejoin": "process start -> its first step in the run",
    "hostile": "status answer after --fuzz malformed messages to each of the master's ports, while training",
    "state-transfer": "ResNet-50 TrainState: broadcast_object + load_state_dict on the receiver",
}
GOALS = {"kill": "2x heartbeat + 2 steps", "stop": "2x heartbeat + 2 steps", "cable": "2x heartbeat + 2 steps",
         "ctrl-c": "2x heartbeat + 2 steps", "master": "2x heartbeat", "rejoin": f"{REJOIN_GOAL_S:g} s",
         "hostile": None, "state-transfer": None}


def new_row(case: str, nodes: int, link: str, hb: float, trials: int) -> dict:
    return {"type": "elastic", "case": case, "nodes": nodes, "link": link, "heartbeat_s": hb, "trials": trials,
            "ok": 0, "measure": MEASURES[case], "goal": GOALS[case], "times_s": [], "goals_s": [], "met": 0,
            "median_s": None, "max_s": None, "detect_s": [], "regroup_s": [], "step_s": [], "said_s": [],
            "exit_s": [], "bytes": None, "hostile": [], "errors": [], "skipped": None}


def finish_row(row: dict) -> dict:
    t = row["times_s"]
    if t:
        row["median_s"], row["max_s"] = statistics.median(t), max(t)
    row["met"] = sum(1 for x, g in zip(t, row["goals_s"]) if x <= g)
    return row


def secs(value: float) -> str:
    """Seconds as the table shows them: 2 decimals, 3 under 0.1 s (a status answer takes milliseconds)."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def elastic_table(rows: list[dict]):
    from rich.table import Table

    hb = rows[0]["heartbeat_s"]
    table = Table(title=f"macfleet benchmark --type elastic: heartbeat {hb:g} s, train.py direct mode",
                  caption="survivor cases: disruption -> the survivors' next completed step (goal 2x heartbeat + 2 "
                          "steps); master: SIGKILL -> each worker's exit; rejoin: start -> first step in the run; "
                          "hostile: the status answer after the flood; detect: disruption -> a survivor caught it")
    for col in ("case", "nodes", "link", "trials", "median s", "max s", "goal s", "within goal", "detect s",
                "regroup s", "step ms", "note"):
        table.add_column(col, justify="left" if col in ("case", "link", "note") else "right")

    def med(values: list[float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        return fmt.format(scale * statistics.median(values)) if values else "-"

    for r in rows:
        note = r["skipped"] or ""
        if r["said_s"]:
            who = "workers" if r["case"] == "master" else "worker"
            note = (f"{who} said so in {med(r['said_s'])} s (max {max(r['said_s']):.2f}), exited in "
                    f"{med(r['exit_s'])} s (max {max(r['exit_s']):.2f})")
        if r["bytes"]:
            note = f"{r['bytes'] / 1e6:.0f} MB, {r['bytes'] / 1e6 / r['median_s']:.0f} MB/s"
        if r["hostile"]:
            note = hostile_note(r["hostile"])
        if r["errors"]:
            note = (note + "; " if note else "") + f"{len(r['errors'])} failed: {r['errors'][0][:80]}"
        n = len(r["times_s"])
        table.add_row(r["case"], str(r["nodes"]), r["link"], f"{r['ok']}/{r['trials']}",
                      "-" if r["median_s"] is None else secs(r["median_s"]),
                      "-" if r["max_s"] is None else secs(r["max_s"]),
                      med(r["goals_s"]), f"{r['met']}/{n}" if r["goals_s"] else "-", med(r["detect_s"]),
                      med(r["regroup_s"]), med(r["step_s"], 1e3, "{:.1f}"), note)
    return table


def hostile_note(trials: list[dict]) -> str:
    """The hostile row's figures, medians over its trials: messages per port and the time to send
    them, answers, the status before the flood, forged byes rejected, departures, exit codes."""
    def med(key: str, port: str | None = None) -> float:
        return statistics.median(t[port][key] if port else t[key] for t in trials)

    answered = sum(t["control"]["answered"] + t["heartbeat"]["answered"] for t in trials)
    due = sum(t["control"]["sent"] - t["control"]["dropped"] + t["heartbeat"]["sent"] - t["heartbeat"]["dropped"]
              for t in trials)
    before = [t["status_before_s"] for t in trials]
    codes = sorted({c for t in trials for c in t["exit_codes"]}, key=str)
    return (f"{med('sent', 'control'):.0f} control + {med('sent', 'heartbeat'):.0f} heartbeat msgs in "
            f"{med('send_s', 'control'):.1f} + {med('send_s', 'heartbeat'):.1f} s, {answered}/{due} answered; "
            f"status before it {1e3 * statistics.median(before):.1f} ms; forged byes rejected "
            f"{sum(t['byes_rejected'] for t in trials)}/{sum(t['byes_forged'] for t in trials)}; "
            f"departures {sum(t['departures'] for t in trials)}; exit {','.join(map(str, codes))}")


def plot_elastic(rows: list[dict], path: str) -> None:
    """Each trial's time per case and fleet size as dots, the goal as a bar across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["times_s"]]
    fig, ax = plt.subplots(figsize=(1.1 * len(shown) + 3, 4))
    for x, r in enumerate(shown):
        ax.scatter([x] * len(r["times_s"]), r["times_s"], color="tab:blue", s=14, zorder=3)
        if r["goals_s"]:
            g = statistics.median(r["goals_s"])
            ax.hlines(g, x - 0.35, x + 0.35, color="tab:red", label="goal" if x == 0 else None)
    ax.set_xticks(range(len(shown)), [f"{r['case']}\n{r['nodes']} nodes" for r in shown], fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title(f"elastic fleet, heartbeat {rows[0]['heartbeat_s']:g} s", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------- main
def parse_cases(items: list[str] | None) -> list[str]:
    cases = list(items or CASES)
    bad = [c for c in cases if c not in CASES]
    if bad:
        raise ConfigError(f"--cases {' '.join(bad)}: choose from {', '.join(CASES)}")
    return cases


def cable_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "skipped: pulling a cable needs network namespaces, which need root"
    if shutil.which("ip") is None:
        return "skipped: `ip` (iproute2) is not on PATH"
    return None


def run_elastic_benchmark(args) -> int:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log or a pipe: keep each table row on one line
    cases = parse_cases(args.cases)
    sizes = list(args.nodes)
    if any(n < 2 for n in sizes):
        raise ConfigError(f"--nodes {' '.join(map(str, sizes))}: a fleet that loses a node needs at least 2")
    trials, hb, fuzz = int(args.trials), float(args.heartbeat), int(args.fuzz)
    if trials < 1 or hb <= 0:
        raise ConfigError("--trials must be >= 1 and --heartbeat > 0 seconds")
    if "hostile" in cases and fuzz < 50:
        raise ConfigError(f"--fuzz {fuzz}: send at least 50 messages to each port (every kind, forged byes among them)")
    check_can_run(args, "elastic")
    if args.netns and os.geteuid() != 0:
        raise ConfigError("--netns makes network namespaces, which needs root: run as root or drop --netns")
    user = parse_overrides(list(args.overrides or []), CONTROLLED, "elastic")
    console.print(f"[bold]elastic[/bold]: cases {', '.join(cases)}; fleets of {', '.join(map(str, sizes))} nodes; "
                  f"{trials} trial(s) each; heartbeat {hb:g} s; train.py direct mode"
                  + (f"; hostile: {fuzz} messages to each port" if "hostile" in cases else "")
                  + (f"; overrides {' '.join(f'{k}={v}' for k, v in user.items())}" if user else ""))

    bench, _ = bench_dir("macfleet-elastic-")
    rows = []
    with removed_unless_failed(bench, console):
        for case in cases:
            if case == "state-transfer":
                row = new_row(case, 2, "loopback", hb, trials)
                with console.status("state-transfer: ResNet-50 TrainState between 2 processes ..."):
                    try:
                        got = state_transfer(trials)
                        row.update(times_s=got["times_s"], bytes=got["bytes"], ok=trials)
                    except MacFleetError as exc:
                        row["errors"].append(str(exc).splitlines()[0])
                rows.append(finish_row(row))
                _say(console, rows[-1])
                continue
            for n in sizes:
                netns_needed = case == "cable" or (args.netns and case != "hostile")
                row = new_row(case, n, "veth" if netns_needed else "loopback", hb, trials)
                why = cable_unavailable() if netns_needed else None
                if case == "hostile" and args.netns:
                    why = "skipped: the flood comes from this process, which reaches the master on loopback only"
                if why:
                    row["skipped"] = why
                    rows.append(finish_row(row))
                    _say(console, rows[-1])
                    continue
                for k in range(trials):
                    out = bench / f"{case}-{n}-{k}"
                    out.mkdir()
                    with console.status(f"{case}, {n} nodes, trial {k + 1}/{trials} ..."):
                        try:
                            if case == "hostile":
                                got = hostile_trial(out, n, hb, user, fuzz, seed=k)
                            else:
                                got = _trial(case, out, n, hb, user, netns_needed)
                        except MacFleetError as exc:
                            row["errors"].append(str(exc).splitlines()[0])
                            console.print(f"  {case}, {n} nodes, trial {k + 1}: failed: {row['errors'][-1]}")
                            _keep_logs(out, bench)
                            continue
                    failed = got.pop("failed", None)  # hostile: figures, with a check that did not hold
                    for key, values in got.items():
                        row[key].extend(values)
                    if failed:
                        row["errors"].append(failed.splitlines()[0])
                        console.print(f"  {case}, {n} nodes, trial {k + 1}: failed: {row['errors'][-1]}")
                        _keep_logs(out, bench)
                        continue
                    shutil.rmtree(out, ignore_errors=True)
                    row["ok"] += 1
                    console.print(f"  {case}, {n} nodes, trial {k + 1}: "
                                  + ", ".join(f"{secs(v)} s" for v in got["times_s"])
                                  + (f" ({hostile_note(got['hostile'])})" if case == "hostile" else ""))
                rows.append(finish_row(row))
                _say(console, rows[-1])
    report(console, args, rows, elastic_table, plot_elastic)
    failed = sum(len(r["errors"]) for r in rows)
    if failed:
        console.print(f"{failed} trial(s) failed; their logs were printed above the table")
    return 1 if failed else 0


def _trial(case: str, out: Path, n: int, hb: float, user: dict, netns_needed: bool) -> dict:
    if not netns_needed:
        return master_trial(out, n, hb, user) if case == "master" else survivor_trial(case, out, n, hb, user)
    from macfleet.comm.launch import Netns

    with Netns(n, prefix="mf-elastic") as ns:
        return master_trial(out, n, hb, user, ns) if case == "master" else survivor_trial(case, out, n, hb, user, ns)


def _keep_logs(out: Path, bench: Path) -> None:
    """A failed trial's logs, printed (the benchmark folder is removed at the end)."""
    for log in sorted(out.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"--- {log.relative_to(bench)} (last {len(tail)} lines)\n" + "\n".join(tail), file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)


def _say(console, r: dict) -> None:
    if r["skipped"]:
        console.print(f"  {r['case']}, {r['nodes']} nodes: {r['skipped']}")
    elif r["median_s"] is not None:
        console.print(f"  {r['case']}, {r['nodes']} nodes: median {secs(r['median_s'])} s, max {secs(r['max_s'])} s"
                      + (f", {r['met']}/{len(r['times_s'])} within {r['goal']}" if r["goal"] else ""))
