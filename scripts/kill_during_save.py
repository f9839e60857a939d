"""SIGKILL a training process while it writes checkpoints, many times, and count what survives.

Each trial forks a child (torch imported once, in the parent) that trains a ResNet-18 on digits
with a checkpoint after every step (~90 MB each: model + SGD momentum), and SIGKILLs it at a
random moment after its first checkpoint, so most kills land in a write. Then, as the next run
would: the newest complete checkpoint must load (`checkpoint.load`), and `checkpoint.clean`
(what a run does at its start and after each save) must leave no `.tmp-step-*` and no
incomplete `step-*` behind.

    python scripts/kill_during_save.py --trials 100
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch


def _child(out: str) -> None:
    from macfleet import Trainer, TrainingConfig
    from macfleet.data.digits import build as digits
    from macfleet.models.resnet import resnet18

    import logging

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    tc = TrainingConfig(epochs=100, batch_size=8, progress=False, output_dir=out, device="cpu",
                        checkpoint_every=0, checkpoint_every_steps=1, keep_checkpoints=2, log_every=1000)
    Trainer(resnet18(num_classes=10, in_channels=1), digits(), tc).fit()
    os._exit(0)


def main() -> None:
    from macfleet import checkpoint as ckpt

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = random.Random(a.seed)
    loadable = mid_write = debris_left = 0
    root = Path(tempfile.mkdtemp(prefix="macfleet-killsave-"))
    try:
        for trial in range(a.trials):
            out = root / f"run{trial}"
            out.mkdir()
            ck = out / "checkpoints"
            pid = os.fork()
            if pid == 0:
                try:
                    _child(str(out))
                finally:
                    os._exit(1)
            deadline = time.monotonic() + 120
            while not ckpt.complete_checkpoints(ck) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.5))
            writing = any(p.name.startswith(ckpt.TMP_PREFIX) for p in ck.iterdir())
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            mid_write += writing or any(p.name.startswith(ckpt.TMP_PREFIX) for p in ck.iterdir())
            newest = ckpt.latest(ck)
            try:
                state, _ = ckpt.load(newest)
                loadable += int(state["step"]) >= 1
            except Exception as exc:  # noqa: BLE001 - counted and shown
                print(f"trial {trial}: {newest} did not load: {exc}")
            ckpt.clean(ck)
            left = [p.name for p in ck.iterdir() if p.name.startswith(ckpt.TMP_PREFIX) or
                    (p.name.startswith("step-") and p not in ckpt.complete_checkpoints(ck))]
            debris_left += bool(left)
            if left:
                print(f"trial {trial}: left behind {left}")
            shutil.rmtree(out)
            print(f"trial {trial + 1}/{a.trials}: loadable {loadable}, killed mid-write {mid_write}, "
                  f"debris left {debris_left}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{a.trials} kills: {loadable} left a loadable newest checkpoint, {mid_write} landed while a "
          f"checkpoint was being written, {debris_left} left debris after clean")


if __name__ == "__main__":
    main()
