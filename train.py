"""Train with MacFleet. Hydra composes conf/; `macfleet.run` does the rest.

    python train.py                                   # digits, offline, one process
    python train.py model=resnet50 dataset=cifar10 compression=topk_fp16 cluster=single
    python train.py -m compression=none,fp16          # a sweep; each job returns its metric
"""

import sys

import hydra
from omegaconf import DictConfig

from macfleet.config import register_configs
from macfleet.errors import MacFleetError

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from macfleet.run import run

    hc = HydraConfig.get()
    _scrub_saved_config(hc.runtime.output_dir, cfg.cluster.get("token"))
    if hc.mode == RunMode.MULTIRUN:
        # The sweep's id names the sweep dir; each job is a run of its own (its W&B run too).
        cfg.run_id = f"{cfg.run_id}_{hc.job.num}"
    try:
        return run(cfg, output_dir=hc.runtime.output_dir)
    except MacFleetError as exc:
        print(f"macfleet: error: {exc}", file=sys.stderr)
        sys.exit(1)


def _token_to_environment(argv: list[str]) -> list[str]:
    """A `cluster.token=...` override goes to MACFLEET_TOKEN and out of argv before Hydra sees it,
    so no .hydra/ file, sweep record, W&B run or log line holds the join token."""
    import os
    import re

    kept = []
    for arg in argv:
        m = re.fullmatch(r"\+{0,2}cluster\.token=(.*)", arg, flags=re.S)
        if m is None:
            kept.append(arg)
            continue
        value = m.group(1)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if value and value != "null":
            os.environ["MACFLEET_TOKEN"] = value
    return kept


def _scrub_saved_config(output_dir: str, token) -> None:
    """A token composed from YAML (it belongs in conf/local/secrets.yaml, read at run time) has
    already been saved by Hydra: take it out of .hydra/ before anything else runs."""
    from pathlib import Path

    from macfleet.config import REDACTED

    if not token or token == REDACTED:
        return
    for path in (Path(output_dir) / ".hydra").glob("*.yaml"):
        text = path.read_text()
        if token in text:
            path.write_text(text.replace(token, REDACTED))


def _worker_writes_nothing(argv: list[str]) -> list[str]:
    """Only rank 0 writes logs and .hydra/: a worker's Hydra gets no run dir of its own."""
    if "cluster.role=worker" in argv and not any(a.startswith("hydra.run.dir=") for a in argv):
        argv = argv + ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return argv


def _torchrun_ranks_agree(argv: list[str]) -> list[str]:
    """Under torchrun (`cluster=torchrun`), every rank takes rank 0's run id before Hydra makes
    the run dir, and only rank 0 writes one."""
    import os

    from macfleet.cluster.torchrun import agree_run_id, under_torchrun
    from macfleet.config import process_run_id

    if "cluster=torchrun" not in argv or not under_torchrun():
        return argv
    if not any(a.startswith("run_id=") for a in argv):
        argv = argv + [f"run_id={agree_run_id(process_run_id)}"]
    if os.environ["RANK"] != "0":
        argv = [a for a in argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir=", "hydra/job_logging="))]
        argv = argv + ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return argv


if __name__ == "__main__":
    sys.argv = _torchrun_ranks_agree(_worker_writes_nothing(_token_to_environment(sys.argv)))
    main()
