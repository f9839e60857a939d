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
