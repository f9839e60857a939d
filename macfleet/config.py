"""Typed configs. Each component owns its dataclass; values live in YAML under conf/.

The dataclasses double as the Python API (`TrainingConfig`, `ClusterConfig`) and as Hydra
structured-config schemas (registered in `register_configs`), so a typo or a wrong type in a
command-line override fails before anything starts.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from macfleet.errors import ConfigError

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change to the wire or control protocol."""

COMPRESSION_NAMES = ("none", "fp16", "int8", "topk", "topk_fp16", "auto")
"""Codec names; "auto" is not a codec: the trainer measures the link and backward at start and
picks none, fp16, int8 or topk_fp16 for the run (macfleet/compression/auto.py)."""
ENCODERS = ("auto", "thread", "inline")
"""Where a codec's encoding runs (CompressionConfig.encoder)."""
DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")


class NodeRole(str, enum.Enum):
    """What a node does in the cluster."""

    MASTER = "master"
    WORKER = "worker"
    # Lower-case aliases, so `cluster.role=master` works in Hydra overrides (OmegaConf matches names).
    master = "master"
    worker = "worker"


REDACTED = "<redacted>"
"""What a saved config shows in place of the join token."""
TOKEN_FILE = os.path.join("conf", "local", "secrets.yaml")
"""Git-ignored; `token: ...` in it is the join token when MACFLEET_TOKEN is not set."""


def join_token(explicit: Optional[str] = None) -> Optional[str]:
    """The join token: `explicit` (the Python API), else $MACFLEET_TOKEN (train.py moves a
    `cluster.token=...` override there before Hydra sees it), else `token:` in conf/local/secrets.yaml
    under the working directory or beside this package's conf/. Read when a node starts, so no
    composed config ever holds it."""
    if explicit and explicit != REDACTED:
        return str(explicit)
    if os.environ.get("MACFLEET_TOKEN"):
        return os.environ["MACFLEET_TOKEN"]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for base in dict.fromkeys((os.getcwd(), here)):
        path = os.path.join(base, TOKEN_FILE)
        if os.path.isfile(path):
            from omegaconf import OmegaConf

            token = OmegaConf.load(path).get("token")
            return str(token) if token else None
    return None


def redact_token(tree: dict) -> dict:
    """`tree` (a resolved config as plain dicts) with cluster.token replaced, for what is saved or logged."""
    cluster = tree.get("cluster")
    if isinstance(cluster, dict) and cluster.get("token"):
        tree = dict(tree, cluster=dict(cluster, token=REDACTED))
    return tree


