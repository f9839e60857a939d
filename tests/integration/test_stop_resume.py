"""Stopping and resuming through `python train.py`: real processes, real signals, real Hydra.

- Ctrl-C (a real SIGINT to the run's process group, as a terminal sends it) on a local fleet:
  every process prints one line and no traceback, rank 0 saves a checkpoint at the step all
  ranks stopped at, writes metrics/history/curves, names the command that resumes, exit 130.
- `trainer.resume=auto` without `hydra.run.dir` continues the newest run of the same config in
  its own dir, under its own run id, keeping its .hydra/ and its history; or says there is none.
- A save killed with SIGKILL leaves a temp dir of state files; the next run removes it, resumes
  from the newest complete checkpoint, and its history goes on. A killed fleet's temp dir goes
  when the next fleet starts (only a dead master's).
- Log lines print above the progress bar on a terminal (a pty), train and test loss are
  labelled, the summary shows MB and whole samples/s.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest

from macfleet import checkpoint as ckpt
from tests.conftest import PY, ROOT
from tests.integration.test_cluster_training import TrainProc

# A run long enough to be interrupted, checkpointing every few steps.
SMALL = ["trainer.checkpoint_every_steps=5", "trainer.log_every=5"]
INTERRUPT = re.compile(r"^macfleet: interrupted at step (\d+): saved checkpoint (\S+) and metrics\.json, "
                       r"history\.json, curves\.png in (\S+); resume with: (.+)$")


def _interrupt_after_first_checkpoint(proc: TrainProc, run_dir: str, timeout: float = 60) -> None:
    proc.wait_line(f"checkpoint {run_dir}", timeout=timeout)
    assert proc.proc.poll() is None, "the run ended before the Ctrl-C; give it more steps"
    proc.signal(signal.SIGINT)


def _master_line(proc: TrainProc) -> re.Match:
    lines = [ln for ln in proc.text("err").splitlines() if ln.startswith("macfleet: interrupted")]
    assert len(lines) == 1, proc.text()[-4000:]
    m = INTERRUPT.match(lines[0])
    assert m, lines[0]
    return m


def _train_steps(history: list[dict]) -> list[int]:
    return [h["step"] for h in history if "train/loss" in h]


def test_ctrl_c_on_a_local_fleet_saves_and_says_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    (tmp_path / "tmp").mkdir()
    args = ["trainer.epochs=30", *SMALL, "cluster.heartbeat_interval=3.0"]  # the default fleet: 2 processes
    proc = TrainProc([*args, f"hydra.run.dir={run_dir}"], tmp_path, env={"TMPDIR": str(tmp_path / "tmp")}, group=True)
    try:
        _interrupt_after_first_checkpoint(proc, str(run_dir))
        t_sigint = time.time()
        assert proc.wait(30) == 130, proc.text()[-4000:]
    finally:
        proc.kill()
    out = proc.text()
    assert "Traceback" not in out, out[-4000:]
    m = _master_line(proc)
    # Paths as typed from the working directory.
    step, saved, where, command = int(m[1]), tmp_path / m[2], tmp_path / m[3], m[4]
    # One line from the worker as well, naming the same step.
    worker = [ln for ln in out.splitlines() if ln.startswith("[rank 1]") and "interrupted" in ln]
    said = f"[rank 1] macfleet: rank 1 interrupted at step {step}: rank 0 saved checkpoint step-{step:08d}"
    assert worker == [said], out
    assert not [ln for ln in out.splitlines() if ln.startswith("[rank 1]") and "interrupted" not in ln], out[-3000:]
    # The checkpoint is at the step both stopped at, complete, and was written within ~2 s of the Ctrl-C.
    assert saved == run_dir / "checkpoints" / f"step-{step:08d}" and where == run_dir
    state, meta = ckpt.load(saved)
    assert state["step"] == step and meta["world_size"] == 2
    assert meta["time"] - t_sigint < 2.5, meta["time"] - t_sigint
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["steps"] == step
    history = json.loads((run_dir / "history.json").read_text())
    assert _train_steps(history) == list(range(5, step + 1, 5))
    assert (run_dir / "curves.png").stat().st_size > 10_000
    # The command repeats this one's overrides, names the run dir and resumes.
    assert shlex.split(command) == ["python", str(ROOT / "train.py"), *args, "hydra.run.dir=run", "trainer.resume=auto"]
    assert not list((tmp_path / "tmp").glob("macfleet-fleet-*"))  # the fleet's temp dir went with it
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A one-process run started with trainer.resume=auto where there is no run yet, stopped by
    Ctrl-C after its first checkpoints: (cwd, its arguments, its output, the master's line,
    history.json and .hydra/overrides.yaml as it left them)."""
    cwd = tmp_path_factory.mktemp("interrupted")
    args = ["cluster=single", "trainer.epochs=2", *SMALL, "trainer.resume=auto"]
    proc = TrainProc(args, cwd, group=True)
    try:
        _interrupt_after_first_checkpoint(proc, str(cwd / "outputs"))
        assert proc.wait(30) == 130, proc.text()[-4000:]
    finally:
        proc.kill()
    m = _master_line(proc)
    run_dir = cwd / m[3]
    return (cwd, args, proc.text(), m, (run_dir / "history.json").read_text(),
            (run_dir / ".hydra" / "overrides.yaml").read_text())


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, interrupted_run):
    """The same command again, on a terminal (a pty: rich draws a live bar): (cwd, what it showed)."""
    src, args, *_ = interrupted_run
    cwd = tmp_path_factory.mktemp("resumed")
    shutil.copytree(src / "outputs", cwd / "outputs")
    code, shown = _run_in_a_terminal(args, cwd)
    assert code == 0, shown[-4000:]
    return cwd, shown


