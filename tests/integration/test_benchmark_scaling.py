"""`macfleet benchmark --type scaling`: the real command trains the default tiny model with
train.py on one core per node, alone and as a 2-node fleet. Asserted: its JSON rows, how each
figure derives from its references, the plot and the clean-up; never the speeds themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KEYS = {"type", "model", "dataset", "global_batch", "steps", "warmup_steps", "device", "link", "run", "codec",
        "nodes", "local_batches", "cores", "cpu_quota", "samples_per_s", "step_s", "one_node_samples_per_s",
        "single_samples_per_s", "ideal_samples_per_s", "speedup", "efficiency", "compute_s", "comm_wait_s",
        "staging_s", "wire_ratio"}


def run_benchmark(kind: str, tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`macfleet benchmark --type KIND ARGS`; its temporary folder lands in tmp_path/scratch."""
    scratch = tmp_path / "scratch"  # checked empty after
    scratch.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(scratch))
    return subprocess.run([sys.executable, "-m", "macfleet.cli", "benchmark", "--type", kind, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_clear_line(proc: subprocess.CompletedProcess, said: str) -> None:
    """A refused option: exit code 1 and one line on stderr saying `said`, no traceback."""
    assert proc.returncode == 1
    assert said in proc.stderr
    assert proc.stderr.startswith("macfleet benchmark: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def _scaling(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_benchmark("scaling", tmp_path, *args, timeout=timeout)


def _check_rows(rows: list[dict], codecs: list[str]) -> None:
    assert [(r["run"], r["codec"]) for r in rows] == [("1 node", "none")] + [("fleet", c) for c in codecs]
    one = rows[0]
    for r in rows:
        assert set(r) == KEYS
        assert (r["type"], r["model"], r["dataset"], r["global_batch"]) == ("scaling", "digits_cnn", "digits", 64)
        assert (r["steps"], r["warmup_steps"], r["device"]) == (4, 2, "cpu")
        assert r["samples_per_s"] > 0 and r["step_s"] > 0
        assert all(v > 0 for v in r["single_samples_per_s"] + r["compute_s"])
        # Every figure derives from its references, measured in the same benchmark.
        assert r["one_node_samples_per_s"] == one["samples_per_s"]
        assert r["ideal_samples_per_s"] == pytest.approx(sum(r["single_samples_per_s"]))
        assert r["efficiency"] == pytest.approx(r["samples_per_s"] / sum(r["single_samples_per_s"]))
        assert r["speedup"] == pytest.approx(r["samples_per_s"] / one["samples_per_s"])
        assert r["comm_wait_s"] == pytest.approx([r["step_s"] - c for c in r["compute_s"]])
        assert r["staging_s"] is None  # the engine does not report staging time (yet)
    assert (one["nodes"], one["local_batches"], one["efficiency"], one["speedup"]) == (1, [64], 1.0, 1.0)
    assert one["single_samples_per_s"] == [one["samples_per_s"]] and one["wire_ratio"] is None
    for r in rows[1:]:
        assert (r["nodes"], r["local_batches"], r["cores"]) == (2, [32, 32], [1, 1])
        assert r["single_samples_per_s"][0] == one["samples_per_s"]  # node 0 alone is the 1-node row
        assert len(r["compute_s"]) == len(r["comm_wait_s"]) == 2
        assert r["wire_ratio"] > 0
    by_codec = {r["codec"]: r for r in rows[1:]}
    if "topk_fp16" in by_codec:
        assert by_codec["topk_fp16"]["wire_ratio"] < 0.2  # the codec really ran in the fleet


def test_scaling_rows_table_plot_and_cleanup(tmp_path):
    """One fleet benchmark, as root (CI) in network namespaces with a CPU quota on node 1,
    elsewhere on loopback: rows, the table, the plot, and nothing left behind."""
    root = os.geteuid() == 0
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    extra = ["--netns", "--cpu-quota", "1.0,0.7"] if root else []
    proc = _scaling(tmp_path, "--nodes", "2", "--cores-per-node", "1", "--steps", "4", "--warmup-steps", "2",
                    "--codecs", "topk_fp16", "--json", str(out), "--plot", str(png), *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    _check_rows(rows, ["topk_fp16"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in ("node0-alone-b64", "node1-local-b32", "fleet-topk_fp16", "comm wait"):
        assert label in proc.stdout  # a progress line per run, then the table
    assert not list((tmp_path / "scratch").glob("macfleet-scaling-*"))  # run dirs, logs and data removed
    if not root:
        assert all(r["link"] == "loopback" and r["cpu_quota"] == [None] * r["nodes"] for r in rows)
        return
    assert rows[1]["link"] == "veth" and rows[1]["cpu_quota"] == [1.0, 0.7]
    assert "core 1, 0.7 of them" in proc.stdout
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "mf-scale" not in left, "namespaces were not removed"
    cgroups = Path("/sys/fs/cgroup") if Path("/sys/fs/cgroup/cgroup.controllers").exists() else Path("/sys/fs/cgroup/cpu")
    assert not list(cgroups.glob("macfleet-bench-*")), "cgroups were not removed"


@pytest.mark.parametrize("args, said", [
    (["--cpu-quota", "1.5,1.0"], "--cpu-quota '1.5,1.0': each value is a fraction of the node's cores"),
    (["--cpu-quota", "1.0"], "--cpu-quota '1.0' has 1 value(s) for --nodes 2: give one per node"),
    (["--nodes", "64", "--cores-per-node", "1"], "--nodes 64 needs a core per node"),
    (["--rate", "1gbit"], "--rate shapes the namespaces' links: add --netns"),
    (["--codecs", "none,zip"], "--codecs 'none,zip': use a comma list of none, fp16, topk, topk_fp16"),
    (["compression=fp16"], "the scaling benchmark sets compression itself; use --codecs"),
    (["trainer.batch_size=abc"], "a trailing override was refused"),
])
def test_bad_option_is_one_clear_line(tmp_path, args, said):
    assert_one_clear_line(_scaling(tmp_path, *args, timeout=120), said)