@dataclass
class CompressionConfig:
    """Gradient compression applied per bucket inside the comm hook."""

    name: str = "none"
    """Codec: none | fp16 | int8 | topk | topk_fp16 | auto (chosen at start from the measured link and
    backward time; see macfleet/compression/auto.py)."""
    ratio: float = 0.1
    """Fraction of gradient elements kept by the top-k codecs (0 < ratio <= 1); with auto, the
    largest ratio it may pick."""
    granularity: str = "block"
    """Top-k selection unit: block (`block_size`-element blocks by L2 norm; least index overhead)
    or element (|x|); exact is an alias of element. Selection is exact per parameter either way."""
    block_size: int = 64
    """Elements per block when granularity=block, and per int8 scale."""
    sample_fraction: float = 0.01
    """Unused since selection became exact (sparse payload v2); still accepted so older configs load."""
    error_feedback: bool = True
    """Carry what was not sent into the next step's gradient (lossy codecs only)."""
    momentum_correction: bool = False
    """Deep Gradient Compression's momentum correction (accumulate velocity, not gradient)."""
    momentum: float = 0.9
    """Momentum used by momentum correction."""
    warmup_steps: int = 0
    """Sparsity warm-up: ratio ramps exponentially from 1.0 to `ratio` over this many steps."""
    topk_steps: float = 2.0
    """compression=auto only: how many steps a top-k step at 10% counts when auto weighs it
    against a codec that sends every value (top-k's extra steps to the same accuracy; sparser
    ratios count more, x sqrt(10% / ratio)). 2 was measured on digits; set 1 where top-k is known
    to cost your model no accuracy, and auto weighs samples/s alone at 10%."""
    encoder: str = "auto"
    """Where a codec's encoding runs (fp16, int8, topk, topk_fp16): thread (a thread of its own,
    so backward's hooks only hand each bucket over), inline (in the hook, on backward's thread),
    or auto (thread on CUDA in a fleet, inline otherwise: on MPS two threads running tensor ops
    at once can crash inside Metal, pytorch/pytorch#197805). Results are the same bits."""

    def __post_init__(self) -> None:
        if self.name not in COMPRESSION_NAMES:
            raise ConfigError(
                f"compression.name={self.name!r} is unknown; choose one of {', '.join(COMPRESSION_NAMES)}"
            )
        if not 0.0 < float(self.ratio) <= 1.0:
            raise ConfigError(f"compression.ratio={self.ratio} must be in (0, 1], e.g. 0.1 keeps 10%")
        if self.granularity not in ("block", "element", "exact"):
            raise ConfigError(
                f"compression.granularity={self.granularity!r}: choose block or element (exact = element)"
            )
        if self.block_size < 1:
            raise ConfigError("compression.block_size must be >= 1")
        if not 0.0 < float(self.sample_fraction) <= 1.0:
            raise ConfigError("compression.sample_fraction must be in (0, 1]")
        if isinstance(self.topk_steps, bool) or not isinstance(self.topk_steps, (int, float)) \
                or not 1.0 <= float(self.topk_steps) <= 100.0:
            raise ConfigError(
                f"compression.topk_steps={self.topk_steps!r} must be a number from 1 to 100: how many steps a "
                "top-k step at 10% counts for auto (1: weigh samples/s alone)"
            )
        if self.warmup_steps < 0:
            raise ConfigError("compression.warmup_steps must be >= 0")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"compression.encoder={self.encoder!r}: choose one of {', '.join(ENCODERS)} (auto: a "
                              "thread of its own on CUDA, in backward's hook on CPU and MPS)")

    @property
    def lossy(self) -> bool:
        return self.name in ("int8", "topk", "topk_fp16")


SCHEDULE_NAMES = ("constant", "cosine", "step")


@dataclass
class SchedulerConfig:
    """The learning-rate schedule: a multiplier of the peak LR at every optimizer step."""

    name: str = "cosine"
    """constant | cosine (to 0 at the last step) | step (x0.1 at 50% and again at 75% of the steps)."""
    warmup_steps: int = 0
    """Linear warm-up from 1/warmup_steps of the peak LR to the peak over this many steps, before
    the schedule starts."""

    def __post_init__(self) -> None:
        if self.name not in SCHEDULE_NAMES:
            raise ConfigError(f"scheduler.name={self.name!r}: choose {', '.join(SCHEDULE_NAMES)}, e.g. scheduler=step")
        if self.warmup_steps < 0:
            raise ConfigError("scheduler.warmup_steps must be >= 0")


