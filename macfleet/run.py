"""Run one job from a composed config: what `train.py` calls, and what workers and agents run.

    python -m macfleet.run --config resolved.yaml [--rank N]

runs a resolved config written by a master (the cluster section says role and master address),
so a worker needs only its installed macfleet, never code or pickles from the network.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from macfleet.config import (
    ClusterConfig,
    CompressionConfig,
    check_keys,
    join_token,
    redact_token,
    LoggerConfig,
    SchedulerConfig,
    TrainingConfig,
    to_dataclass,
)
from macfleet.errors import MacFleetError

log = logging.getLogger("macfleet")


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


def _agent_listening(cfg: DictConfig) -> bool:
    """A direct-mode master whose control port is already taken on this machine: a master agent
    (`macfleet launch --role master`) is running, so the job goes to the agents."""
    import socket

    if cfg.cluster.mode != "direct" or str(cfg.cluster.role).lower().endswith("worker") or not cfg.cluster.master_port:
        return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((cfg.cluster.host, int(cfg.cluster.master_port)))
        except OSError:
            return True
    return False


def _is_local(addr: str) -> bool:
    """`addr` is an address of this machine (it can be bound here)."""
    import socket

    with socket.socket() as s:
        try:
            s.bind((socket.gethostbyname(addr), 0))
        except OSError:
            return False
    return True


def submit_to_agents(cfg: DictConfig, output_dir: str | None = None) -> float:
    """Send the resolved config to the master agent, which runs it on every agent; their output
    streams back here as "[rank N] line". The job's rank 0 runs beside the master agent and writes
    the run dir. Ctrl-C here cancels the job on every agent (MacFleetError: the run fails)."""
    from macfleet.cluster.agent import submit_job

    cluster = cfg.cluster
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["cluster"]["mode"] = "direct"
    # Detected by its port on this machine: talk to it over loopback; an explicit mode=agent may name another host.
    addr = cluster.master_addr if cluster.mode == "agent" and cluster.master_addr not in ("", "auto") else "127.0.0.1"
    if output_dir and not resolved["trainer"].get("output_dir") and _is_local(addr):
        # Rank 0 shares this machine: it writes into this run's dir (beside .hydra/), not into
        # outputs/ under whatever directory the master agent was started from.
        resolved["trainer"]["output_dir"] = os.path.abspath(output_dir)
    log.info("a master agent is running on port %s: submitting the job to the agents", cluster.master_port)
    if not resolved["trainer"].get("output_dir"):
        log.info("rank 0 writes outputs/%s under the master agent's working directory on %s", cfg.run_id, addr)
    result = submit_job(addr, int(cluster.master_port), join_token(cluster.token),
                        OmegaConf.to_yaml(OmegaConf.create(resolved)), timeout=float(cluster.wait_timeout) + 24 * 3600,
                        name=cluster.name)
    log.info("job %s finished on %d node(s)", result["job_id"], len(result["exit_codes"]))
    return float("nan")


def run(cfg: DictConfig, output_dir: str | None = None) -> float:
    """Train `cfg` (see `fit`) and return the sweep metric: test accuracy, else test loss."""
    metrics = fit(cfg, output_dir)
    if "test_accuracy" in metrics:
        return float(metrics["test_accuracy"])
    return float(metrics.get("test_loss", float("nan")))


def dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` prints every thread's Python stack to this process's stderr (its log),
    and training goes on: how to see where a node that seems hung is waiting, without py-spy
    (which needs sudo on macOS). Idempotent; a no-op where SIGUSR1 does not exist."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)


def fit(cfg: DictConfig, output_dir: str | None = None) -> dict[str, Any]:
    """Build data, model, optimizer and LR schedule from `cfg` and train: this process's metrics
    (none when the job went to running agents). train.py and the recipes both come here."""
    dump_stacks_on_sigusr1()
    if cfg.cluster.mode == "agent" or _agent_listening(cfg):
        check_keys(cfg)
        submit_to_agents(cfg, output_dir)
        return {}

    from macfleet.cluster.info import bytecode_note

    if (slow_start := bytecode_note()) is not None:
        log.warning("%s", slow_start)
    early = _start_local_workers(cfg)  # killed below if this process fails first (a bad key, say)
    try:
        check_keys(cfg)  # imports the models' modules, and torch with them
        return _fit(cfg, output_dir)
    finally:
        if early is not None:
            early.abandon()  # only if the master failed before it took them


def _start_local_workers(cfg: DictConfig):
    """`cluster=local`: the worker processes start now, beside this one's imports and model."""
    cluster = cfg.cluster
    role = cluster.get("role") or "master"
    if cluster.get("mode") != "local" or str(getattr(role, "value", role)).lower() != "master" \
            or int(cluster.get("nodes") or 2) < 2:
        return None
    from macfleet.cluster.local import LocalFleet, local_master

    local_master(cluster)
    return LocalFleet.start_early(to_dataclass(ClusterConfig, cluster), _config_dict(cfg))


def _config_dict(cfg: DictConfig) -> dict:
    # Saved in checkpoints, sent to W&B and to local workers: never the token (workers get it
    # from the environment).
    return redact_token(OmegaConf.to_container(cfg, resolve=True))


def _fit(cfg: DictConfig, output_dir: str | None) -> dict[str, Any]:
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
        scheduler_config=to_dataclass(SchedulerConfig, cfg.scheduler),
        optimizer=optimizer,
        logger_config=to_dataclass(LoggerConfig, cfg.logger),
        config_dict=_config_dict(cfg),
        # No fingerprint here: the Trainer computes it from these configs and objects, as it does
        # for a Python-API node (macfleet/fingerprint.py), so the two kinds of node can join.
    )
    return trainer.fit()


def exit_fast(code: int = 0) -> None:
    """End the process now: flush what it printed and logged, then `os._exit`.

    Python's own teardown after torch takes 1 to 1.5 s per process, and a fleet's master waits
    for its workers to exit (a node that stops on an error or a Ctrl-C must be gone within 2x
    the heartbeat). By the time a run's `fit` returned or raised, everything it leaves behind is
    written and closed (checkpoints, metrics, plots, the fleet's temp dir, its bye); a W&B run
    still open (an error on rank 0) is finished here with the exit code."""
    wandb = sys.modules.get("wandb")
    if code and wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish(exit_code=code)
        except Exception:  # noqa: BLE001 - exiting anyway; W&B marks an unfinished run itself
            pass
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


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
    except KeyboardInterrupt as exc:  # Ctrl-C reaches a local fleet's workers too: one line each
        from macfleet.errors import TrainingInterrupted

        said = str(exc) if isinstance(exc, TrainingInterrupted) else "interrupted before the first step: nothing saved"
        print(f"macfleet: {said}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    try:
        exit_fast(main())
    except KeyboardInterrupt:  # while importing, before main could catch it
        print("macfleet: interrupted before the first step: nothing saved", file=sys.stderr)
        sys.exit(130)
