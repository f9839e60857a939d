"""`macfleet benchmark --type scaling`: how much faster the fleet trains than one machine, measured.

Every run is the real product: `python train.py` with Hydra overrides, a real model and data,
`--warmup-steps` + `--steps` optimizer steps of which only the last `--steps` are timed
(`trainer.timing_warmup_steps`; metrics.json's samples_per_s and step_s). Node i is a set of
cores of its own (affinity + OMP_NUM_THREADS), optionally a CPU quota (cgroup v2 cpu.max or v1
cfs quota), a GPU (`CUDA_VISIBLE_DEVICES`) and, with --netns, a network namespace at 10.0.0.i+1.
Runs, all with the same global batch B and model:
1. references: each node alone (`cluster=single`) at B, and at its own local batch b_i (its
   share of B in the fleet); nodes run their references side by side, each on its own cores,
   as separate machines would (one at a time where GPUs are shared);
2. the peers (`--backends`, default gloo, and nccl first on cuda): the same job on stock PyTorch,
   `torchrun --nnodes N --node-rank i train.py cluster=torchrun cluster.backend=B` on the same
   nodes (cores, GPU, namespace), global batch, shares and steps, compression none; the user's
   overrides go with it but for cluster.* keys other than cluster.weights (the fleet's engine
   settings). On loopback nccl copies between the GPUs directly (as GPUs of one machine); with
   --netns it gets P2P and shared memory off, so its bytes cross the link as between machines;
3. the fleet: one run per codec, node 0 the master, started as the README's two-Mac flow does
   (`cluster=pro_air cluster.role=master|worker`, token in MACFLEET_TOKEN).
Figures, each beside its reference from the same benchmark:
- samples/s of the fleet; speedup = fleet / node 0 alone at B ("one machine");
- vs_peers: fleet samples/s / each peer's ({"gloo": ..., "nccl": ...});
- efficiency = fleet / ideal, ideal = the sum of every node's own samples/s at B;
- where a fleet step goes, per node: compute = the node's own step time alone at b_i;
  communication wait = fleet step time - compute (codec encode/decode included); staging =
  device<->host copy time per step, when the engine reports `staging_s` (a run total) in
  metrics.json.
JSON rows, the 1-node reference first, then one per peer ("run": "torchrun"), then one per
codec ("run": "fleet"): {"type", "run", "backend", "codec", "nodes",
"global_batch", "local_batches", "steps", "reference_steps", "warmup_steps", "device", "link", "cores", "cpu_quota",
"samples_per_s", "step_s", "step_max_s", "one_node_samples_per_s", "single_samples_per_s",
"ideal_samples_per_s", "speedup", "efficiency", "compute_s", "comm_wait_s", "staging_s",
"wire_ratio", "data_workers", "vs_peers", "peers_failed", "ceiling_samples_per_s"}; backend: None for the 1-node row, "macfleet" for the
fleet's; vs_peers, peers_failed (a peer whose run failed: its error line; the fleet ran without
it, and the benchmark's folder is kept for its log): None but in fleet rows; per-node figures are lists indexed by node; data_workers: the
DataLoader workers of rank 0 (trainer.num_workers as resolved); step_max_s: the slowest timed
step (a run whose slowest step took over STALL_FACTOR x its mean also gets a line saying so);
ceiling_samples_per_s (fleet and peer rows): global batch / the slowest node's own step at its
share, what the nodes would give with the exchange free (a line under the table compares the
fastest codec with it).
--throttle NODE:QUOTA@WHEN (as root) plays a throttling Mac: in each fleet run, NODE's cgroup limit
drops to QUOTA of its cores WHEN s after the first step (or at step N), the master's step watched
through its status requests; NODE is also measured alone at QUOTA, the fleet logs every step, and
every row gains the figures of `throttle_figures` and THROTTLE_KEYS (see README).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from macfleet.benchmark import signals_held
from macfleet.config import COMPRESSION_NAMES
from macfleet.errors import ConfigError, MacFleetError

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 3600.0
CGROUP_PERIOD_US = 100_000

# Keys the benchmark sets itself, and the option that sets them instead.
CONTROLLED = {
    "cluster": "--nodes / --netns", "compression": "--codecs", "trainer.device": "--device",
    "trainer.max_steps": "--steps / --warmup-steps", "trainer.epochs": "--steps / --warmup-steps",
    "trainer.timing_warmup_steps": "--warmup-steps", "trainer.resume": "(always none)",
    "trainer.profile_steps": "--profile",
    "hydra.run.dir": "(a benchmark folder)", "cluster.role": "--nodes", "cluster.mode": "--nodes",
    "cluster.nodes": "--nodes", "cluster.master_addr": "--netns", "cluster.master_port": "--netns",
    "cluster.tensor_port": "--netns", "cluster.host": "--netns", "cluster.weight": "cluster.weights=[...]",
}
# Settings a user may change with a trailing override (e.g. cluster.weights=[0.6,0.4]).
DEFAULTS = {"trainer.progress": "false", "trainer.checkpoint_every": "0", "trainer.checkpoint_every_steps": "0",
            "logger": "none", "cluster.weights": "null", "cluster.heartbeat_interval": "2.0"}

log = logging.getLogger("macfleet")


@dataclass
class Node:
    """One emulated machine: its cores, CPU quota, GPU and (with --netns) namespace."""

    index: int
    cores: list[int]
    quota: float | None = None
    gpu: str | None = None
    netns: str | None = None
    dev: str | None = None  # with --netns: its link's name in the namespace
    cgroup: Path | None = None

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def env(self) -> dict[str, str]:
        env = dict(os.environ, OMP_NUM_THREADS=str(len(self.cores)), MKL_NUM_THREADS=str(len(self.cores)),
                   PYTHONUNBUFFERED="1")
        env.pop("WANDB_API_KEY", None)
        if self.gpu is not None:
            env.update(CUDA_VISIBLE_DEVICES=self.gpu, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                       NVSHMEM_DISABLE_NVLS="1")
        return env

    def enter(self) -> None:
        """Runs in the child between fork and exec: its cores and cgroup, inherited by python."""
        os.sched_setaffinity(0, self.cores)
        if self.cgroup is not None:
            (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def describe(self) -> str:
        cores = f"cores {self.cores[0]}-{self.cores[-1]}" if len(self.cores) > 1 else f"core {self.cores[0]}"
        quota = f", {self.quota:g} of them" if self.quota is not None and self.quota < 1 else ""
        gpu = f", GPU {self.gpu}" if self.gpu is not None else ""
        return f"node {self.index}: {cores}{quota}{gpu}"


# --------------------------------------------------------------------------------------- options
def parse_codecs(text: str) -> list[str]:
    """--codecs: a comma list of codecs, each with optional compression settings after colons
    (`topk_fp16:granularity=element:ratio=0.05`), so one run can set a codec beside a variant
    of itself. Returns the labels as given (stripped); `codec_overrides` turns one into overrides."""
    codecs = [s.strip() for s in text.split(",") if s.strip()]
    if not codecs or any(c.split(":")[0] not in COMPRESSION_NAMES for c in codecs):
        raise ConfigError(f"--codecs {text!r}: use a comma list of {', '.join(COMPRESSION_NAMES)}, each optionally "
                          "with compression settings after colons, e.g. topk_fp16:granularity=element")
    for c in codecs:
        codec_overrides(c)  # every setting names a compression key
    if len(set(codecs)) != len(codecs):
        raise ConfigError(f"--codecs {text!r}: a codec is listed twice")
    return codecs


def codec_overrides(label: str) -> dict[str, str]:
    """`topk_fp16:granularity=element` -> {"compression": "topk_fp16", "compression.granularity": "element"}."""
    import dataclasses

    from macfleet.config import CompressionConfig

    name, *settings = label.split(":")
    keys = {f.name for f in dataclasses.fields(CompressionConfig)} - {"name"}
    out = {"compression": name}
    for item in settings:
        key, eq, value = item.partition("=")
        if not eq or key not in keys or not value:
            raise ConfigError(f"--codecs: {item!r} in {label!r}: give KEY=VALUE with KEY one of "
                              f"{', '.join(sorted(keys))}")
        out[f"compression.{key}"] = value
    return out


def run_label(codec: str) -> str:
    """A folder-safe name for a --codecs label (`topk_fp16:granularity=element` ->
    `topk_fp16-granularity-element`)."""
    return codec.replace(":", "-").replace("=", "-")


def bench_dir(prefix: str) -> tuple[Path, Path]:
    """A fresh temporary folder for a benchmark's runs, and its logs/ folder."""
    bench = Path(tempfile.mkdtemp(prefix=prefix))
    (bench / "logs").mkdir()
    return bench, bench / "logs"