@dataclass
class ClusterConfig:
    """Who trains together and how they find each other."""

    role: Optional[NodeRole] = None
    """master runs the coordinator and is rank 0; worker joins a master. Naming a role means a
    fleet: with `mode` unset it is direct, and the master waits for `nodes` (2 unless set;
    nodes=1 trains alone). Unset: master of a single-process run."""
    master_addr: str = "127.0.0.1"
    """Address of the master (the Thunderbolt bridge IP on Macs, e.g. 10.0.0.1); "auto" finds it
    with zeroconf when discovery_enabled."""
    master_port: int = 50051
    """Control-plane port (coordinator)."""
    tensor_port: int = 50052
    """Data-plane port (gradients)."""
    discovery_enabled: bool = False
    """Advertise / find the master with zeroconf (Bonjour) instead of master_addr."""
    mode: Optional[str] = None
    """single: one process; local: a fleet of `nodes` processes on this machine; direct: this
    process joins a master over the network; agent: the job is sent to running agents; torchrun:
    a rank of a torchrun job, on torch's own backends (see `backend`). Unset: direct when `role`
    is given, else single."""
    nodes: Optional[int] = None
    """How many nodes the master waits for (itself included). Unset: 2 in a fleet, 1 alone."""
    weight: Any = 1.0
    """This node's compute weight (share of the global batch), or 'auto' to calibrate."""
    weights: Optional[list] = None
    """Per-rank weights for a local fleet (overrides `weight`), e.g. [0.62, 0.38]."""
    name: str = "macfleet"
    """Cluster name, advertised by discovery; nodes only join a cluster of their name."""
    token: Optional[str] = None
    """Join token, found at run time (see `join_token`) and never written to a run dir, checkpoint,
    W&B or log."""
    wait_timeout: float = 120.0
    """Seconds the master waits for all nodes, and a worker for its master."""
    heartbeat_interval: float = 1.0
    """Seconds between heartbeats; a node silent for 1.75x this is declared lost (reported within 2x)."""
    comm_timeout: float = 60.0
    """Deadline for one collective before the peer is declared lost."""
    elastic: bool = True
    """A worker that is lost (killed, frozen, cut off) or leaves (a bye, Ctrl-C on that Mac) does
    not end the run: the others drop the step in flight, form the next generation with shares
    recomputed, and redo the step with the same global batch. A node started with the same
    command joins the running fleet at a step boundary. false: any departure stops the run
    (resume from the last checkpoint). The master cannot leave: the run lives on it."""
    adapt_shares: bool = False
    """Each node measures its compute speed (samples/s of its forward passes, smoothed) and the
    shares of the global batch follow them at step boundaries (a move only when some share
    would change by more than 10%, and after 3 votes at the last shares). The union of the
    shards stays the global batch, so N nodes still compute what one process does; the shares
    go into checkpoints. For Macs that throttle (a fanless Air) or differ."""
    min_nodes: int = 1
    """Elastic: fewer nodes than this (the master included) and the run waits, saying so, up to
    `wait_timeout` for nodes to join; then it stops."""
    host: str = "0.0.0.0"
    """Interface the master binds to."""
    ddp: str = "auto"
    """Gradient path: torch (PyTorch DDP's reducer + MacFleet comm hook), flat (all gradients
    through the same hook after backward), auto (torch on cpu/cuda, flat on mps)."""
    bucket_cap_mb: float = 25.0
    """Gradients are exchanged in buckets of at most this many MB (PyTorch DDP's bucket_cap_mb;
    the flat path's buckets too), each one collective started as soon as backward has produced
    it. Smaller buckets start earlier and leave less to exchange after backward ends; each
    costs a collective's fixed overhead."""
    backend: str = "auto"
    """cluster=torchrun only: the torch.distributed backend (auto: nccl on cuda, gloo on cpu;
    or macfleet)."""
    allreduce: str = "auto"
    """all_reduce algorithm for 3+ nodes, chosen by the master for every rank: direct (two rounds,
    every pair of nodes at once: best for a few Macs, a Thunderbolt mesh or a switch), ring
    (neighbours only: for a daisy chain, or many nodes), auto (direct up to 4 nodes, then ring).
    2 nodes: direct sends the whole tensor both ways and each node adds (one round); auto and ring
    exchange halves (each node sums one half and sends it back)."""

    def __post_init__(self) -> None:
        # An explicit role means a fleet (the seed's API: role=MASTER on one Mac, role=WORKER on
        # the other); only a config that names neither role nor mode is one process.
        fleet_by_role = self.role is not None
        if self.role is None:
            self.role = NodeRole.MASTER
        if self.mode is None:
            self.mode = "direct" if fleet_by_role else "single"
        if self.nodes is None:
            self.nodes = 1 if self.mode == "single" else 2
        if isinstance(self.role, str):
            try:
                self.role = NodeRole(self.role.lower())
            except ValueError:
                raise ConfigError(f"cluster.role={self.role!r}: choose master or worker") from None
        if self.mode not in ("single", "local", "direct", "agent", "torchrun"):
            raise ConfigError(f"cluster.mode={self.mode!r}: choose single, local, direct, agent or torchrun")
        if self.backend not in ("auto", "nccl", "gloo", "macfleet"):
            raise ConfigError(f"cluster.backend={self.backend!r}: choose auto, nccl, gloo or macfleet")
        if self.nodes < 1:
            raise ConfigError("cluster.nodes must be >= 1")
        if self.ddp not in ("auto", "torch", "flat"):
            raise ConfigError(f"cluster.ddp={self.ddp!r}: choose auto, torch or flat")
        if not float(self.bucket_cap_mb) > 0:
            raise ConfigError(f"cluster.bucket_cap_mb={self.bucket_cap_mb} must be > 0 (MB per gradient bucket; "
                              "PyTorch DDP's default is 25)")
        if self.allreduce not in ("auto", "ring", "direct"):
            raise ConfigError(f"cluster.allreduce={self.allreduce!r}: choose auto, ring or direct")
        for port_name in ("master_port", "tensor_port"):
            port = getattr(self, port_name)
            if not 0 <= int(port) < 65536:
                raise ConfigError(f"cluster.{port_name}={port} is not a TCP port")
        if self.weight != "auto" and float(self.weight) <= 0:
            raise ConfigError(f"cluster.weight={self.weight} must be > 0 or 'auto'")
        if self.weights is not None and any(float(w) <= 0 for w in self.weights):
            raise ConfigError(f"cluster.weights={list(self.weights)} must all be > 0")
        if self.heartbeat_interval <= 0:
            raise ConfigError("cluster.heartbeat_interval must be > 0")
        if not 1 <= int(self.min_nodes) <= max(1, self.nodes):
            raise ConfigError(f"cluster.min_nodes={self.min_nodes} must be between 1 and cluster.nodes={self.nodes}")
        self.token = join_token(self.token)