def test_resume_auto_says_when_no_run_of_this_config_has_a_checkpoint(interrupted_run):
    # Runs of other configs are not taken either (tests/unit/test_checkpoint.py covers which count).
    _, _, out, line, _, _ = interrupted_run
    assert ("trainer.resume=auto: no unfinished run of this config under outputs/ has a checkpoint; "
            "starting a new run") in out
    assert "resumed from" not in out and line[3].startswith("outputs/")


def test_resume_auto_continues_the_newest_run_of_this_config(interrupted_run, resumed_run):
    _, _, _, line, history_before, overrides_before = interrupted_run
    cwd, shown = resumed_run
    step = int(line[1])
    run_dir = cwd / line[3]
    run_id = run_dir.name
    assert (f"trainer.resume=auto: continuing run {run_id} in outputs/{run_id} from step-{step:08d}, "
            "the newest run of this config with a checkpoint") in shown
    assert [p.name for p in (cwd / "outputs").iterdir()] == [run_id]  # no new run dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run_id"] == run_id and metrics["steps"] == 44 and "interrupted" not in metrics
    # The first start's overrides stay; the resumption is added beside them.
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides_before
    resumes = (run_dir / ".hydra" / "resumes.yaml").read_text()
    assert f"from: step-{step:08d}" in resumes and "trainer.resume=auto" in resumes
    # History goes on from the resumed step: the rows before it are the first run's.
    history = json.loads((run_dir / "history.json").read_text())
    before = [h for h in json.loads(history_before) if h["step"] <= step]
    assert history[: len(before)] == before
    assert _train_steps(history) == list(range(5, 44, 5)) + [44]


