"""Run one job from a composed config: what `train.py` calls, and what workers and agents run.

    python -m macfleet.run --config resolved.yaml [--rank N]

runs a resolved config written by a master (the cluster section says role and master address),
so a worker needs only its installed macfleet, never code or pickles from the network.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from macfleet.config import (
    ClusterConfig,
    CompressionConfig,
    LoggerConfig,
    TrainingConfig,
    to_dataclass,
)
from macfleet.errors import MacFleetError

log = logging.getLogger("macfleet")

# What must be equal on every node of one run; a joining node that differs is refused.
FINGERPRINT_KEYS = ("model", "dataset", "compression", "global_batch", "seed")


def fingerprint(cfg: DictConfig) -> dict[str, str]:
    def node(sub) -> str:
        if sub is None:
            return "none"
        d = OmegaConf.to_container(sub, resolve=True)
        return ",".join(f"{k}={d[k]}" for k in sorted(d) if k != "root")

    return {
        "model": node(cfg.model),
        "dataset": node(cfg.dataset),
        "compression": node(cfg.compression),
        "global_batch": str(cfg.trainer.batch_size),
        "seed": str(cfg.trainer.seed),
    }


def build(node, **kwargs):
    """hydra.utils.instantiate, but a MacFleetError inside a builder surfaces as itself, so the
    user sees our message (what to do) rather than Hydra's wrapper."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, MacFleetError):
            raise cause from None
        raise


def build_model(model_cfg, bundle):
    """Instantiate the model, filling null num_classes / vocab_size / in_channels from the data."""
    fill: dict[str, Any] = {}
    facts = {"num_classes": bundle.num_classes, "vocab_size": bundle.vocab_size,
             "in_channels": getattr(bundle, "in_channels", None)}
    for key, value in facts.items():
        if key in model_cfg and model_cfg[key] is None and value is not None:
            fill[key] = value
    model = build(model_cfg, **fill)
    log.info("built model %s %s", model_cfg.get("_target_"), fill or "")
    return model


def run(cfg: DictConfig, output_dir: str | None = None) -> float:
    """Build data, model and optimizer from `cfg`, train, and return the sweep metric."""
    import torch

    from macfleet.trainer import Trainer

    tc = to_dataclass(TrainingConfig, cfg.trainer)
    torch.manual_seed(tc.seed)  # model init is part of the run's seed
    bundle = build(cfg.dataset)
    log.info("built dataset %s: %d train / %d test items", bundle.name, len(bundle.train),
             len(bundle.test) if bundle.test is not None else 0)
    model = build_model(cfg.model, bundle)
    optimizer = build(cfg.optimizer) if cfg.get("optimizer") else None
    if output_dir and not tc.output_dir:
        tc.output_dir = output_dir
    trainer = Trainer(
        model,
        bundle,
        tc,
        to_dataclass(ClusterConfig, cfg.cluster),
        compression_config=to_dataclass(CompressionConfig, cfg.compression),
        optimizer=optimizer,
        logger_config=to_dataclass(LoggerConfig, cfg.logger),
        config_dict=OmegaConf.to_container(cfg, resolve=True),
        fingerprint=fingerprint(cfg),
    )
    metrics = trainer.fit()
    if "test_accuracy" in metrics:
        return float(metrics["test_accuracy"])
    return float(metrics.get("test_loss", float("nan")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a resolved MacFleet config (workers, agents, local fleets).")
    parser.add_argument("--config", required=True, help="resolved config YAML written by the master")
    parser.add_argument("--log-level", default="INFO", help="logging level (local fleet workers use WARNING)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. cluster.role=worker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="[%(asctime)s][%(name)s] %(message)s")
    cfg = OmegaConf.load(args.config)
    if args.overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.overrides))
    try:
        run(cfg)
    except MacFleetError as exc:
        print(f"macfleet: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