@dataclass
class TrainingConfig:
    """How one training run goes. Field names follow the seed's Python API."""

    epochs: int = 10
    """Passes over the training set."""
    batch_size: int = 64
    """Global batch size: the sum over all nodes of their per-step samples."""
    learning_rate: float = 0.05
    """Peak learning rate."""
    compression: str = "none"
    """Gradient codec: none | fp16 | int8 | topk | topk_fp16 | auto."""
    topk_ratio: float = 0.1
    """Fraction kept by the top-k codecs."""
    checkpoint_every: int = 1
    """Write a checkpoint every N epochs (0 disables epoch checkpoints)."""
    device: str = "auto"
    """auto picks mps, then cuda, then cpu."""
    checkpoint_every_steps: int = 0
    """Also write a checkpoint every N optimizer steps (0 disables)."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep."""
    resume: str = "none"
    """none | auto (newest complete checkpoint in checkpoint_dir) | a checkpoint path."""
    checkpoint_dir: Optional[str] = None
    """Where checkpoints go; default <output_dir>/checkpoints."""
    output_dir: Optional[str] = None
    """Run directory for metrics.json and checkpoints; default outputs/<run id>."""
    seed: int = 0
    """Seeds model init, data order and dropout: same seed, same run."""
    eval_batch_size: int = 256
    """Batch size for evaluation."""
    lr_schedule: str = "cosine"
    """constant | cosine | step (x0.1 at 50% and 75%): `SchedulerConfig.name`. train.py's config
    takes it from the scheduler group (`scheduler=step`)."""
    warmup_steps: int = 0
    """Linear LR warm-up steps: `SchedulerConfig.warmup_steps`. train.py's config takes it from the
    scheduler group (`scheduler.warmup_steps=100`)."""
    weight_decay: float = 0.0
    """Optimizer weight decay."""
    momentum: float = 0.9
    """SGD momentum (ignored by AdamW)."""
    optimizer: Optional[str] = "sgd"
    """sgd | adamw: what the trainer builds when no optimizer is passed. Null in train.py's config,
    where the optimizer group builds it (`optimizer=adamw`)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs). Smoke tests use it."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this (0 disables)."""
    log_every: int = 10
    """Log metrics every N steps."""
    timing_warmup_steps: int = 0
    """This process's first N steps are left out of metrics.json's samples_per_s and step_s
    (allocators, kernels and connections warm up). Not the LR warm-up: that is warmup_steps."""
    progress: bool = True
    """Show a progress bar."""
    profile_steps: int = 0
    """Record this many steps with torch.profiler right after the timing warm-up (`macfleet.profile`):
    a trace and a summary per rank under the run folder, rank 0's in metrics.json. Those steps
    are left out of samples_per_s. 0: no profile."""
    num_workers: Union[int, str] = "auto"
    """DataLoader worker processes that fetch and augment batches (0: the training process does;
    results are the same either way). auto: `data.loader.auto_workers` (2 on cuda or mps when
    items are augmented one by one, else 0)."""

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError("trainer.epochs must be >= 0")
        if self.batch_size < 1:
            raise ConfigError("trainer.batch_size must be >= 1")
        if self.learning_rate <= 0:
            raise ConfigError("trainer.learning_rate must be > 0")
        if self.compression not in COMPRESSION_NAMES:
            raise ConfigError(
                f"trainer.compression={self.compression!r}: choose one of {', '.join(COMPRESSION_NAMES)}"
            )
        if self.device not in DEVICE_NAMES:
            raise ConfigError(f"trainer.device={self.device!r}: choose one of {', '.join(DEVICE_NAMES)}")
        if self.lr_schedule not in SCHEDULE_NAMES:
            raise ConfigError(f"trainer.lr_schedule={self.lr_schedule!r}: choose {', '.join(SCHEDULE_NAMES)}")
        if self.warmup_steps < 0:
            raise ConfigError("trainer.warmup_steps must be >= 0")
        if self.optimizer not in (None, "sgd", "adamw"):
            raise ConfigError("trainer.optimizer: choose sgd or adamw")
        if self.keep_checkpoints < 1:
            raise ConfigError("trainer.keep_checkpoints must be >= 1")
        if self.timing_warmup_steps < 0:
            raise ConfigError("trainer.timing_warmup_steps must be >= 0")
        if isinstance(self.profile_steps, bool) or not isinstance(self.profile_steps, int) or self.profile_steps < 0:
            raise ConfigError(f"trainer.profile_steps={self.profile_steps!r}: give how many steps to profile "
                              "(0: none)")
        if isinstance(self.num_workers, bool) or not (
                self.num_workers == "auto" or isinstance(self.num_workers, int) and self.num_workers >= 0):
            raise ConfigError(f"trainer.num_workers={self.num_workers!r}: give auto or a whole number >= 0 "
                              "(DataLoader worker processes)")
        if self.checkpoint_every < 0 or self.checkpoint_every_steps < 0:
            raise ConfigError("trainer.checkpoint_every and checkpoint_every_steps must be >= 0")