def test_log_lines_print_above_the_bar_and_numbers_read_well(resumed_run):
    _, shown = resumed_run
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)  # what a person sees, line by line
    lines = [ln for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    logged = [ln for ln in lines if "[macfleet" in ln]
    assert logged and all(ln.startswith("[20") for ln in logged), [ln for ln in logged if not ln.startswith("[20")]
    assert any(re.search(r"epoch 2/2 train loss \d\.\d{4}", ln) for ln in lines if ln.startswith("train")), lines[-5:]
    assert [ln for ln in logged if re.search(r"epoch 2: test loss \d\.\d{4} test accuracy \d\.\d{4}$", ln)]
    summary = {m[1]: m[2] for m in (re.match(r"^│ (\S+)\s+│\s+(.+?) │$", ln) for ln in lines) if m}
    assert re.fullmatch(r"[\d,]+", summary["samples/s"]), summary
    assert re.fullmatch(r"\d+\.\d MB", summary["bytes_sent"]), summary
    assert re.fullmatch(r"\d+\.\d ms", summary["step_s"]), summary


def test_a_killed_save_is_cleared_and_the_run_resumes_with_its_history(tmp_path):
    run_dir = tmp_path / "run"
    # ~10 MB of state (compression none: no top-k cost on CPU), a save every step, so a save is
    # under way most of the time.
    args = ["cluster=single", "compression=none", "model.width=96", "trainer.batch_size=8", "trainer.epochs=1",
            "trainer.checkpoint_every_steps=1", "trainer.log_every=1", "trainer.progress=false",
            f"hydra.run.dir={run_dir}"]
    proc = TrainProc(args, tmp_path, group=True)
    ckpts = run_dir / "checkpoints"
    try:
        proc.wait_line(f"checkpoint {ckpts}", timeout=60)
        deadline = time.monotonic() + 30
        while not list(ckpts.glob(".tmp-step-*/state.pt")):
            assert time.monotonic() < deadline and proc.proc.poll() is None, proc.text()[-3000:]
            time.sleep(0.002)  # a poll interval: the save to catch lasts ~0.1 s
        proc.signal(signal.SIGKILL)  # mid-save
        proc.wait(10)
    finally:
        proc.kill()
    debris = list(ckpts.glob(".tmp-step-*"))
    assert len(debris) == 1 and debris[0].name.endswith(f"-{proc.proc.pid}"), debris
    newest = ckpt.latest(ckpts)
    step = int(newest.name.split("-")[1])

    again = TrainProc([*args, "trainer.resume=auto", f"trainer.max_steps={step + 2}"], tmp_path)
    try:
        assert again.wait(60) == 0, again.text()[-4000:]
    finally:
        again.kill()
    out = again.text()
    assert f"removed what killed runs left in {ckpts}: {debris[0].name}" in out
    assert f"resumed from {newest} at epoch 0 step {step}" in out
    assert not list(ckpts.glob(".tmp-*"))
    assert all((p / "meta.json").is_file() and (p / "state.pt").is_file() for p in ckpts.iterdir())
    history = json.loads((run_dir / "history.json").read_text())
    assert _train_steps(history) == list(range(1, step + 3))


def test_a_killed_fleets_temp_dir_is_removed_by_the_next_fleet_only(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}
    first = TrainProc([f"hydra.run.dir={tmp_path / 'a'}"], tmp_path, env=env, group=True)
    try:
        first.wait_line("local fleet: started", timeout=60)
    finally:
        first.kill()
    left = [p.name for p in tmp.glob("macfleet-fleet-*")]
    assert len(left) == 1 and left[0].startswith(f"macfleet-fleet-{first.proc.pid}-"), left
    second = TrainProc([f"hydra.run.dir={tmp_path / 'b'}"], tmp_path, env=env, group=True)
    try:
        second.wait_line("local fleet: started", timeout=60)
        assert f"removed {tmp / left[0]}, left by a killed run (pid {first.proc.pid})" in second.text()
        # The live master's own dir stays.
        assert [p.name for p in tmp.iterdir() if p.name.startswith(f"macfleet-fleet-{second.proc.pid}-")]
        assert not (tmp / left[0]).exists()
    finally:
        second.kill()


# ---------------------------------------------------------------------------- the terminal
def _run_in_a_terminal(args: list[str], cwd: Path, columns: int = 200, timeout: float = 60) -> tuple[int, str]:
    """train.py on a pseudo-terminal (so rich draws a live bar); returns (exit code, what it showed)."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), TERM="xterm")
    for var in ("NO_COLOR", "COLUMNS", "WANDB_API_KEY"):
        env.pop(var, None)
    proc = subprocess.Popen([PY, str(ROOT / "train.py"), *args], cwd=cwd, env=env, stdin=slave, stdout=slave,
                            stderr=slave)
    os.close(slave)
    shown, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            try:
                chunk = os.read(master, 65536) if ready else b""
            except OSError:  # the terminal closed: the process is gone
                break
            if ready and not chunk:
                break
            shown += chunk
        code = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, shown.decode(errors="replace")
