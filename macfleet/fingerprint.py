"""What every node of one run must agree on, and how a difference is named.

A node's fingerprint is its whole resolved setup, flattened to ``{"trainer.learning_rate": "0.05",
...}`` (dotted key -> canonical JSON value), minus what may differ per node (`PER_NODE`: role,
addresses, ports, token, device, weights, paths, logger, progress, data workers, profiling, run names, and
what only the master decides). The master refuses a joining node whose fingerprint differs and
names every key, on both sides: ``trainer.learning_rate: master 0.05, this node 0.5``.

`fingerprint` is the one definition, over a plain dict. `setup` builds that dict the same way
for every kind of node, from the typed configs and the built objects (a `train.py` node and a
Python-API `Trainer` node hold the same things there), so both compute the same fingerprint
for the same settings:

* ``trainer``, ``compression``, ``scheduler``, ``cluster``: the dataclasses' fields, defaults
  filled in (TrainingConfig's copies of the other groups left out: `DESCRIBED_ELSEWHERE`);
* ``model``: its class, parameter count, every leaf module as it prints (``Dropout(p=0.1)``)
  and every parameter and buffer's dtype and shape;
* ``dataset``: name, task, sizes, classes or vocabulary, input shape, the labels of the first
  items and the mean magnitude of their inputs (3 significant digits, so a float rounding
  difference between two machines does not count, but another normalisation does);
* ``optimizer``: its class and hyperparameters (read from the factory, see `describe_optimizer`);
* ``loss_fn``: the Python API's own loss function, by name (null: the task's loss).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

PER_NODE = (
    "cluster.role", "cluster.master_addr", "cluster.master_port", "cluster.tensor_port", "cluster.host",
    "cluster.token", "cluster.weight", "cluster.weights", "cluster.mode", "cluster.discovery_enabled",
    "cluster.wait_timeout",
    # Decided by the master for every rank (sent in WELCOME or broadcast): a worker's value is unused.
    "cluster.allreduce", "cluster.elastic", "cluster.min_nodes", "trainer.resume",
    "trainer.device", "trainer.output_dir", "trainer.checkpoint_dir", "trainer.progress", "trainer.num_workers",
    "trainer.profile_steps",
    "logger", "run_id", "hydra",
)
"""Keys (and whole sections) that may differ between the nodes of one run."""
DESCRIBED_ELSEWHERE = ("trainer.optimizer", "trainer.compression", "trainer.topk_ratio", "trainer.lr_schedule",
                       "trainer.warmup_steps")
"""TrainingConfig's copies of other groups: the `optimizer`, `compression` and `scheduler`
sections say what is used (train.py leaves trainer.optimizer null and builds the group's)."""
SAMPLE_ITEMS = 16
"""Dataset items whose labels and input magnitude go into the fingerprint."""
LISTED = 40
"""A refusal names at most this many differences (a different model would list every layer)."""
MODEL_ENTRIES = 2000
"""Above this many layers + tensors a model is described by two digests instead, so a very deep
model's join message stays far below the control plane's 1 MB."""
_OPTIMIZER_IMPL = ("foreach", "fused", "capturable", "differentiable")


def _exempt(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in (*PER_NODE, *DESCRIBED_ELSEWHERE))


def _canonical(value: Any) -> Any:
    """Plain JSON types, numbers normalised (1.0 == 1), tuples as lists, enums by value."""
    if isinstance(value, enum.Enum):
        return _canonical(value.value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        value = float(value) if not isinstance(value, int) else value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        return value
    if isinstance(value, Mapping):  # dict, or OmegaConf's DictConfig inside a Hydra partial
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes):  # tuple, list, ListConfig
        return [_canonical(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # a 0-d tensor (torch's lr may be one)
        return _canonical(value.item())
    return str(value)


def fingerprint(setup: dict) -> dict[str, str]:
    """The flat fingerprint of a setup dict (see the module docstring): nested dicts become dotted
    keys, `PER_NODE` keys are left out, values are canonical JSON text."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
            return
        if prefix and not _exempt(prefix):
            out[prefix] = json.dumps(_canonical(node), sort_keys=True, separators=(",", ":"))

    walk(setup, "")
    return out


def _shown(value: Optional[str]) -> str:
    if value is None:
        return "(unset)"
    try:
        parsed = json.loads(value)
    except ValueError:
        return value  # not canonical JSON (a hand-made fingerprint): as it is
    return parsed if isinstance(parsed, str) else value


def _order(key: str) -> tuple:
    # Settings first, then the model's class and size, then its layers one by one.
    return (key.startswith(("model.layers.", "model.tensors.")), key)


def diff(master: dict, node: dict) -> list[str]:
    """Every key whose value differs, as "key: master A, this node B" (at most LISTED of them,
    then how many more)."""
    keys = sorted((k for k in set(master) | set(node) if master.get(k) != node.get(k)), key=_order)
    lines = [f"{k}: master {_shown(master.get(k))}, this node {_shown(node.get(k))}" for k in keys[:LISTED]]
    if len(keys) > LISTED:
        lines.append(f"and {len(keys) - LISTED} more differences")
    return lines


# -- the setup dict, from typed configs and built objects ----------------------------------------
def describe_model(model) -> dict:
    leaves = {}
    for name, module in model.named_modules():
        if not any(True for _ in module.children()):
            leaves[name or "(root)"] = f"{type(module).__name__}({module.extra_repr()})"
    tensors = {name: f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
               for name, t in model.state_dict(keep_vars=True).items()}
    if len(leaves) + len(tensors) > MODEL_ENTRIES:
        leaves, tensors = (hashlib.sha256(json.dumps(d).encode()).hexdigest()[:16] for d in (leaves, tensors))
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters": sum(p.numel() for p in model.parameters()), "layers": leaves, "tensors": tensors}


def _items_summary(ds) -> dict:
    """Labels of the first items and the mean |input| (3 significant digits), seeded like training."""
    import torch

    from macfleet.data.loader import SeededBatches

    n = min(SAMPLE_ITEMS, len(ds))
    if n == 0:
        return {}
    try:
        batch = SeededBatches(ds, 0).__getitems__([(0, i) for i in range(n)])
    except Exception as exc:  # noqa: BLE001 - items the loader cannot batch: described by their sizes only
        return {"unbatchable": type(exc).__name__}
    out = {}
    for i, t in enumerate(batch if isinstance(batch, (list, tuple)) else [batch]):
        if not isinstance(t, torch.Tensor):
            continue
        if t.is_floating_point():
            out[f"mean_abs_{i}"] = float(f"{float(t.double().abs().mean()):.3g}")
        else:
            out[f"digest_{i}"] = hashlib.sha256(t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
    return out


def describe_dataset(bundle) -> dict:
    test = bundle.test
    return {"name": bundle.name, "task": bundle.task, "num_classes": bundle.num_classes,
            "vocab_size": bundle.vocab_size, "input_shape": bundle.input_shape, "in_channels": bundle.in_channels,
            "train": len(bundle.train), "test": len(test) if test is not None else 0,
            "train_items": _items_summary(bundle.train),
            "test_items": _items_summary(test) if test is not None else {}}


def describe_optimizer(factory: Callable[[list], Any]) -> dict:
    """Class and hyperparameters of the optimizer `factory(params)` builds: the class's signature
    defaults overridden by a partial's keywords (Hydra's `_partial_: true` and the trainer's
    default are partials), so none is built (the first optimizer built imports torch._dynamo,
    seconds on the critical path of every join). Any other factory is built on a probe parameter."""
    import inspect

    if isinstance(factory, functools.partial) and isinstance(factory.func, type) and not factory.args:
        cls, given = factory.func, dict(factory.keywords)
    else:
        import torch

        try:
            opt = factory([torch.nn.Parameter(torch.zeros(1))])
        except Exception as exc:  # noqa: BLE001 - a factory that wants the real parameters: its name only
            return {"factory": getattr(factory, "__qualname__", type(factory).__name__), "probe": type(exc).__name__}
        cls, given = type(opt), dict(opt.defaults)
    params = inspect.signature(cls).parameters
    hyper = {k: given.get(k, p.default) for k, p in params.items()
             if k != "params" and k not in _OPTIMIZER_IMPL and p.kind != p.VAR_KEYWORD
             and (k in given or p.default is not p.empty)}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", **hyper}


def setup(training, compression, scheduler, cluster, model, dataset, optimizer: Callable[[list], Any],
          loss_fn: Optional[Callable] = None) -> dict:
    """The setup dict `fingerprint` reads, the same for a train.py node and a Python-API node;
    `optimizer` is the factory the trainer will call with the model's parameters, `loss_fn` the
    Python API's own loss (None: the task's)."""
    loss = None if loss_fn is None else (
        f"{getattr(loss_fn, '__module__', '?')}.{getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}")
    return {"trainer": dataclasses.asdict(training), "compression": dataclasses.asdict(compression),
            "scheduler": dataclasses.asdict(scheduler), "cluster": dataclasses.asdict(cluster),
            "model": describe_model(model), "dataset": describe_dataset(dataset),
            "optimizer": describe_optimizer(optimizer), "loss_fn": loss}


__all__ = ["PER_NODE", "fingerprint", "diff", "setup", "describe_model", "describe_dataset", "describe_optimizer"]
