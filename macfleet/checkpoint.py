"""Checkpoints: everything a resumed run needs, written atomically, the last K kept.

Layout: `<dir>/step-<step:08d>/state.pt` plus `meta.json`. A checkpoint is written into a
`.tmp-step-<step>-<pid>` sibling and renamed into place only when complete, so a crash or a full
disk mid-write leaves the previous checkpoints loadable. `meta.json` is written last inside the
temp dir: a directory without it is never considered complete.

What a killed writer leaves behind (a temp dir of a dead pid, a `step-*` dir that a killed prune
emptied) is removed by `clean`, at the start of a run and after every save.

`find_resumable` looks through an outputs root for the newest run of the same config that holds
a complete checkpoint: what `trainer.resume=auto` without `hydra.run.dir` continues.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from macfleet.errors import CheckpointError

META = "meta.json"
STATE = "state.pt"
TMP_PREFIX = ".tmp-step-"


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: str | os.PathLike, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 3) -> Path:
    """Write one checkpoint atomically, prune to the newest `keep` and clear debris. Returns its path.

    On failure (disk full, permissions, a second Ctrl-C) the partial temp dir is removed, older
    checkpoints are untouched, and a CheckpointError says what happened.
    """
    root = Path(directory)
    final = root / f"step-{step:08d}"
    tmp = root / f"{TMP_PREFIX}{step:08d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        with open(tmp / STATE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        meta = dict(meta, step=step, time=time.time())
        with open(tmp / META, "w") as f:
            json.dump(meta, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            # Saved twice at one step (an epoch's end on a step interval): move the old one aside
            # first, so a kill between the renames leaves a complete copy under a .tmp name, never
            # a half-deleted step dir.
            old = root / f"{TMP_PREFIX}{step:08d}-{os.getpid()}-old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:
        # torch.save's zip writer turns a full disk into a RuntimeError; find the OSError under it.
        cause = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        shutil.rmtree(tmp, ignore_errors=True)
        if cause is None:
            raise
        raise CheckpointError(
            f"could not write checkpoint {final}: {cause.strerror or cause}. Older checkpoints in {root} are intact; "
            "free disk space or set trainer.checkpoint_dir to a writable place, then resume with trainer.resume=auto"
        ) from exc
    except BaseException:  # a second Ctrl-C mid-write: leave no partial copy behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep, keep_path=final)
    clean(root)
    return final


def _writer_pid(name: str) -> int | None:
    """The pid in `.tmp-step-<step>-<pid>[-old]`, or None for a name not made by `save`."""
    parts = name[len(TMP_PREFIX):].split("-")
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


def clean(directory: str | os.PathLike) -> list[Path]:
    """Remove what killed writers left in a checkpoint dir; returns what was removed.

    - `.tmp-step-*` dirs whose writing process is dead (a live writer's are kept: another run
      saving into the same dir, or this one mid-save);
    - `step-*` dirs without both state.pt and meta.json: `save` only ever renames complete dirs
      into place, so such a dir is what a killed prune or a killed rmtree left half-deleted.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    removed = []
    for p in root.iterdir():
        if not p.is_dir():
            continue
        if p.name.startswith(TMP_PREFIX):
            pid = _writer_pid(p.name)
            stale = pid is not None and pid != os.getpid() and not psutil.pid_exists(pid)
        else:
            stale = p.name.startswith("step-") and not ((p / META).is_file() and (p / STATE).is_file())
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def complete_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / META).is_file() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(directory: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def prune(directory: Path, keep: int, keep_path: Path | None = None) -> None:
    found = [p for p in complete_checkpoints(directory) if p != keep_path]
    for old in found[: max(0, len(found) - keep + (keep_path is not None))]:
        shutil.rmtree(old, ignore_errors=True)


def set_aside(directory: str | os.PathLike) -> Path | None:
    """A run that starts afresh in a checkpoint dir holding another run's checkpoints moves them
    into `earlier-<time>/` there: kept, but never pruned in place of the new run's, nor taken
    by a later `resume=auto` for this run's. Returns where they went (None: nothing there)."""
    found = complete_checkpoints(directory)
    if not found:
        return None
    aside = Path(directory) / time.strftime("earlier-%Y%m%d-%H%M%S")
    aside.mkdir(exist_ok=True)
    for p in found:
        os.replace(p, aside / p.name)
    return aside


def load(path: str | os.PathLike) -> tuple[dict, dict]:
    """Load (state, meta) from a checkpoint directory."""
    p = Path(path)
    if not (p / STATE).is_file() or not (p / META).is_file():
        raise CheckpointError(f"{p} is not a complete MacFleet checkpoint (needs {STATE} and {META})")
    try:
        with open(p / META) as f:
            meta = json.load(f)
        state = torch.load(p / STATE, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt file is a user-facing problem, not a crash
        raise CheckpointError(f"could not read checkpoint {p}: {exc}; pass another with trainer.resume=PATH") from exc
    return state, meta


def resolve_resume(resume: str, directory: str | os.PathLike) -> Path | None:
    """Map trainer.resume (none | auto | path) to a checkpoint path, or None to start fresh."""
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        return latest(directory)
    p = Path(resume)
    if p.is_dir() and (p / META).is_file():
        return p
    found = latest(p)
    if found is None:
        raise CheckpointError(f"trainer.resume={resume}: no complete checkpoint there; use trainer.resume=auto or a step-* dir")
    return found


# Keys that say where a run writes, how one node reaches the others, or how it reports progress:
# they may differ between a run and its resumption. Everything else must match for
# `trainer.resume=auto` to pick a run up.
NOT_IDENTITY = {
    "run_id": None,
    "trainer": ("resume", "output_dir", "checkpoint_dir", "progress", "log_every", "device", "num_workers",
                "timing_warmup_steps", "eval_batch_size"),
    "cluster": ("role", "master_addr", "master_port", "tensor_port", "host", "token", "weight", "wait_timeout",
                "heartbeat_interval", "comm_timeout", "discovery_enabled", "elastic", "min_nodes", "adapt_shares"),
    "dataset": ("root", "download"),
    "logger": None,
}


def run_identity(config: dict) -> dict:
    """`config` (a resolved config as plain dicts) without the keys in NOT_IDENTITY, as JSON sees it."""
    out = json.loads(json.dumps(config, default=str))
    for key, sub in NOT_IDENTITY.items():
        if sub is None:
            out.pop(key, None)
        elif isinstance(out.get(key), dict):
            for k in sub:
                out[key].pop(k, None)
    return out


def finished(meta: dict) -> bool:
    """Whether the checkpoint with this meta.json ends its run (its last epoch, or max_steps)."""
    trainer = (meta.get("config") or {}).get("trainer") or {}
    epochs, max_steps = trainer.get("epochs"), trainer.get("max_steps")
    return ((epochs is not None and meta.get("epoch", 0) >= epochs)
            or bool(max_steps and meta.get("step", 0) >= max_steps))


def find_resumable(outputs_root: str | os.PathLike, config: dict) -> tuple[Path, Path, dict] | None:
    """The newest unfinished run under `outputs_root` whose checkpoints were written with the same
    config (see `run_identity`), as (run dir, its newest complete checkpoint, that checkpoint's meta)."""
    root = Path(outputs_root)
    if not root.is_dir():
        return None
    want = run_identity(config)
    best = None
    for run_dir in root.iterdir():
        newest = latest(run_dir / "checkpoints")
        if newest is None:
            continue
        try:
            meta = json.loads((newest / META).read_text())
        except (OSError, ValueError):
            continue
        if run_identity(meta.get("config") or {}) != want or finished(meta):
            continue
        if best is None or meta.get("time", 0) > best[2].get("time", 0):
            best = (run_dir, newest, meta)
    return best
