"""Checkpoints: everything a resumed run needs, written atomically, the last K kept.

Layout: `<dir>/step-<step:08d>/state.pt` plus `meta.json`. A checkpoint is written into a
`.tmp-*` sibling and renamed into place only when complete, so a crash or a full disk
mid-write leaves the previous checkpoints loadable. `meta.json` is written last inside the
temp dir: a directory without it is never considered complete.
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
import torch

from macfleet.errors import CheckpointError

META = "meta.json"
STATE = "state.pt"


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
    """Write one checkpoint atomically and prune to the newest `keep`. Returns its path.

    On failure (disk full, permissions) the partial temp dir is removed, older checkpoints are
    untouched, and a CheckpointError says what happened.
    """
    root = Path(directory)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
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
            shutil.rmtree(final)
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
    prune(root, keep)
    return final


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


def prune(directory: Path, keep: int) -> None:
    found = complete_checkpoints(directory)
    for old in found[: max(0, len(found) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


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
