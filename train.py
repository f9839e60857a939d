"""Train with MacFleet. Hydra composes conf/; `macfleet.run` does the rest.

    python train.py                                   # digits, offline, one process
    python train.py model=resnet50 dataset=cifar10 compression=topk_fp16 cluster=single
    python train.py -m compression=none,fp16          # a sweep; each job returns its metric
    python train.py trainer.resume=auto               # continue the newest run of this config

Ctrl-C stops every process of the run at one step boundary; each prints one line, the master's
saying what it saved and the command that resumes (exit code 130).
"""

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from macfleet.config import register_configs
from macfleet.errors import MacFleetError

register_configs()

_USER_ARGS: list[str] = []
"""This command's own arguments (the join token taken out): the resume command repeats them."""
_RESUMING: dict = {}
"""What `_resume_in_place` decided before Hydra ran: a line to log, and the run continued, if any."""


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from macfleet.run import run
    from macfleet.errors import TrainingInterrupted

    hc = HydraConfig.get()
    _scrub_saved_config(hc.runtime.output_dir, cfg.cluster.get("token"))
    if hc.mode == RunMode.MULTIRUN:
        # The sweep's id names the sweep dir; each job is a run of its own (its W&B run too).
        cfg.run_id = f"{cfg.run_id}_{hc.job.num}"
    if _RESUMING.get("note"):
        logging.getLogger("macfleet").info(_RESUMING["note"])
    if _RESUMING.get("run_dir"):
        _record_resume(Path(_RESUMING["run_dir"]))
    try:
        return run(cfg, output_dir=hc.runtime.output_dir)
    except MacFleetError as exc:
        print(f"macfleet: error: {exc}", file=sys.stderr)
        _exit(1, hc.mode)
    except TrainingInterrupted as stop:
        # A sweep's job resumes as a run of its own: its overrides, not the sweep's. Only rank 0
        # names a run dir (out_dir); another rank's command is its own one with resume=auto.
        args = list(hc.overrides.task) if hc.mode == RunMode.MULTIRUN else _USER_ARGS
        if stop.left:
            print(f"macfleet: {stop}", file=sys.stderr)
        else:
            print(f"macfleet: {stop}; resume with: {_resume_command(args, stop.out_dir)}", file=sys.stderr)
        _exit(130, hc.mode)
    except KeyboardInterrupt:
        _interrupted_early()


def _exit(code: int, mode) -> None:
    """A run that ended on an error or a Ctrl-C exits at once (macfleet.run.exit_fast); a sweep's
    job returns to Hydra, which goes on with the next job."""
    from hydra.types import RunMode

    if mode == RunMode.MULTIRUN:
        sys.exit(code)
    from macfleet.run import exit_fast

    exit_fast(code)


def _interrupted_early() -> None:
    print("macfleet: interrupted before the first step: nothing saved", file=sys.stderr)
    sys.exit(130)


def _arg_key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def _resume_command(args: list[str], run_dir) -> str:
    """The command that continues this run: its arguments, its run dir and resume=auto."""
    import shlex

    from macfleet.errors import shown_path

    keep = [a for a in args if _arg_key(a) not in ("hydra.run.dir", "trainer.resume", "run_id")]
    where = [f"hydra.run.dir={shown_path(run_dir)}"] if run_dir else []
    return shlex.join(["python", sys.argv[0], *keep, *where, "trainer.resume=auto"])


