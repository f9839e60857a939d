"""Experiment tracking: W&B when asked for (offline without an API key), else nothing.

wandb is imported lazily behind a do-nothing default, so the loop never branches on it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from macfleet.config import LoggerConfig

log = logging.getLogger(__name__)


class NullTracker:
    """Tracks nothing."""

    run_dir: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(NullTracker):
    """Weights & Biases run; offline into `<output_dir>/wandb` when no API key is set."""

    def __init__(self, cfg: LoggerConfig, config: dict, output_dir: str, run_id: str | None):
        import wandb

        mode = cfg.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        os.makedirs(output_dir, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=mode,
            dir=output_dir,
            config=config,
            tags=list(cfg.tags),
            id=run_id,
            resume="allow",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run_dir = getattr(self.run, "dir", None)
        log.info("wandb: %s run %s in %s", mode, self.run.id, output_dir)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()


def build_tracker(cfg: LoggerConfig | None, config: dict, output_dir: str, run_id: str | None) -> NullTracker:
    if cfg is None or cfg.name == "none" or cfg.mode == "disabled":
        return NullTracker()
    return WandbTracker(cfg, config, output_dir, run_id)