@dataclass
class LoggerConfig:
    """Experiment tracking."""

    name: str = "none"
    """none | wandb."""
    project: str = "macfleet"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user)."""
    mode: str = "auto"
    """auto (online when WANDB_API_KEY is set, else offline) | online | offline | disabled."""
    tags: list = field(default_factory=list)
    """W&B tags."""

    def __post_init__(self) -> None:
        if self.name not in ("none", "wandb"):
            raise ConfigError(f"logger.name={self.name!r}: choose none or wandb")
        if self.mode not in ("auto", "online", "offline", "disabled"):
            raise ConfigError("logger.mode: choose auto, online, offline or disabled")


@dataclass
class Config:
    """The whole tree composed by Hydra from conf/."""

    trainer: TrainingConfig = field(default_factory=TrainingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    model: Any = None
    """A `_target_` node that builds an nn.Module."""
    dataset: Any = None
    """A `_target_` node that builds a `macfleet.data.DatasetBundle`."""
    optimizer: Any = None
    """A `_target_` node with `_partial_: true` that builds a torch optimizer from params."""
    run_id: Optional[str] = None
    """Shared by every process of a run; chosen by the master before Hydra makes the run dir."""


def new_run_id() -> str:
    """Start time to the second plus 6 random hex digits: two runs started in the same second
    still get their own run dir and W&B run."""
    import time
    import uuid

    return time.strftime("%Y-%m-%d_%H-%M-%S") + "_" + uuid.uuid4().hex[:6]


_PROCESS_RUN_ID: list[str] = []


def process_run_id() -> str:
    """This process's run id, drawn once: `${new_run_id:}` in conf/ resolves to the same value
    for the run dir, the sweep dir and cfg.run_id, however often and late Hydra resolves them."""
    if not _PROCESS_RUN_ID:
        _PROCESS_RUN_ID.append(new_run_id())
    return _PROCESS_RUN_ID[0]


def register_configs() -> None:
    """Register schemas with Hydra's ConfigStore and the `${new_run_id:}` resolver (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("new_run_id"):
        OmegaConf.register_new_resolver("new_run_id", process_run_id)

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="trainer", name="base_trainer", node=TrainingConfig)
    cs.store(group="cluster", name="base_cluster", node=ClusterConfig)
    cs.store(group="compression", name="base_compression", node=CompressionConfig)
    cs.store(group="scheduler", name="base_scheduler", node=SchedulerConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)