def _resume_in_place(argv: list[str]) -> list[str]:
    """`trainer.resume=auto` continues a run in its own dir, under its own run id, keeping the
    .hydra/ files of its first start (each resumption is added to .hydra/resumes.yaml).

    With `hydra.run.dir` the run is that dir's; without it, the newest run under the outputs root
    whose checkpoints were written with this same config (`checkpoint.find_resumable`), or, when
    there is none, a new run. Decided before Hydra makes a run dir, so no empty one is left.
    """
    args = argv[1:]
    values = {_arg_key(a): a.split("=", 1)[1] for a in args if "=" in a and not a.startswith("-")}
    if values.get("trainer.resume") != "auto" or values.get("trainer.checkpoint_dir") or \
            any(a in ("-m", "--multirun") or a.startswith(("--cfg", "-c=", "--info", "--help", "-h")) for a in args):
        return argv
    from macfleet import checkpoint as ckpt  # imports torch: only for resume=auto

    if "hydra.run.dir" in values:
        run_dir = Path(values["hydra.run.dir"])
        newest = ckpt.latest(run_dir / "checkpoints")
        if newest is None or not (run_dir / ".hydra" / "config.yaml").is_file():
            return argv
        try:
            meta = json.loads((newest / ckpt.META).read_text())
        except (OSError, ValueError):  # the trainer's load says what is wrong with it
            return argv
    else:
        try:
            cfg, outputs_root = _compose(args)
        except Exception:  # noqa: BLE001 - a bad override: Hydra says what is wrong when it composes
            return argv
        found = ckpt.find_resumable(outputs_root, cfg)
        if found is None:
            _RESUMING["note"] = (f"trainer.resume=auto: no unfinished run of this config under {outputs_root}/ has a "
                                 "checkpoint; starting a new run")
            return argv
        run_dir, newest, meta = found
        _RESUMING["note"] = (f"trainer.resume=auto: continuing run {meta.get('run_id') or run_dir.name} in "
                             f"{run_dir} from {newest.name}, the newest run of this config with a checkpoint")
        argv = [*argv, f"hydra.run.dir={run_dir}"]
    _RESUMING.update(run_dir=str(run_dir), checkpoint=newest.name)
    extra = ["hydra.output_subdir=null"]
    if meta.get("run_id") and "run_id" not in values:
        extra.append(f"run_id={meta['run_id']}")
    return [*argv, *extra]


def _compose(args: list[str]) -> tuple[dict, str]:
    """The resolved config these arguments make (Hydra's compose, as @hydra.main will), and the
    outputs root: the parent of the run dir it would get."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    flags = {"config_dir": str(Path(__file__).resolve().parent / "conf"), "config_name": "config"}
    names = {"--config-dir": "config_dir", "-cd": "config_dir", "--config-name": "config_name", "-cn": "config_name"}
    overrides, it = [], iter(args)
    for a in it:
        flag, eq, value = a.partition("=")
        if flag in names:
            flags[names[flag]] = value if eq else next(it)
        elif not a.startswith("-"):
            overrides.append(a)
    with initialize_config_dir(config_dir=str(Path(flags["config_dir"]).resolve()), version_base="1.3"):
        cfg = compose(config_name=flags["config_name"], overrides=overrides, return_hydra_config=True)
    outputs_root = str(Path(OmegaConf.select(cfg, "hydra.run.dir", default="outputs/x")).parent)
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True), outputs_root


def _record_resume(run_dir: Path) -> None:
    """Add this resumption (when, from which checkpoint, with which arguments) to .hydra/resumes.yaml."""
    import time

    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "resumes.yaml"
    records = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    records.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "from": _RESUMING.get("checkpoint"),
                    "args": list(_USER_ARGS)})
    OmegaConf.save(OmegaConf.create(records), path)


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
    the run dir, and only rank 0 writes one. Rank 0 decides `trainer.resume=auto` first, so a
    resumed run keeps its dir and its id on every rank."""
    import os

    from macfleet.cluster.torchrun import agree_run_id
    from macfleet.config import process_run_id

    if os.environ["RANK"] == "0":
        argv = _resume_in_place(argv)
    mine = [a.split("=", 1)[1] for a in argv if a.startswith("run_id=")]
    if not any(a.startswith("run_id=") for a in _USER_ARGS):
        agreed = agree_run_id(lambda: mine[-1] if mine else process_run_id())
        if not mine:
            argv = argv + [f"run_id={agreed}"]
    if os.environ["RANK"] != "0":
        argv = [a for a in argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir=", "hydra/job_logging="))]
        argv = argv + ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return argv


def _under_torchrun(argv: list[str]) -> bool:
    if "cluster=torchrun" not in argv:
        return False  # before importing torch: a local fleet starts its workers first (macfleet.run)
    from macfleet.cluster.torchrun import under_torchrun

    return under_torchrun()


if __name__ == "__main__":
    try:
        argv = _token_to_environment(sys.argv)
        _USER_ARGS[:] = argv[1:]
        argv = _worker_writes_nothing(argv)
        # Under torchrun rank 0 decides the resume and the run id for every rank.
        sys.argv = _torchrun_ranks_agree(argv) if _under_torchrun(argv) else _resume_in_place(argv)
        main()
    except KeyboardInterrupt:  # before Hydra called main (composing, importing)
        _interrupted_early()
    else:
        from macfleet.run import exit_fast

        exit_fast(0)  # a finished run: skip Python's second-long teardown of torch
