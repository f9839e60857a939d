"""Errors a user can cause or meet. Each message says what to do next.

No torch here: train.py catches these before it imports the trainer.
"""

from __future__ import annotations

from pathlib import Path


class MacFleetError(Exception):
    """Base class: something the user can fix (config, network, data, peers)."""


class ConfigError(MacFleetError):
    """A config value is invalid or inconsistent."""


class DatasetMissingError(MacFleetError):
    """The dataset is not on disk and cannot be downloaded."""


class FrameError(MacFleetError):
    """A frame from the network failed validation (version, size, dtype, shape, sender, step)."""


class PeerLostError(MacFleetError):
    """A peer died or went silent past the deadline."""

    def __init__(self, message: str, rank: int | None = None, address: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.address = address


class PeerLeftError(PeerLostError):
    """A peer left the run on purpose (Ctrl-C, an error of its own, or the end of its run) and
    said so; `reason` is what it gave."""

    def __init__(self, message: str, rank: int | None = None, address: str | None = None, reason: str = ""):
        super().__init__(message, rank=rank, address=address)
        self.reason = reason


class JoinRefusedError(MacFleetError):
    """The coordinator refused a node (token, protocol version or config mismatch)."""


class CheckpointError(MacFleetError):
    """A checkpoint could not be written or read."""


class NodeDroppedError(PeerLostError):
    """The master dropped this node from an elastic run (it was silent past the deadline: frozen,
    asleep or cut off) and the others went on without it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training (at a step boundary every rank agreed on, or at once after a second
    one), after rank 0 wrote what it could. `str()` is the one line to show; train.py adds the
    command that resumes. A KeyboardInterrupt, so API callers that catch Ctrl-C still do."""

    def __init__(self, step: int, rank: int, saved: bool, why: str = "", checkpoint: Path | None = None,
                 out_dir: Path | None = None, left: bool = False):
        self.step, self.rank, self.saved, self.why = step, rank, saved, why
        self.left = left  # a worker of an elastic run that left alone: the others go on
        self.checkpoint = checkpoint  # rank 0: the one saved now, else the newest (None if there is none)
        self.out_dir = out_dir        # rank 0: the run dir
        super().__init__(self.describe())

    def describe(self) -> str:
        if self.left:
            return (f"rank {self.rank} left the run at step {self.step} (Ctrl-C); the others go on without it. "
                    f"Start it again with the same command to rejoin")
        head = f"interrupted at step {self.step}" + (f" ({self.why})" if self.why else "")
        if self.rank != 0:
            said = f"rank 0 saved checkpoint step-{self.step:08d}" if self.saved else "rank 0 saved no new checkpoint"
            return f"rank {self.rank} {head}: {said}"
        written = f"metrics.json, history.json, curves.png in {shown_path(self.out_dir)}"
        if self.saved:
            return f"{head}: saved checkpoint {shown_path(self.checkpoint)} and {written}"
        newest = f"newest checkpoint {shown_path(self.checkpoint)}" if self.checkpoint else "no checkpoint yet"
        return f"{head}: saved {written}; {newest}"


def shown_path(path) -> str:
    """`path` relative to the working directory when it is under it (as a user typed it), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