@contextlib.contextmanager
def removed_unless_failed(bench: Path, console):
    """`bench` is removed when the block ends well, and kept (and named) when it fails, for its
    logs; also when the block set `keep["why"]` (a run that failed without stopping the rest)."""
    keep: dict = {}
    try:
        yield keep
    except BaseException:
        console.print(f"runs and logs kept in {bench}")
        raise
    if keep.get("why"):
        console.print(f"runs and logs kept in {bench} ({keep['why']})")
        return
    shutil.rmtree(bench, ignore_errors=True)


def check_can_run(args, kind: str) -> None:
    """What a training benchmark needs before it starts anything: matplotlib for --plot, and
    train.py (a source checkout)."""
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install 'macfleet[plot]', or drop --plot") from None
    if not (ROOT / "train.py").is_file():
        raise ConfigError(f"--type {kind} runs train.py from a source checkout; there is none at {ROOT}")


def _per_node(text: str, nodes: int, option: str, cast, hint: str) -> list:
    """A comma list with one value per node, e.g. --cores 8,4; `hint` says what a value is."""
    try:
        values = [cast(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give {hint}") from None
    if len(values) != nodes:
        raise ConfigError(f"{option} {text!r} has {len(values)} value(s) for --nodes {nodes}: give one per node")
    return values


def parse_cores(text: str | None, nodes: int) -> list[int] | None:
    """'8,4' -> [8, 4]: each node's own number of cores (unequal Macs)."""
    if text is None:
        return None
    counts = _per_node(text, nodes, "--cores", int, "a whole number of cores per node, e.g. 8,4")
    if any(c < 1 for c in counts):
        raise ConfigError(f"--cores {text!r}: every node needs at least one core")
    return counts


MAX_RUNS = 10
"""--runs: at most this many rounds (each run of a round gets its own ports in namespaces)."""


def parse_runs(text, throttle: bool, profiled: int) -> int:
    """--runs N: how many rounds of every peer and codec (1 by default)."""
    if text is None:
        return 1
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--runs {text!r}: give a whole number of rounds, e.g. --runs 3") from None
    if not 1 <= n <= MAX_RUNS:
        raise ConfigError(f"--runs {n}: give 1 to {MAX_RUNS} rounds")
    if n > 1 and throttle:
        raise ConfigError("--runs with --throttle: a throttled run is read step by step, not as one figure; "
                          "run the benchmark again for another")
    if n > 1 and profiled:
        raise ConfigError("--runs with --profile: profile one round (--runs 1); the profiler slows the steps it records")
    return n


def median_run(runs: list[dict]) -> dict:
    """The run whose samples/s is the median (the lower of the two middle ones for an even count):
    a real run, so every figure of its row comes from the same run."""
    ranked = sorted(runs, key=lambda m: m["samples_per_s"])
    return ranked[(len(ranked) - 1) // 2]


def runs_of(runs: list[dict]) -> dict:
    """A row's figures of every round (--runs): each run's samples/s, in the order they ran."""
    return {"runs": len(runs), "runs_samples_per_s": [m["samples_per_s"] for m in runs]}


def parse_peers(text: str | None, device: str, throttle: bool) -> list[str]:
    """--backends for --type scaling: the torch backends whose `train.py cluster=torchrun` run
    stands beside the fleet. Default: gloo, and nccl first on cuda; none with --throttle (a stock
    backend does not adapt) or on mps (neither stock backend reduces MPS tensors); `none`: no peer."""
    from macfleet.benchmark.ddp import backend_spec

    if text is None:
        return [] if throttle or device == "mps" else (["nccl", "gloo"] if device == "cuda" else ["gloo"])
    peers = [b.strip() for b in text.split(",") if b.strip()]
    if peers == ["none"]:
        return []
    for b in peers:
        name = backend_spec(b)[0]
        if name not in ("gloo", "nccl", "macfleet"):
            raise ConfigError(f"--backends {text!r}: {name!r} is not a torch backend train.py runs on under torchrun; "
                              "use gloo, nccl or macfleet (or none)")
        if name == "nccl" and device != "cuda":
            raise ConfigError(f"--backends {text!r}: nccl needs --device cuda; use gloo")
    if throttle:
        raise ConfigError("--throttle watches the fleet adapt; a stock backend's run does not: drop --backends "
                          "(or give --backends none)")
    if len(set(peers)) != len(peers):
        raise ConfigError(f"--backends {text!r}: a backend is listed twice")
    return peers


def parse_quotas(text: str | None, nodes: int) -> list[float] | None:
    """'1.0,0.6' -> [1.0, 0.6]: each node's fraction of its own cores."""
    if text is None:
        return None
    quotas = _per_node(text, nodes, "--cpu-quota", float, "one fraction per node, e.g. 1.0,0.6")
    if any(not 0.01 <= q <= 1.0 for q in quotas):
        raise ConfigError(f"--cpu-quota {text!r}: each value is a fraction of the node's cores, in [0.01, 1.0]")
    return quotas


@dataclass
class Throttle:
    """--throttle NODE:QUOTA@WHEN: node `node`'s cgroup limit drops to `quota` x its cores
    `seconds` after the fleet's first step, or once the master has done `step` steps."""

    node: int
    quota: float
    seconds: float | None = None
    step: int | None = None

    def when(self) -> str:
        return f"{self.seconds:g} s after the first step" if self.step is None else f"at step {self.step}"


def parse_throttle(text: str | None, nodes: int) -> Throttle | None:
    """'1:0.6@20' (20 s after the fleet's first step), '1:0.6@20s', '1:0.6@step40' -> Throttle."""
    if text is None:
        return None
    how = (f"--throttle {text!r}: give NODE:QUOTA@SECONDS or NODE:QUOTA@stepN, e.g. 1:0.6@20 (node 1's cores "
           f"limited to 0.6 of them 20 s after the fleet's first step) or 1:0.6@step40")
    node, colon, rest = text.partition(":")
    quota, at, when = rest.partition("@")
    if not (colon and at):
        raise ConfigError(how)
    try:
        node_i, quota_f = int(node), float(quota)
        if when.startswith("step"):
            seconds, step = None, int(when[4:])
        else:
            seconds, step = float(when.removesuffix("s")), None
    except ValueError:
        raise ConfigError(how) from None
    if not 0 <= node_i < nodes:
        raise ConfigError(f"--throttle {text!r}: node {node_i} is not one of the {nodes} nodes (0..{nodes - 1})")
    if not 0.01 <= quota_f <= 1.0:
        raise ConfigError(f"--throttle {text!r}: the quota is a fraction of the node's cores, in [0.01, 1.0]")
    if (seconds is not None and not (math.isfinite(seconds) and seconds >= 0)) or (step is not None and step < 1):
        raise ConfigError(f"--throttle {text!r}: the time is >= 0 seconds, or a step >= 1")
    return Throttle(node_i, quota_f, seconds, step)


def parse_overrides(items: list[str], controlled: dict[str, str] = CONTROLLED, kind: str = "scaling") -> dict[str, str]:
    """Trailing Hydra overrides, keyed by what they set; refuses keys the benchmark sets itself
    (`controlled`: key -> the option that sets it)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"{item!r} is not a Hydra override like model=resnet50 or trainer.batch_size=256")
        bare = key.lstrip("+~")
        if bare in controlled or bare.startswith("hydra."):
            raise ConfigError(f"{item!r}: the {kind} benchmark sets {bare} itself; use {controlled.get(bare, 'its options')}")
        out[key] = value
    return out


def plan_nodes(args) -> list[Node]:
    """Cores, quotas and GPUs per node, checked before anything starts."""
    nodes = int(args.nodes)
    if args.device not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {args.device!r}: choose cpu, cuda or mps (node i of several GPUs gets GPU i)")
    if nodes < 2:
        raise ConfigError("--nodes must be >= 2: the scaling benchmark compares a fleet with one node")
    quotas = parse_quotas(args.cpu_quota, nodes)
    root = os.geteuid() == 0
    if args.netns and not root:
        raise ConfigError("--netns makes network namespaces, which needs root: run as root or drop --netns")
    if quotas and not root:
        raise ConfigError("--cpu-quota makes cgroups, which needs root: run as root or drop --cpu-quota")
    throttle = parse_throttle(getattr(args, "throttle", None), nodes)
    if throttle and not root:
        raise ConfigError("--throttle lowers a cgroup's CPU quota, which needs root: run as root or drop --throttle")
    if throttle and throttle.quota >= (quotas[throttle.node] if quotas else 1.0):
        raise ConfigError(f"--throttle {args.throttle!r} does not lower node {throttle.node}'s quota "
                          f"({quotas[throttle.node] if quotas else 1.0:g} of its cores): give a smaller one")
    if args.rate and not args.netns:
        raise ConfigError("--rate shapes the namespaces' links: add --netns (as root) or drop --rate")
    if args.netns:
        for tool in ["ip"] + (["tc"] if args.rate else []):
            if shutil.which(tool) is None:
                raise ConfigError(f"`{tool}` (iproute2) is not on PATH: install iproute2 (apt install iproute2) or "
                                  f"put a copy of its `ip` and `tc` on PATH, or drop --netns")
    available = sorted(os.sched_getaffinity(0))
    if nodes > len(available):
        raise ConfigError(f"--nodes {nodes} needs a core per node and this machine has {len(available)}: lower --nodes")
    counts = parse_cores(getattr(args, "cores", None), nodes)
    if counts is not None and args.cores_per_node:
        raise ConfigError("give --cores (each node's own count) or --cores-per-node (the same for all), not both")
    if counts is not None and sum(counts) > len(available):
        raise ConfigError(f"--cores {args.cores} adds up to {sum(counts)} cores; this machine has {len(available)}")
    if counts is None:
        per = int(args.cores_per_node) if args.cores_per_node else len(available) // nodes
        if per < 1 or per * nodes > len(available):
            raise ConfigError(f"--nodes {nodes} x --cores-per-node {per} is more than this machine's {len(available)} "
                              f"cores: lower --cores-per-node to {len(available) // nodes} or less")
        counts = [per] * nodes
    gpus: list[str | None] = [None] * nodes
    if args.device != "cpu":
        import torch  # only here: the option checks above answer without it
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA GPU is visible here; use --device cpu")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        if len(ids) > 1:
            gpus = [ids[i % len(ids)] for i in range(nodes)]
    elif args.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available here; use --device cpu")
    first = [sum(counts[:i]) for i in range(nodes)]
    return [Node(i, available[first[i]:first[i] + counts[i]], quotas[i] if quotas else None, gpus[i])
            for i in range(nodes)]


# --------------------------------------------------------------------------------------- cgroups
class CpuQuotas:
    """One cgroup per node holding it to `quota` x its cores (cgroup v2 cpu.max, else v1 cfs
    quota); removed on exit. Nodes in `also` (a --throttle's) get one without a limit where they
    have no quota, so that `set` can lower it mid-run."""

    def __init__(self, nodes: list[Node], also: tuple[int, ...] = ()):
        self.nodes = [n for n in nodes if n.quota is not None or n.index in also]
        self.made: list[Path] = []
        self.v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()

    def set(self, node: Node, quota: float | None) -> None:
        """Node's cgroup limit to `quota` x its cores now (None: no limit); its processes follow."""
        if node.cgroup is None:
            raise MacFleetError(f"node {node.index} has no cgroup to limit")
        limit = int(quota * len(node.cores) * CGROUP_PERIOD_US) if quota is not None else None
        if self.v2:
            (node.cgroup / "cpu.max").write_text(f"{limit if limit is not None else 'max'} {CGROUP_PERIOD_US}")
        else:
            (node.cgroup / "cpu.cfs_period_us").write_text(str(CGROUP_PERIOD_US))
            (node.cgroup / "cpu.cfs_quota_us").write_text(str(limit if limit is not None else -1))

    def __enter__(self) -> "CpuQuotas":
        if not self.nodes:
            return self
        v2 = self.v2
        base = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/cpu")
        try:
            if v2 and "cpu" not in (base / "cgroup.subtree_control").read_text().split():
                (base / "cgroup.subtree_control").write_text("+cpu")
            _remove_stale(base)
            for node in self.nodes:
                path = base / f"macfleet-bench-{os.getpid()}-{node.index}"
                path.mkdir()
                self.made.append(path)
                node.cgroup = path
                self.set(node, node.quota)
        except OSError as exc:
            self.__exit__()
            option = "--cpu-quota" if any(n.quota is not None for n in self.nodes) else "--throttle"
            raise ConfigError(f"{option}: cannot set up a cgroup under {base} ({exc}); drop {option}") from None
        return self

    def __exit__(self, *exc) -> None:
        for path in reversed(self.made):
            for _ in range(50):  # a process that just exited may still be listed for a moment
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        self.made.clear()
        for node in self.nodes:
            node.cgroup = None


def _remove_stale(base: Path) -> None:
    """Remove empty cgroups of earlier benchmarks whose process is gone (a SIGKILL skips
    `__exit__`), so they do not pile up under the cgroup root."""
    for path in base.glob("macfleet-bench-*-*"):
        try:
            pid = int(path.name.split("-")[2])
            os.kill(pid, 0)
            continue  # that benchmark still runs
        except (ValueError, IndexError, PermissionError):
            continue
        except ProcessLookupError:
            pass
        try:
            path.rmdir()  # fails while a process is still in it: then it is not stale
            log.info("removed %s, left by benchmark process %d, which is gone", path, pid)
        except OSError:
            pass


# --------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One train.py invocation per node of one run; rank 0 writes `out/metrics.json`."""

    label: str
    out: Path
    procs: list[tuple[Node, list[str], dict]] = field(default_factory=list)
    own_group: bool = False  # each process leads a process group, stopped whole (torchrun and its ranks)


def _wait(runs: list[Run], logs: Path, console, tick=None) -> list[dict]:
    """Start every process of `runs` at once; rank 0's metrics.json per run. A failed process
    stops the rest and raises with its error line. `tick()`, if given, is called about every
    0.1 s while they run (after every fork)."""
    started = []
    status = console.status(f"running {', '.join(r.label for r in runs)} ...")
    try:
        with signals_held():  # every process started is in `started`, for the cleanup below
            for run in runs:
                for node, argv, env in run.procs:
                    log_path = logs / f"{run.label}-node{node.index}.log"
                    with open(log_path, "w") as fh:
                        cwd = run.out.parent / f"{run.label}-node{node.index}.cwd"
                        cwd.mkdir(exist_ok=True)
                        proc = subprocess.Popen(node.prefix() + argv, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                                cwd=cwd, preexec_fn=_grouped(node.enter) if run.own_group else node.enter)
                    started.append((run, log_path, proc))
            # The spinner's thread starts after the forks: preexec_fn runs in a child forked from
            # this process, which is safe while it has no other threads. It starts with the
            # signals held too: a SIGTERM inside rich's start left it half started, and stopping
            # it then raised IndexError over the interrupt (exit 1 with a traceback, not 130).
            status.start()
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while any(p.poll() is None for _, _, p in started):
            if any(p.returncode not in (None, 0) for _, _, p in started):
                break  # the others may be waiting on the failed one
            if time.monotonic() > deadline:
                run, log_path, _ = next(s for s in started if s[2].poll() is None)
                raise MacFleetError(f"{run.label} still running after {RUN_TIMEOUT_S:.0f} s (log: {log_path})")
            if tick is not None:
                tick()
            time.sleep(0.1)
        for run, log_path, proc in started:
            if proc.returncode not in (None, 0):
                raise MacFleetError(f"{run.label} failed: {_why(log_path, proc)} (log: {log_path})")
    finally:
        # The processes first: when stopping the spinner raised (see above), the training
        # processes of that run were left behind, still training.
        for run, _, proc in started:
            if run.own_group:
                _kill_tree(proc)
            elif proc.poll() is None:
                proc.kill()
            proc.wait()
        status.stop()
    return [json.loads((run.out / "metrics.json").read_text()) for run in runs]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent, its process group and every process below it: its ranks run in
    sessions of their own and outlive a killed agent."""
    import psutil

    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in below:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(below, timeout=10)


def _grouped(enter):
    """A preexec_fn: the child leads a process group of its own, then `enter`."""
    def run() -> None:
        os.setpgid(0, 0)
        enter()
    return run


# The master's step, polled through its status requests (what `macfleet status` asks), run in
# node 0's namespace: one JSON line {"t", "step"} per answer. Ends with the benchmark.
_WATCH = r"""
import json, os, sys, time
import zmq
from macfleet.cluster.protocol import request
host, port, name, parent = sys.argv[1], int(sys.argv[2]), sys.argv[3], os.getppid()
ctx = zmq.Context()
while os.getppid() == parent:
    try:
        answer = request(ctx, host, port, os.environ["MACFLEET_TOKEN"], name, "status", {}, timeout=1.0)
    except Exception:
        time.sleep(0.2)
        continue
    step = next((r.get("step") for r in answer.get("nodes", []) if r.get("rank") == 0), None)
    print(json.dumps({"t": time.time(), "step": step}), flush=True)
    time.sleep(0.05)
"""


class Throttler:
    """Plays a throttling Mac during one fleet run: watches the master's step and lowers the
    throttled node's cgroup limit when due; `tick` goes to `_wait`. The quota is back to the
    node's own after `close`."""

    def __init__(self, throttle: Throttle, nodes: list[Node], quotas: CpuQuotas, run: Run, cluster_name: str,
                 log_path: Path):
        self.throttle, self.quotas, self.run = throttle, quotas, run
        self.node, self.master = nodes[throttle.node], nodes[0]
        argv = run.procs[0][1]
        arg = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if "=" in a}
        self.addr = (arg.get("cluster.host", arg["cluster.master_addr"]), arg["cluster.master_port"])
        self.env = dict(run.procs[0][2], PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.name, self.log_path = cluster_name, log_path
        self.proc: subprocess.Popen | None = None
        self.reader = None
        self.seen: list[tuple[float, int]] = []   # (time, the master's steps done), from the first step on
        self.first_t: float | None = None
        self.at_t: float | None = None
        self.at_step: int | None = None

    def tick(self) -> None:
        import threading

        if self.proc is None:  # after _wait's forks: this process may have threads from here on
            with open(self.log_path, "w") as err:
                self.proc = subprocess.Popen(self.master.prefix() + [sys.executable, "-c", _WATCH, *self.addr, self.name],
                                             stdout=subprocess.PIPE, stderr=err, text=True, env=self.env)
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        if self.at_t is not None or not self.seen:
            return
        t, step = self.seen[-1]
        due = step >= self.throttle.step if self.throttle.step is not None else \
            time.time() >= self.first_t + self.throttle.seconds
        if due:
            self.quotas.set(self.node, self.throttle.quota)
            self.at_t, self.at_step = time.time(), step

    def _read(self) -> None:
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                got = json.loads(line)
                if got.get("step"):
                    self.first_t = self.first_t or got["t"]
                    self.seen.append((got["t"], int(got["step"])))

    def close(self) -> None:
        """Stop watching and give the node its own quota back."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.reader.join(timeout=5)
        self.quotas.set(self.node, self.node.quota)

    def check(self) -> None:
        """After the run: raise when the throttle never came (the run ended first)."""
        if self.at_t is None:
            last = f"at step {self.seen[-1][1]}, {self.seen[-1][0] - self.first_t:.1f} s after its first step" \
                if self.seen else "before its first step was seen"
            raise MacFleetError(f"--throttle: the fleet's run {self.run.label} ended {last}, before the throttle "
                                f"({self.throttle.when()}); give more --steps or an earlier throttle")


RECOVER_WINDOW = 5       # steps in the moving median of the fleet's samples/s after a throttle
RECOVER_WITHIN = 0.05    # "recovered": that median is at least (1 - this) x the ideal after the throttle


def throttle_figures(history: list[dict], at_step: int, warmup: int, ideal_after: float) -> dict:
    """The fleet's samples/s per step (rank 0's history.json at trainer.log_every=1) around a
    throttle applied after step `at_step`: the median before it (timed steps only), the median of
    the last RECOVER_WINDOW steps, and the steps after it until the moving median of
    RECOVER_WINDOW steps (all after the throttle) reaches (1 - RECOVER_WITHIN) x `ideal_after`
    and stays there to the end (None: not within the steps that ran). `slowed` is False when no
    window after the throttle fell short: the throttle cost the fleet nothing visible, so a
    recovery in RECOVER_WINDOW steps says nothing (None: fewer steps than a window ran after it).
    A dip that starts a few steps late (a cgroup quota bites within its period, the shares move
    after votes) counts: in a run of 2026-11-27 on CPU nodes of 8 cores, the fleet was within 5%
    over the first windows after the throttle, 6-9% short of it in windows ending 7-15 steps after,
    then back."""
    import statistics

    curve = sorted((int(r["step"]), float(r["samples_per_s"])) for r in history if "samples_per_s" in r)
    before = [v for st, v in curve if warmup < st <= at_step] or [v for st, v in curve if st <= at_step]
    after = [(st, v) for st, v in curve if st > at_step]
    within = [statistics.median(v for _, v in after[j - RECOVER_WINDOW + 1:j + 1]) >= (1 - RECOVER_WITHIN) * ideal_after
              for j in range(RECOVER_WINDOW - 1, len(after))]
    recover = None
    if within and within[-1]:
        first = len(within) - 1
        while first > 0 and within[first - 1]:
            first -= 1
        recover = after[first + RECOVER_WINDOW - 1][0] - at_step
    tail = [v for _, v in after[-RECOVER_WINDOW:]]
    return {"before_samples_per_s": statistics.median(before) if before else None,
            "final_samples_per_s": statistics.median(tail) if tail else None,
            "steps_to_recover": recover, "steps_after_throttle": len(after),
            "slowed": None if not within else not all(within),
            "curve": [[st, round(v, 3)] for st, v in curve],
            "share_events": [{"step": r["step"], "shares": r["shares"]} for r in history if "shares" in r],
            "codec_events": [{"step": r["step"], "event": r["event"]} for r in history
                             if str(r.get("event", "")).startswith("compression=auto")]}


_RAISED = re.compile(r"^(?:\[rank\d+\]:\s*)?(?:[a-z_]\w*\.)*[A-Z]\w*(?:Error|Exception): ")


def _why(log_path: Path, proc) -> str:
    """The line of a failed run's log that says why: the last exception a Python process raised,
    else the last line that says "error:", else the last that starts a traceback, else the last
    line; never torchrun's own closing lines (ChildFailedError only says that a rank failed)."""
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if "torch.distributed.elastic" not in ln]
    said = ([ln for ln in lines if _RAISED.match(ln)] or [ln for ln in lines if "error:" in ln.lower()]
            or [ln for ln in lines if ln.startswith(("Error", "Traceback"))])
    line = (said[-1] if said else (lines[-1] if lines else f"exit code {proc.returncode}")).strip()
    return line.removeprefix("macfleet: error: ")


def _overrides(*layers: dict) -> list[str]:
    merged: dict[str, str] = {}
    for layer in layers:
        merged.update(layer)
    return [f"{k}={v}" for k, v in merged.items()]


def _compose(overrides: list[str]):
    """The real config the runs will see, for its batch size, shares and dataset; Hydra's
    complaint about a bad override becomes one line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from macfleet.config import ClusterConfig, TrainingConfig, register_configs, to_dataclass

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        to_dataclass(TrainingConfig, cfg.trainer)
        to_dataclass(ClusterConfig, cfg.cluster)
    except MacFleetError:
        raise
    except Exception as exc:  # Hydra's and OmegaConf's errors: a bad override
        said = [str(e).strip().splitlines()[0] for e in (exc, exc.__cause__) if e is not None and str(e).strip()]
        raise ConfigError(f"a trailing override was refused: {': '.join(said)}") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


# --------------------------------------------------------------------------------------- main
def run_scaling_benchmark(args) -> int:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log or a pipe: keep each table row on one line
    codecs = parse_codecs(args.codecs or "none,fp16,topk_fp16")
    steps, warmup = int(args.steps), int(5 if args.warmup_steps is None else args.warmup_steps)
    if steps < 1 or warmup < 0:
        raise ConfigError("--steps must be >= 1 and --warmup-steps >= 0")
    ref_steps = steps if getattr(args, "reference_steps", None) is None else int(args.reference_steps)
    if ref_steps < 1:
        raise ConfigError(f"--reference-steps {ref_steps}: give at least 1 timed step for each node's reference runs")
    check_can_run(args, "scaling")
    user = parse_overrides(list(args.overrides or []))
    peers = parse_peers(getattr(args, "backends", None), args.device, getattr(args, "throttle", None) is not None)
    nodes = plan_nodes(args)
    throttle = parse_throttle(getattr(args, "throttle", None), len(nodes))
    profiled = int(getattr(args, "profile", 0) or 0)
    if profiled < 0:
        raise ConfigError("--profile N: give how many steps to record (0: none)")
    rounds = parse_runs(getattr(args, "runs", None), throttle is not None, profiled)
    # Profiled steps come after the warm-up and before the timed steps (the profiler slows them).
    n, total = len(nodes), steps + warmup + profiled
    # epochs = total: every epoch has at least one step, so max_steps is what stops each run.
    timing = {"trainer.max_steps": str(total), "trainer.epochs": str(total), "trainer.log_every": str(total),
              "trainer.timing_warmup_steps": str(warmup), "trainer.profile_steps": str(profiled),
              "trainer.device": args.device, "trainer.resume": "none"}
    # With a throttle, the fleet's history has a samples/s row per step (one more tiny all_reduce
    # per step: the loss's weighted mean).
    fleet_timing = dict(timing, **{"trainer.log_every": "1"}) if throttle else timing
    ref_total = ref_steps + warmup + profiled  # the single-node references (--reference-steps)
    ref_timing = dict(timing, **{"trainer.max_steps": str(ref_total), "trainer.epochs": str(ref_total),
                                 "trainer.log_every": str(ref_total)})
    cfg = _compose(_overrides(DEFAULTS, user, timing, {"cluster": "pro_air", "cluster.nodes": str(n)},
                              codec_overrides(codecs[0])))
    if cfg.cluster.weight == "auto":
        raise ConfigError("cluster.weight=auto: give the fleet's shares as cluster.weights=[...] so each node's "
                          "local batch is known")
    batch = int(cfg.trainer.batch_size)
    weights = [float(w) for w in cfg.cluster.weights] if cfg.cluster.weights else [1.0] * n
    if len(weights) != n:
        raise ConfigError(f"cluster.weights has {len(weights)} values for --nodes {n}: give one per node")
    from macfleet.sampler import split_counts  # torch: only once the options are known to be good

    local = split_counts(batch, weights)
    choices = cfg.hydra.runtime.choices
    link = ("veth" + (f" shaped to {args.rate}" if args.rate else "")) if args.netns else "loopback"
    setup = {"type": "scaling", "model": choices.model, "dataset": choices.dataset, "global_batch": batch,
             "steps": steps, "reference_steps": ref_steps, "warmup_steps": warmup, "device": args.device, "link": link}

    bench, logs = bench_dir("macfleet-scaling-")
    data = {}
    synthetic = ""
    if cfg.dataset.get("_target_") == "macfleet.data.cifar10.build":
        from macfleet.data.cifar10 import write_cifar_format

        # Synthetic images in CIFAR-10's own file format, enough for one epoch: never a download.
        write_cifar_format(bench / "data", train_per_batch=math.ceil(batch * total / 5), test_size=64)
        data = {"dataset.root": str(bench / "data"), "dataset.download": "false", "dataset.verify_checksums": "false"}
        synthetic = " (synthetic CIFAR-format images)"
    console.print(f"[bold]scaling[/bold]: {choices.model} on {choices.dataset}{synthetic}, global batch {batch} "
                  f"(node shares {local}), {args.device}, {n} nodes on {link}; {steps} timed steps after "
                  f"{warmup} warm-up" + (f" ({ref_steps} in each node's references)" if ref_steps != steps else ""))
    for node in nodes:
        console.print(f"  {node.describe()}")
    if peers:
        console.print(f"  peers: {', '.join(peers)} (train.py cluster=torchrun, compression none, on the same nodes)")
        if any(p.startswith("nccl") for p in peers):
            console.print("  nccl " + ("through the link, as between machines (P2P and shared memory off)" if args.netns
                                       else "between the GPUs directly (P2P), as GPUs of one machine; --netns sends "
                                            "its bytes through the link"))
    if throttle:
        console.print(f"  throttle: node {throttle.node} to {throttle.quota:g} of its cores {throttle.when()}, "
                      f"in every fleet run")

    py, train = sys.executable, str(ROOT / "train.py")

    def single(node: Node, b: int, label: str) -> Run:
        run = Run(label, bench / label)
        argv = [py, train, *_overrides(DEFAULTS, user, data, ref_timing, {
            "cluster": "single", "compression": "none", "trainer.batch_size": str(b), "hydra.run.dir": str(run.out)})]
        run.procs.append((node, argv, node.env()))
        return run

    gpus = [nd.gpu for nd in nodes]
    # Each node's references run beside the other nodes' (own cores, as separate machines), unless
    # nodes share a GPU: then one at a time.
    side_by_side = args.device == "cpu" or (None not in gpus and len(set(gpus)) == n)
    with removed_unless_failed(bench, console) as keep:
        with CpuQuotas(nodes, also=(throttle.node,) if throttle else ()) as quotas, \
                (_namespaces(nodes, args) if args.netns else contextlib.nullcontext()):
            alone, compute = [], []
            for label, size, sink in (("alone", lambda nd: batch, alone), ("local", lambda nd: local[nd.index], compute)):
                runs = [single(nd, size(nd), f"node{nd.index}-{label}-b{size(nd)}") for nd in nodes]
                for group in ([runs] if side_by_side else [[r] for r in runs]):
                    got = _wait(group, logs, console)
                    sink.extend(got)
                    for r, m in zip(group, got):
                        console.print(f"  {r.label}: {m['samples_per_s']:.1f} samples/s, step {1e3 * m['step_s']:.2f} ms")
            ideal = sum(a["samples_per_s"] for a in alone)
            if throttle:  # the throttled node alone at its throttled quota: its part of the ideal after
                slow = nodes[throttle.node]
                quotas.set(slow, throttle.quota)
                try:
                    r = single(slow, batch, f"node{slow.index}-alone-b{batch}-throttled")
                    throttled = _wait([r], logs, console)[0]
                finally:
                    quotas.set(slow, slow.quota)
                ideal_after = ideal - alone[slow.index]["samples_per_s"] + throttled["samples_per_s"]
                console.print(f"  {r.label}: {throttled['samples_per_s']:.1f} samples/s at {throttle.quota:g} of its "
                              f"cores; ideal after the throttle {ideal_after:.1f} samples/s")
            peer_user = peer_overrides(user)
            peer_all, peers_failed = {p: [] for p in peers}, {}
            fleet_all: dict[str, list[dict]] = {c: [] for c in codecs}
            fleets, after = {}, {}
            # --runs: every peer and codec once a round, in the same order each round, so a host
            # that drifts during the benchmark weighs on all of them alike.
            for rnd in range(rounds):
                tag = f"-run{rnd + 1}" if rounds > 1 else ""
                for j, peer in enumerate(peers):
                    if peer in peers_failed:
                        continue
                    run = peer_run(bench / f"torchrun-{run_label(peer)}{tag}", nodes, peer, rnd * len(peers) + j,
                                   args.netns, [DEFAULTS, peer_user, data, timing])
                    m = wait_peer(run, logs, console, keep)
                    if isinstance(m, str):
                        peers_failed[peer] = m
                        continue
                    peer_all[peer].append(m)
                    console.print(f"  {run.label}: {m['samples_per_s']:.1f} samples/s, "
                                  f"step {1e3 * m['step_s']:.2f} ms, efficiency {m['samples_per_s'] / ideal:.2f}")
                for k, codec in enumerate(codecs):
                    run = fleet_run(bench / f"fleet-{run_label(codec)}{tag}", nodes, codec, rnd * len(codecs) + k,
                                    args.netns, [DEFAULTS, user, data, fleet_timing])
                    if not throttle:
                        m = _wait([run], logs, console)[0]
                        fleet_all[codec].append(m)
                    else:
                        watch = Throttler(throttle, nodes, quotas, run, str(cfg.cluster.name),
                                          logs / f"{run.label}-watch.log")
                        try:
                            m = fleets[codec] = _wait([run], logs, console, tick=watch.tick)[0]
                        finally:
                            watch.close()
                        watch.check()
                        history = json.loads((run.out / "history.json").read_text())
                        after[codec] = {"throttle_step": watch.at_step,
                                        "throttle_s": round(watch.at_t - watch.first_t, 3),
                                        **throttle_figures(history, watch.at_step, warmup, ideal_after)}
                    console.print(f"  {run.label}: {m['samples_per_s']:.1f} samples/s, step {1e3 * m['step_s']:.2f} ms, "
                                  f"efficiency {m['samples_per_s'] / ideal:.2f}")
                    stall = stalled(m)
                    if stall:
                        console.print(f"    [yellow]{stall}[/yellow]", highlight=False)
                    if m.get("compression_auto_reason"):  # why auto ran what it ran, as its train.log says
                        console.print(f"    {m['compression_auto_reason']}", highlight=False, soft_wrap=True)
                    if throttle:
                        console.print(f"    throttled at step {watch.at_step} ({after[codec]['throttle_s']:.1f} s): "
                                      f"{_recovery(after[codec])}")
                        for e in after[codec]["codec_events"]:  # compression=auto deciding again
                            console.print(f"    step {e['step']}: {e['event']}")

            if profiled:
                kept = keep_profiles(bench, Path("outputs") / f"benchmark-profile-{time.strftime('%Y-%m-%d_%H-%M-%S')}")
                console.print(f"  profiles (a trace and an op table per rank and run): {kept}")

    # A peer that failed in any round is left out: its line says why (see wait_peer).
    peer_runs = {p: median_run(ms) for p, ms in peer_all.items() if ms and p not in peers_failed}
    if not throttle:
        fleets = {c: median_run(ms) for c, ms in fleet_all.items()}
    rows = [{**scaling_row(setup, "1 node", "none", nodes[:1], [batch], alone[0], alone[:1], alone[:1], alone[0]),
             **runs_of(alone[:1])}]
    rows += [{**scaling_row(setup, "torchrun", "none", nodes, local, m, alone, compute, alone[0]),
              "backend": p, **runs_of(peer_all[p])} for p, m in peer_runs.items()]
    rows += [{**scaling_row(setup, "fleet", c, nodes, local, fleets[c], alone, compute, alone[0]), "backend": "macfleet",
              "vs_peers": {p: fleets[c]["samples_per_s"] / m["samples_per_s"] for p, m in peer_runs.items()},
              "peers_failed": peers_failed, **runs_of(fleet_all[c] or [fleets[c]])} for c in codecs]
    if profiled:  # rank 0's profile of each run, the compute references included
        for r, m in zip(rows, [alone[0], *peer_runs.values(), *(fleets[c] for c in codecs)]):
            r["profile"] = m.get("profile")
        rows_local = [{**scaling_row(setup, "node alone", "none", [nd], [local[nd.index]], c, alone, compute,
                                     alone[0]), "node": nd.index, "profile": c.get("profile")}
                      for nd, c in zip(nodes, compute)]
        console.print(profile_table(rows, rows_local))
        for line in comm_lines(rows):
            console.print(line, highlight=False, soft_wrap=True)
    if not throttle:
        report(console, args, rows, scaling_table, plot_scaling)
        for line in verdict(rows) + ceiling_lines(rows) + spread_lines(rows):
            console.print(line, highlight=False, soft_wrap=True)
        return 0
    from rich.console import Group

    asked = {"node": throttle.node, "quota": throttle.quota, "seconds": throttle.seconds, "step": throttle.step}
    for r in rows:
        fleet = r["run"] == "fleet"
        r.update({"throttle": asked, "adapt_shares": bool(cfg.cluster.get("adapt_shares", False)) if fleet else None,
                  "throttled_single_samples_per_s": throttled["samples_per_s"],
                  "ideal_after_samples_per_s": ideal_after if fleet else None,
                  **(after[r["codec"]] if fleet else dict.fromkeys(THROTTLE_KEYS)), })
        if not fleet:
            r.update(curve=[], share_events=[], codec_events=[])
    report(console, args, rows, lambda rs: Group(scaling_table(rs), throttle_table(rs)), plot_throttle)
    return 0


# Per-run figures of a --throttle (None in the 1-node row), beside "curve" and "share_events".
THROTTLE_KEYS = ("throttle_step", "throttle_s", "before_samples_per_s", "final_samples_per_s", "steps_to_recover",
                 "steps_after_throttle", "slowed")


def _recovery(r: dict) -> str:
    if r.get("slowed") is False:
        return (f"{_opt(r['before_samples_per_s'])} samples/s before, {_opt(r['final_samples_per_s'])} at the end; "
                f"no dip to recover from: every {RECOVER_WINDOW} steps after it were within "
                f"{RECOVER_WITHIN:.0%} of the ideal after")
    got = (f"back within {RECOVER_WITHIN:.0%} of the ideal after {r['steps_to_recover']} steps"
           if r["steps_to_recover"] is not None else f"not within {RECOVER_WITHIN:.0%} of the ideal within "
                                                     f"{r['steps_after_throttle']} steps")
    return f"{_opt(r['before_samples_per_s'])} samples/s before, {_opt(r['final_samples_per_s'])} at the end; {got}"


def _opt(v: float | None) -> str:
    return "-" if v is None else _rate(v)


def report(console, args, rows: list[dict], table, plot) -> None:
    """Print `table(rows)`, write the rows to --json and `plot(rows, path)` to --plot."""
    console.print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
        console.print(f"wrote {len(rows)} rows to {args.json}")
    if args.plot:
        plot(rows, args.plot)
        console.print(f"wrote {args.plot}")


def fleet_run(out: Path, nodes: list[Node], codec: str, k: int, netns: bool, layers: list[dict]) -> Run:
    """The fleet's `k`-th run: train.py on every node as the README's two-Mac flow starts it
    (node 0 the master, writing `out`), with the override `layers` and `codec`."""
    n = len(nodes)
    if netns:  # every namespace has its own ports; a fresh pair per run skips TIME_WAIT. Below
        # the kernel's ephemeral range (32768-60999), where a node's random heartbeat port or an
        # outgoing connection of an earlier run could hold one.
        addrs, ports = [f"10.0.0.{i + 1}" for i in range(n)], [20051 + 2 * k] + [20052 + 2 * k] * n
    else:
        from macfleet.comm.launch import free_ports

        addrs, ports = ["127.0.0.1"] * n, free_ports(1 + n)
    run = Run(out.name, out)
    token = secrets.token_hex(16)  # in the environment only, as on two Macs; never on disk
    for node in nodes:
        role = {"cluster": "pro_air", "cluster.role": "master" if node.index == 0 else "worker",
                "cluster.nodes": str(n), "cluster.master_addr": addrs[0], "cluster.master_port": str(ports[0]),
                "cluster.tensor_port": str(ports[1 + node.index]), **codec_overrides(codec)}
        if not netns:
            role["cluster.host"] = "127.0.0.1"  # the master listens on loopback only
        # Every node's run folder under the benchmark's (train.log, a --profile's traces).
        role["hydra.run.dir"] = str(out if node.index == 0 else out / f"node{node.index}")
        env = dict(node.env(), MACFLEET_TOKEN=token, MACFLEET_RANK=str(node.index))
        run.procs.append((node, [sys.executable, str(ROOT / "train.py"), *_overrides(*layers, role)], env))
    return run


def peer_overrides(user: dict) -> dict:
    """The user's overrides for a peer's run: the user's cluster.* settings are the fleet's engine;
    torchrun's job takes only the shares (cluster.weights)."""
    return {k: v for k, v in user.items() if not k.lstrip("+~").startswith("cluster.")
            or k.lstrip("+~") == "cluster.weights"}


def peer_run(out: Path, nodes: list[Node], peer: str, j: int, netns: bool, layers: list[dict]) -> Run:
    """Peer `j`: the same job on a stock backend, as a user scales it out with torchrun: one
    `torchrun --nnodes N --node-rank i` per node (in its namespace, on its cores and GPU), rank 0
    on node 0 writing `out`; `peer` is a --backends item (engine settings of macfleet in env)."""
    from macfleet.benchmark.ddp import backend_spec

    name, variant = backend_spec(peer)
    n = len(nodes)
    if netns:
        addr, port = "10.0.0.1", 20151 + j
    else:
        from macfleet.comm.launch import free_ports

        addr, port = "127.0.0.1", free_ports(1)[0]
    run = Run(out.name, out, own_group=True)
    for node in nodes:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(n), "--node-rank", str(node.index),
                    "--nproc-per-node", "1", "--master-addr", addr, "--master-port", str(port)]
        role = {"cluster": "torchrun", "cluster.backend": name, "compression": "none",
                "hydra.run.dir": str(out if node.index == 0 else out / f"node{node.index}")}
        dev = node.dev or "lo"  # gloo's and nccl's sockets on the node's own link
        env = dict(node.env(), GLOO_SOCKET_IFNAME=dev, NCCL_SOCKET_IFNAME=dev, **variant)
        if netns:  # nccl's bytes through the link too, as between machines: no GPU-to-GPU copies
            env.update(NCCL_P2P_DISABLE="1", NCCL_SHM_DISABLE="1")
        run.procs.append((node, [*torchrun, str(ROOT / "train.py"), *_overrides(*layers, role)], env))
    return run


def wait_peer(run: Run, logs: Path, console, keep: dict) -> dict | str:
    """A peer's run: its metrics, or, when it failed, its error line (printed; `keep` of
    removed_unless_failed keeps the folder for its log). A peer is a reference: the fleet's
    runs go on without it."""
    try:
        return _wait([run], logs, console)[0]
    except MacFleetError as exc:
        keep["why"] = "a peer failed: its log is there"
        console.print(f"  [yellow]{exc}; the fleet runs without this peer[/yellow]", highlight=False, soft_wrap=True)
        return str(exc)


def _namespaces(nodes: list[Node], args):
    """The namespaces of comm/launch.py, one per node: node i at 10.0.0.i+1."""
    from macfleet.comm.launch import Netns

    ns = Netns(len(nodes), rate=args.rate, prefix="mf-scale")
    for node, name, dev in zip(nodes, ns.names, ns.devs):
        node.netns, node.dev = name, dev
    return ns


STALL_FACTOR = 3.0
"""A timed step this many times the mean step is called out: a stall that the mean hides."""


def stalled(m: dict) -> str:
    """A line on a run's slowest timed step when it took over STALL_FACTOR x the mean (its
    metrics.json), else ''."""
    worst, mean = m.get("step_max_s") or 0.0, m.get("step_s") or 0.0
    if mean <= 0 or worst <= STALL_FACTOR * mean or m.get("timed_steps", 0) < 2:
        return ""
    return (f"step {m.get('step_max_at')} took {1e3 * worst:.1f} ms, {worst / mean:.1f}x the mean step: a stall on "
            "some node, inside the figures above (its train.log says more; --steps N spreads it)")


def scaling_row(setup: dict, run: str, codec: str, used: list[Node], batches: list[int], m: dict,
                alone: list[dict], compute: list[dict], one_node: dict) -> dict:
    """One JSON row: run `m` of the nodes `used`, beside their own runs alone at the global batch
    (`alone`) and at their local batches (`compute`)."""
    single = [a["samples_per_s"] for a in alone]
    compute_s = [c["step_s"] for c in compute]
    staging = m.get("staging_s")
    return {**setup, "run": run, "codec": codec, "nodes": len(used), "local_batches": batches,
            "cores": [len(nd.cores) for nd in used], "cpu_quota": [nd.quota for nd in used],
            "samples_per_s": m["samples_per_s"], "step_s": m["step_s"], "step_max_s": m.get("step_max_s"),
            "one_node_samples_per_s": one_node["samples_per_s"], "single_samples_per_s": single,
            "ideal_samples_per_s": sum(single), "speedup": m["samples_per_s"] / one_node["samples_per_s"],
            "efficiency": m["samples_per_s"] / sum(single), "compute_s": compute_s,
            "comm_wait_s": [m["step_s"] - c for c in compute_s],
            # The engine reports a total over the run's steps, as it does bytes_sent.
            "staging_s": staging / m["steps"] if staging is not None else None,
            "wire_ratio": m.get("wire_ratio"), "data_workers": m.get("data_workers"), "backend": None, "vs_peers": None,
            "peers_failed": None,
            # The most these nodes can give with the exchange free: every step as long as the
            # slowest node's own step at its share (the references ran side by side).
            "ceiling_samples_per_s": setup["global_batch"] / max(compute_s) if len(used) > 1 else None}


def verdict(rows: list[dict]) -> list[str]:
    """What to try when a fleet run came out slower than one node, from the figures of the table:
    where that run's step went (the slowest node's compute at its share, the rest waiting on the
    exchange), then the fastest codec run here, or a larger batch when every one is slower."""
    fleets = [r for r in rows if r["run"] == "fleet"]
    lines = peer_lines(rows)
    slow = [r for r in fleets if r["speedup"] < 1.0]
    if not slow:
        return lines
    for r in slow:
        compute = max(r["compute_s"])
        lines.append(f"fleet {r['codec']} is {r['speedup']:.2f}x one node: each node alone at its share takes at most "
                     f"{1e3 * compute:.1f} ms a step, and the other {1e3 * max(0.0, r['step_s'] - compute):.1f} ms of "
                     f"the fleet's {1e3 * r['step_s']:.1f} ms step go to the gradient exchange and waiting for it.")
    best = max(fleets, key=lambda r: r["speedup"])
    batch = rows[0]["global_batch"]
    if best["speedup"] >= 1.0:
        lines.append(f"compression={best['codec']} was the fastest here ({best['speedup']:.2f}x one node); "
                     "compression=auto picks a codec from the link and the model at the start of a run.")
    else:
        peers = [r for r in rows if r["run"] == "torchrun"]
        who = ("Every codec run here, and the same job on " + " and ".join(r["backend"] for r in peers) + ","
               if peers and all(r["speedup"] < 1.0 for r in peers) else "Every codec run here")
        lines.append(f"{who} is slower than one node at a global batch of {batch}: each node's "
                     f"step is too short to hide the exchange. A larger batch (trainer.batch_size={2 * batch}) "
                     "gives every step more compute to overlap it; compression=auto picks a codec from the link "
                     "and the model.")
    return lines


def ceiling_lines(rows: list[dict]) -> list[str]:
    """How far the fleet is from what its nodes allow: the samples/s with the exchange free (the
    slowest node's own step at its share sets the pace), and the fastest codec's share of it."""
    fleets = [r for r in rows if r["run"] == "fleet" and r.get("ceiling_samples_per_s")]
    if not fleets:
        return []
    best = max(fleets, key=lambda r: r["samples_per_s"])
    ceiling = best["ceiling_samples_per_s"]
    return [f"With the exchange free, these nodes would reach {ceiling:.0f} samples/s "
            f"({ceiling / best['one_node_samples_per_s']:.2f}x one node): the slowest alone at its share takes "
            f"{1e3 * max(best['compute_s']):.1f} ms a step. The fastest codec here, {best['codec']}, "
            f"reached {best['samples_per_s'] / ceiling:.0%} of that."]


CLOSE = 0.05
"""Fleet codecs within this fraction of the fastest, one run each, cannot be told apart (see --runs)."""


def spread_lines(rows: list[dict]) -> list[str]:
    """Whether the fleet's codecs can be told apart: one run each within CLOSE of the fastest
    (then --runs gives each a range), or with --runs, whether the fastest's runs overlap others'."""
    fleets = [r for r in rows if r["run"] == "fleet"]
    if len(fleets) < 2:
        return []
    best = max(fleets, key=lambda r: r["samples_per_s"])
    others = [r for r in fleets if r is not best]

    def each(r: dict) -> list[float]:
        return list(r.get("runs_samples_per_s") or [r["samples_per_s"]])

    if len(each(best)) < 2:
        close = [r["codec"] for r in others if r["samples_per_s"] >= (1 - CLOSE) * best["samples_per_s"]]
        if not close:
            return []
        return [f"fleet {best['codec']} and {', '.join(close)} are within {CLOSE:.0%} of each other in one run each: "
                "runs on one host can move by 10% or more from one to the next, so --runs 3 gives each a range "
                "before you choose."]
    lo, hi = min(each(best)), max(each(best))
    overlap = [r["codec"] for r in others if max(each(r)) >= lo]
    if not overlap:
        return [f"fleet {best['codec']} was the fastest codec in each of its {len(each(best))} runs: its slowest "
                f"({_rate(lo)} samples/s) beat every other codec's fastest."]
    return [f"fleet {best['codec']} has the best median, but its runs ({_rate(lo)}-{_rate(hi)} samples/s) overlap "
            f"those of {', '.join(overlap)}: these runs do not tell them apart."]


def peer_lines(rows: list[dict]) -> list[str]:
    """The fleet beside the stock backends of the same benchmark: one line per codec run."""
    peers = [r for r in rows if r["run"] == "torchrun"]
    failed = next((r.get("peers_failed") for r in rows if r["run"] == "fleet" and r.get("peers_failed")), {})
    lines = [f"No figure for torchrun {b}: its run failed ({why})." for b, why in failed.items()]
    if not peers:
        return lines
    ref = ", ".join(f"torchrun {p['backend']} {p['speedup']:.2f}x" for p in peers)
    lines.append(f"The same job under torchrun on the same nodes (compression none): {ref} one node.")
    for r in rows:
        if r["run"] == "fleet" and r["vs_peers"]:
            lines.append(f"fleet {r['codec']}: " + ", ".join(f"{v:.2f}x torchrun {b}'s samples/s"
                                                             for b, v in r["vs_peers"].items()) + ".")
    return lines


def run_name(r: dict) -> str:
    """The table's label of a row: `torchrun gloo` for a peer."""
    return f"torchrun {r['backend']}" if r["run"] == "torchrun" else r["run"]


def scaling_table(rows: list[dict]):
    from rich.table import Table

    first = rows[0]
    staging = any(r["staging_s"] is not None for r in rows)
    workers = first.get("data_workers")
    loading = "" if workers is None else f", {workers} DataLoader workers" if workers else ", batches in-process"
    table = Table(title=f"macfleet benchmark --type scaling: {first['model']} on {first['dataset']}, global batch "
                        f"{first['global_batch']}, {first['device']}, {first['link']}{loading}",
                  caption="ideal: the sum of each node's own samples/s at the global batch; compute: each node "
                          "alone at its local batch; comm wait: the run's step - compute (node 0 / node 1 / ...)")
    rounds = max(r.get("runs") or 1 for r in rows)
    cols = ["run", "codec", "samples/s"] + (["runs (min-max)"] if rounds > 1 else []) + \
        ["vs 1 node", "ideal", "efficiency", "step ms", "compute ms", "comm wait ms"]
    for col in cols + (["staging ms"] if staging else []) + ["wire"]:
        table.add_column(col, justify="left" if col in ("run", "codec") else "right")

    def ms(values: list[float]) -> str:
        return " / ".join(f"{1e3 * v:.1f}" for v in values)

    for r in rows:
        cells = [run_name(r), r["codec"], _rate(r["samples_per_s"])]
        if rounds > 1:
            each = r.get("runs_samples_per_s") or []
            cells.append(f"{len(each)}: {_rate(min(each))}-{_rate(max(each))}" if len(each) > 1 else "-")
        cells += [f"{r['speedup']:.2f}x", _rate(r["ideal_samples_per_s"]), f"{r['efficiency']:.2f}", ms([r["step_s"]]),
                  ms(r["compute_s"]), ms(r["comm_wait_s"]) if r["run"] != "1 node" else "-"]
        if staging:
            cells.append(ms([r["staging_s"]]) if r["staging_s"] is not None else "-")
        cells.append(f"{100 * r['wire_ratio']:.1f}%" if r["wire_ratio"] is not None else "-")
        table.add_row(*cells)
    return table


def keep_profiles(bench: Path, dest: Path) -> Path:
    """Copy every run's profile/ folder out of the benchmark's temporary folder (removed at its
    end) to dest/<run>/ (a fleet's node i>0 under dest/<run>-node<i>/; a torchrun rank i>0 writes
    into its working folder, <run>-node<i>.cwd)."""
    for folder in sorted(bench.glob("**/profile")):
        run = folder.parent.relative_to(bench)
        shutil.copytree(folder, dest / "-".join(run.parts).removesuffix(".cwd"), dirs_exist_ok=True)
    return dest


def profile_table(rows: list[dict], local: list[dict]):
    """--profile: where rank 0's step goes in each run (host time per part, the device's busy
    time), each node alone at its share first: the fleet's step beside the same node's compute."""
    from rich.table import Table

    from macfleet.profile import PHASES

    table = Table(title="where a step goes (rank 0, torch.profiler, ms a step; each node alone at its share first)",
                  caption="backward includes the gradient exchange under PyTorch DDP; between: the loop outside "
                          "train_step; device busy: the union of kernels and copies on the device")
    for col in ("run", "codec", "local batch", "step", *PHASES, "between", "device busy", "launches", "us/launch"):
        table.add_column(col, justify="left" if col in ("run", "codec") else "right")
    for r in local + rows:
        p = r.get("profile")
        if not p:
            continue
        label = f"node {r['node']} alone" if "node" in r else run_name(r)
        busy = ("-" if p.get("device_busy_s") is None else
                f"{1e3 * p['device_busy_s']:.1f} ({100 * p['device_busy']:.0f}%)")
        table.add_row(label, r["codec"], str(r["local_batches"][0]), f"{1e3 * p['step_s']:.1f}",
                      *(f"{1e3 * p['phases_s'][k]:.1f}" if k in p["phases_s"] else "-" for k in PHASES),
                      f"{1e3 * p['between_steps_s']:.1f}", busy,
                      "-" if not p.get("launches_per_step") else f"{p['launches_per_step']:,.0f}",
                      "-" if not p.get("launch_us") else f"{p['launch_us']:.1f}")
    return table


def comm_lines(rows: list[dict]) -> list[str]:
    """--profile: the comm threads' time per step in each fleet run (rank 0): each collective's
    time summed over the lanes that ran one, the staging waits inside it, the landings."""
    lines = []
    for r in rows:
        spans = (r.get("profile") or {}).get("comm_s")
        if spans:
            lines.append(f"  {run_name(r)} {r['codec']}: " + ", ".join(f"{k[5:]} {1e3 * v:.1f}" for k, v in spans.items()))
    if lines:
        lines.insert(0, "comm threads, ms a step (rank 0; collectives summed over lanes, staging waits inside them, "
                        "landings):")
    return lines


def _rate(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def plot_scaling(rows: list[dict], path: str) -> None:
    """Fleet samples/s per codec as bars, node 0 alone and the ideal as lines, efficiency on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fleet = [r for r in rows if r["run"] == "fleet"]
    peers = [r for r in rows if r["run"] == "torchrun"]
    fig, ax = plt.subplots(figsize=(1.6 * (len(fleet) + len(peers)) + 3, 4))
    if peers:  # the stock backends first, greyed: the references
        stock = ax.bar([run_name(r) for r in peers], [r["samples_per_s"] for r in peers], color="tab:gray",
                       hatch="//", label="the same job under torchrun")
        for bar, r in zip(stock, peers):
            ax.annotate(f"{r['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2, _top(r)),
                        ha="center", va="bottom", fontsize=9)
    bars = ax.bar([r["codec"] for r in fleet], [r["samples_per_s"] for r in fleet], color="tab:blue",
                  label="the fleet, per codec")
    ax.axhline(rows[0]["samples_per_s"], color="tab:gray", linestyle="--", label="1 node (node 0 alone)")
    ax.axhline(fleet[0]["ideal_samples_per_s"], color="tab:green", linestyle=":", label="ideal (sum of nodes alone)")
    for bar, r in zip(bars, fleet):
        ax.annotate(f"{r['efficiency']:.0%} eff.\n{r['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2, _top(r)),
                    ha="center", va="bottom", fontsize=9)
    ranged = [(bar, r) for bar, r in zip(list(stock if peers else []) + list(bars), peers + fleet)
              if len(r.get("runs_samples_per_s") or []) > 1]
    for k, (bar, r) in enumerate(ranged):  # --runs: each bar's range of runs, capped
        each, mid = r["runs_samples_per_s"], r["samples_per_s"]
        ax.errorbar(bar.get_x() + bar.get_width() / 2, mid, yerr=[[mid - min(each)], [max(each) - mid]], fmt="none",
                    ecolor="black", capsize=5, label=f"range of {len(each)} runs (bar: the median run)" if k == 0 else None)
    ax.set_ylabel("samples/s")
    ax.set_ylim(0, 1.25 * max([fleet[0]["ideal_samples_per_s"]] + [r["samples_per_s"] for r in fleet + peers]
                              + [v for r in fleet + peers for v in r.get("runs_samples_per_s") or []]))
    _save_plot(fig, ax, path, f"{fleet[0]['nodes']} nodes vs 1", rows[0], "upper right")


def _top(r: dict) -> float:
    """Where a bar's label goes: above its bar and above its range of runs."""
    return max([r["samples_per_s"]] + list(r.get("runs_samples_per_s") or []))


def _save_plot(fig, ax, path: str, what: str, first: dict, legend: str) -> None:
    """Title (`what`: the run's model, dataset, batch and link), legend, PNG; the figure closed."""
    import matplotlib.pyplot as plt

    ax.set_title(f"{what}: {first['model']} on {first['dataset']}, batch {first['global_batch']}, {first['link']}",
                 fontsize=10)
    ax.legend(loc=legend, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def throttle_table(rows: list[dict]):
    """The fleet runs around the throttle: before it, the ideal after it, the end, the recovery."""
    from rich.table import Table

    t = rows[0]["throttle"]
    when = f"{t['seconds']:g} s after the first step" if t["step"] is None else f"at step {t['step']}"
    table = Table(title=f"throttle: node {t['node']} to {t['quota']:g} of its cores {when} (alone there: "
                        f"{_rate(rows[0]['throttled_single_samples_per_s'])} samples/s)",
                  caption=f"before: the median samples/s of the timed steps before the throttle, beside the ideal; "
                          f"ideal after: the sum of each node alone at its quota after the throttle; end: the median "
                          f"of the last {RECOVER_WINDOW} steps; recovered: steps after the throttle until the moving "
                          f"median of {RECOVER_WINDOW} steps is within {RECOVER_WITHIN:.0%} of the ideal after")
    for col in ("run", "codec", "shares", "at step", "at s", "before", "ideal", "eff. before", "ideal after", "end",
                "eff. end", "recovered", "share moves"):
        table.add_column(col, justify="left" if col in ("run", "codec", "shares") else "right")
    for r in rows:
        if r["run"] != "fleet":
            continue
        eff = (lambda v, ideal: f"{v / ideal:.2f}" if v is not None else "-")
        recovered = ("no dip" if r.get("slowed") is False else f"{r['steps_to_recover']} steps"
                     if r["steps_to_recover"] is not None else f"not within {r['steps_after_throttle']} steps")
        table.add_row(r["run"], r["codec"], "adaptive" if r["adapt_shares"] else "fixed", str(r["throttle_step"]),
                      f"{r['throttle_s']:.1f}", _opt(r["before_samples_per_s"]), _rate(r["ideal_samples_per_s"]),
                      eff(r["before_samples_per_s"], r["ideal_samples_per_s"]), _rate(r["ideal_after_samples_per_s"]),
                      _opt(r["final_samples_per_s"]), eff(r["final_samples_per_s"], r["ideal_after_samples_per_s"]),
                      recovered, str(len(r["share_events"])))
    return table


def plot_throttle(rows: list[dict], path: str) -> None:
    """The fleet's samples/s against step per codec, its throttle marked, the ideals as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fleet = [r for r in rows if r["run"] == "fleet"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, r in enumerate(fleet):
        color = f"C{i}"
        ax.plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], color=color, linewidth=1, label=r["codec"])
        ax.axvline(r["throttle_step"], color=color, linestyle="--", linewidth=0.8)
        for e in r["share_events"]:
            ax.plot(e["step"], 0, marker="^", color=color, clip_on=False)
    ax.axhline(fleet[0]["ideal_samples_per_s"], color="tab:green", linestyle=":", label="ideal before")
    ax.axhline(fleet[0]["ideal_after_samples_per_s"], color="tab:red", linestyle=":", label="ideal after")
    t = rows[0]["throttle"]
    ax.set_xlabel("step (dashed: the throttle; triangles: share moves)")
    ax.set_ylabel("samples/s")
    ax.set_ylim(bottom=0)
    _save_plot(fig, ax, path, f"node {t['node']} throttled to {t['quota']:g} of its cores", rows[0], "lower left")
