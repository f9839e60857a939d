import os
import subprocess
import uuid

import pytest
import torch

from macfleet import checkpoint as ckpt
from macfleet.errors import CheckpointError


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((4, 4), v)}, "step": int(v)}


def test_save_load_prune_latest(tmp_path):
    for s in range(1, 6):
        ckpt.save(tmp_path, s, _state(float(s)), {"epoch": s}, keep=2)
    kept = ckpt.complete_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step-00000004", "step-00000005"]
    state, meta = ckpt.load(ckpt.latest(tmp_path))
    assert meta["step"] == 5 and torch.equal(state["model"]["w"], torch.full((4, 4), 5.0))
    assert ckpt.resolve_resume("auto", tmp_path) == kept[-1]
    assert ckpt.resolve_resume("none", tmp_path) is None


def test_incomplete_checkpoint_is_ignored(tmp_path):
    ckpt.save(tmp_path, 1, _state(1.0), {})
    (tmp_path / "step-00000009").mkdir()  # a crash mid-write left a dir without meta.json
    (tmp_path / ".tmp-step-00000010-1").mkdir()
    assert ckpt.latest(tmp_path).name == "step-00000001"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_clean_removes_only_what_killed_writers_left(tmp_path):
    ckpt.save(tmp_path, 1, _state(1.0), {})
    dead, live = _dead_pid(), os.getppid()
    (tmp_path / f".tmp-step-00000002-{dead}").mkdir()
    (tmp_path / f".tmp-step-00000002-{dead}" / "state.pt").write_bytes(b"x" * 1000)  # a killed save
    (tmp_path / f".tmp-step-00000002-{live}").mkdir()  # another live process saving here: not ours to touch
    (tmp_path / "step-00000003").mkdir()  # a prune killed mid-rmtree
    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000004" / "meta.json").write_text("{}")
    removed = ckpt.clean(tmp_path)
    assert sorted(p.name for p in removed) == [f".tmp-step-00000002-{dead}", "step-00000003", "step-00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-step-00000002-{live}", "step-00000001"]
    # Every save clears debris too, and saving a step again replaces it whole.
    (tmp_path / f".tmp-step-00000005-{dead}").mkdir()
    ckpt.save(tmp_path, 5, _state(5.0), {})
    ckpt.save(tmp_path, 5, _state(6.0), {})
    left = [f".tmp-step-00000002-{live}", "step-00000001", "step-00000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == left
    assert torch.equal(ckpt.load(tmp_path / "step-00000005")[0]["model"]["w"], torch.full((4, 4), 6.0))


def test_find_resumable_takes_the_newest_run_of_the_same_config(tmp_path):
    config = {"run_id": "a", "trainer": {"seed": 0, "resume": "none", "progress": True, "epochs": 2, "max_steps": 0},
              "model": {"width": 32}, "cluster": {"role": "master", "master_port": 50051, "nodes": 2}}
    def run(name, step, epoch=0, **changes):
        cfg = {k: dict(v, **changes.get(k, {})) if isinstance(v, dict) else v for k, v in config.items()}
        ckpt.save(tmp_path / name / "checkpoints", step, _state(1.0),
                  {"config": dict(cfg, run_id=name), "run_id": name, "epoch": epoch})

    run("old", 5)
    run("other-seed", 9, trainer={"seed": 1})
    run("other-nodes", 9, cluster={"nodes": 3})
    run("new", 3, cluster={"master_port": 6000})  # where it listened is not what it is
    run("finished", 44, epoch=2)  # nothing left to continue
    (tmp_path / "no-checkpoint").mkdir()
    # What this command resolves to: another run id, resume=auto, no progress bar.
    want = dict(config, run_id="fresh", trainer=dict(config["trainer"], resume="auto", progress=False))
    run_dir, newest, meta = ckpt.find_resumable(tmp_path, want)
    assert run_dir.name == "new" and newest.name == "step-00000003" and meta["run_id"] == "new"
    assert ckpt.find_resumable(tmp_path, dict(want, model={"width": 64})) is None
    assert ckpt.find_resumable(tmp_path / "nowhere", want) is None
    with_max = {"config": {"trainer": {"epochs": 2, "max_steps": 7}}, "epoch": 0}
    assert ckpt.finished(dict(with_max, step=7)) and not ckpt.finished(dict(with_max, step=6))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    p = ckpt.save(tmp_path, 1, _state(1.0), {})
    (p / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        ckpt.load(p)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root (CI runs as root)")
def test_full_disk_keeps_the_last_checkpoint(tmp_path):
    mnt = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        ckpt.save(mnt, 1, _state(1.0), {})
        big = {"model": {"w": torch.zeros(1024 * 1024)}}  # 4 MB: does not fit
        with pytest.raises(CheckpointError, match="free disk space"):
            ckpt.save(mnt, 2, big, {})
        assert [p.name for p in ckpt.complete_checkpoints(mnt)] == ["step-00000001"]
        assert not [p for p in mnt.iterdir() if p.name.startswith(".tmp")]  # the partial write is gone
        state, _ = ckpt.load(ckpt.latest(mnt))
        assert torch.equal(state["model"]["w"], torch.full((4, 4), 1.0))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_statepack_round_trip_without_pickle():
    import random

    import numpy as np

    from macfleet.statepack import pack, unpack

    obj = {"rng": ckpt.rng_state(), "res": {"layer.weight": torch.randn(5, 3)}, 3: [1, 2.5, None, ("a", True)],
           "empty": torch.empty(0, dtype=torch.int64), "half": torch.ones(3, dtype=torch.bfloat16),
           "scalar": torch.tensor(7), "scalar_bf16": torch.tensor(2.5, dtype=torch.bfloat16)}
    blob = pack(obj)
    assert blob.dtype == torch.uint8
    back = unpack(blob)
    assert torch.equal(back["res"]["layer.weight"], obj["res"]["layer.weight"])
    assert back[3] == [1, 2.5, None, ("a", True)]
    assert back["empty"].shape == (0,) and back["half"].dtype == torch.bfloat16
    assert back["scalar"].shape == () and int(back["scalar"]) == 7 and float(back["scalar_bf16"]) == 2.5
    ckpt.set_rng_state(back["rng"])  # restores torch, numpy and python RNGs
    a = (torch.rand(1).item(), np.random.rand(), random.random())
    ckpt.set_rng_state(obj["rng"])
    assert a == (torch.rand(1).item(), np.random.rand(), random.random())