def to_dataclass(cls, node) -> Any:
    """Turn a DictConfig/dict sub-tree into its dataclass, running its checks."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, cls):
        return node
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    node = {k: v for k, v in dict(node).items() if not str(k).startswith("_")}
    return cls(**node)


TYPED_GROUPS = {"trainer": TrainingConfig, "cluster": ClusterConfig, "compression": CompressionConfig,
                "scheduler": SchedulerConfig, "logger": LoggerConfig}
FOLLOWS = {"lr_schedule": "scheduler.name", "warmup_steps": "scheduler.warmup_steps",
           "compression": "compression.name", "topk_ratio": "compression.ratio"}
"""Trainer fields of the Python API that train.py's config takes from a group: conf/trainer/default.yaml
interpolates them, and `check_keys` refuses one set apart from its group."""
_HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def _options(node, cls=None) -> list[str] | None:
    """The keys `node` may hold: a dataclass's fields, or the parameters of its `_target_`
    (None when that takes **kwargs or cannot be found, so anything goes)."""
    import dataclasses
    import inspect

    if cls is not None:
        return [f.name for f in dataclasses.fields(cls)]
    target = node.get("_target_") if hasattr(node, "get") else None
    if not target:
        return None
    try:
        from hydra.utils import get_object

        params = inspect.signature(get_object(str(target))).parameters.values()
    except Exception:  # noqa: BLE001 - a missing target is instantiate's error to report, with its own message
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_keys(cfg) -> None:
    """Refuse a key no component takes (`+trainer.epoch=2`: Hydra's `+` adds keys past the schema),
    with one line naming the closest option, and a trainer field set apart from the group it
    follows (`trainer.lr_schedule=step`: use `scheduler=step`), before anything is built."""
    import difflib

    from omegaconf import DictConfig

    groups = {"": _options(cfg, Config)}
    nodes = {"": cfg}
    for name in cfg:
        node = cfg.get(name)
        if isinstance(node, DictConfig):
            options = _options(node, TYPED_GROUPS.get(name))
            if options is not None:
                groups[name], nodes[name] = options, node
    for prefix, options in groups.items():
        for key in nodes[prefix]:
            if key in options or key in _HYDRA_KEYS:
                continue
            where = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(str(key), options, n=1)
            hint = (f"did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close
                    else f"the options are {', '.join(options)}")
            raise ConfigError(f"{where} is not an option; {hint}")
    _check_follows(cfg)


def _check_follows(cfg) -> None:
    """One source per option: a trainer field that a group decides must agree with the group."""
    from omegaconf import OmegaConf

    for key, source in FOLLOWS.items():
        mine, theirs = OmegaConf.select(cfg, f"trainer.{key}"), OmegaConf.select(cfg, source)
        if mine is None or theirs is None or mine == theirs:
            continue
        group, field_name = source.split(".")
        use = f"{group}={mine}" if field_name == "name" else f"{source}={mine}"
        raise ConfigError(f"trainer.{key}={mine} disagrees with {source}={theirs}: the {group} group "
                          f"sets it; use {use}")
    chosen = OmegaConf.select(cfg, "trainer.optimizer")
    if chosen is not None and OmegaConf.select(cfg, "optimizer") is not None:
        raise ConfigError(f"trainer.optimizer={chosen}: the optimizer group builds the optimizer; "
                          f"use optimizer={chosen}")
