"""`macfleet benchmark --type scaling`: the real command trains the default tiny model with
train.py on one core per node, alone and as a 2-node fleet. Asserted: its JSON rows, how each
figure derives from its references, the plot and the clean-up; never the speeds themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from macfleet.benchmark.scaling import _rate

KEYS = {"type", "model", "dataset", "global_batch", "steps", "reference_steps", "warmup_steps", "device", "link", "run", "codec",
        "nodes", "local_batches", "cores", "cpu_quota", "samples_per_s", "step_s", "step_max_s", "one_node_samples_per_s",
        "single_samples_per_s", "ideal_samples_per_s", "speedup", "efficiency", "compute_s", "comm_wait_s",
        "staging_s", "wire_ratio", "data_workers", "backend", "vs_peers", "peers_failed", "runs", "runs_samples_per_s",
        "ceiling_samples_per_s"}


def run_benchmark(kind: str, tmp_path: Path, *args: str, timeout: float = 240,
                  cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`macfleet benchmark --type KIND ARGS`; its temporary folder lands in tmp_path/scratch."""
    scratch = tmp_path / "scratch"  # checked empty after
    scratch.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(scratch))
    argv = [sys.executable, "-m", "macfleet.cli", "benchmark", "--type", kind, *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    done.pid = proc.pid  # its namespaces and cgroups carry it (left_behind)
    return done


def left_behind(pid: int) -> list[str]:
    """The network namespaces and cgroups that the benchmark process `pid` made and did not remove
    (their names carry its pid: other tests' benchmarks may run beside it)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    cgroups = Path("/sys/fs/cgroup") if Path("/sys/fs/cgroup/cgroup.controllers").exists() else Path("/sys/fs/cgroup/cpu")
    return [n for n in names if n.startswith(f"mf-scale-{pid}-")] + \
        [p.name for p in cgroups.glob(f"macfleet-bench-{pid}-*")]


def assert_one_clear_line(proc: subprocess.CompletedProcess, said: str) -> None:
    """A refused option: exit code 1 and one line on stderr saying `said`, no traceback."""
    assert proc.returncode == 1
    assert said in proc.stderr
    assert proc.stderr.startswith("macfleet benchmark: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def _scaling(tmp_path: Path, *args: str, timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_benchmark("scaling", tmp_path, *args, timeout=timeout, cwd=cwd)


def _check_rows(rows: list[dict], codecs: list[str], profiled: int = 0, peers: tuple[str, ...] = ()) -> None:
    assert [(r["run"], r["backend"], r["codec"]) for r in rows] == [("1 node", None, "none")] + [
        ("torchrun", p, "none") for p in peers] + [("fleet", "macfleet", c) for c in codecs]
    one = rows[0]
    for r in rows:
        assert set(r) == (KEYS | {"profile"} if profiled else KEYS)
        assert (r["type"], r["model"], r["dataset"], r["global_batch"]) == ("scaling", "digits_cnn", "digits", 64)
        assert (r["steps"], r["reference_steps"], r["warmup_steps"], r["device"]) == (4, 4, 2, "cpu")
        assert r["samples_per_s"] > 0 and r["step_max_s"] >= r["step_s"] > 0
        assert (r["runs"], r["runs_samples_per_s"]) == (1, [r["samples_per_s"]])  # one round (no --runs)
        assert all(v > 0 for v in r["single_samples_per_s"] + r["compute_s"])
        # Every figure derives from its references, measured in the same benchmark.
        assert r["one_node_samples_per_s"] == one["samples_per_s"]
        assert r["ideal_samples_per_s"] == pytest.approx(sum(r["single_samples_per_s"]))
        assert r["efficiency"] == pytest.approx(r["samples_per_s"] / sum(r["single_samples_per_s"]))
        assert r["speedup"] == pytest.approx(r["samples_per_s"] / one["samples_per_s"])
        assert r["comm_wait_s"] == pytest.approx([r["step_s"] - c for c in r["compute_s"]])
        assert r["staging_s"] is None  # the engine does not report staging time (yet)
        assert r["data_workers"] == 0  # trainer.num_workers=auto: digits are tensors sliced whole
    assert (one["nodes"], one["local_batches"], one["efficiency"], one["speedup"]) == (1, [64], 1.0, 1.0)
    assert one["single_samples_per_s"] == [one["samples_per_s"]] and one["wire_ratio"] is None
    assert one["ceiling_samples_per_s"] is None
    # The peers: the same job under torchrun on the same nodes; every fleet row beside each of them.
    by_peer = {r["backend"]: r for r in rows if r["run"] == "torchrun"}
    for r in rows:
        if r["run"] == "fleet":
            assert r["vs_peers"].keys() == by_peer.keys() and r["peers_failed"] == {}
            for b, v in r["vs_peers"].items():
                assert v == pytest.approx(r["samples_per_s"] / by_peer[b]["samples_per_s"])
        else:
            assert r["vs_peers"] is None and r["peers_failed"] is None
    for r in rows[1:]:
        assert (r["nodes"], r["local_batches"], r["cores"]) == (2, [32, 32], [1, 1])
        assert r["single_samples_per_s"][0] == one["samples_per_s"]  # node 0 alone is the 1-node row
        assert len(r["compute_s"]) == len(r["comm_wait_s"]) == 2
        # with the exchange free: the global batch in the slowest node's own step at its share
        assert r["ceiling_samples_per_s"] == pytest.approx(64 / max(r["compute_s"]))
        if r["run"] == "fleet":
            assert r["wire_ratio"] > 0
        else:  # torch's own all_reduce: every byte, if the trainer counts them at all
            assert r["wire_ratio"] is None or r["wire_ratio"] == pytest.approx(1.0, rel=0.05)
    by_codec = {r["codec"]: r for r in rows[1:]}
    if "topk_fp16" in by_codec:
        assert by_codec["topk_fp16"]["wire_ratio"] < 0.1  # the codec really ran in the fleet: blocks, 5.3%
    if "topk_fp16:granularity=element" in by_codec:  # its setting reached the fleet: 6 bytes per kept element
        assert 0.1 < by_codec["topk_fp16:granularity=element"]["wire_ratio"] < 0.2


def test_scaling_rows_table_plot_and_cleanup(tmp_path):
    """One fleet benchmark, as root (CI) in network namespaces with a CPU quota on node 1,
    elsewhere on loopback: rows, the table, the plot, 2 profiled steps per run (--profile), the
    default peer (the same job under real torchrun on gloo, on the same nodes), and nothing left
    behind."""
    root = os.geteuid() == 0
    out, png, work = tmp_path / "scaling.json", tmp_path / "scaling.png", tmp_path / "work"
    work.mkdir()
    extra = ["--netns", "--cpu-quota", "1.0,0.7"] if root else []
    # A codec with a setting of its own (--codecs NAME:KEY=VALUE): element top-k, 6 bytes a kept element.
    codec = "topk_fp16:granularity=element"
    proc = _scaling(tmp_path, "--nodes", "2", "--cores", "1,1", "--steps", "4", "--warmup-steps", "2", "--profile", "2",
                    "--codecs", codec, "--json", str(out), "--plot", str(png), *extra, cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    _check_rows(rows, [codec], profiled=2, peers=("gloo",))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in ("node0-alone-b64", "node1-local-b32", "fleet-topk_fp16-granularity-element", "comm wait",
                  "in-process", "where a step goes", "node 1 alone", "comm threads, ms a step",
                  "fleet topk_fp16:granularity=element: all_", "torchrun-gloo: ", "peers: gloo",
                  "The same job under torchrun on the same nodes (compression none): torchrun gloo ", "x torchrun gloo's samples/s",
                  "With the exchange free, these nodes would reach "):
        assert label in proc.stdout  # a progress line per run, then the tables
    for r in rows:  # rank 0's profile of each run: its own steps, timed apart from the 4 timed steps
        p = r["profile"]
        assert p["steps"] == 2 and p["device"] == "cpu" and p["device_busy_s"] is None and p["step_s"] > 0
        assert {"forward", "backward", "optimizer"} <= set(p["phases_s"]) <= {"data", "forward", "backward",
                                                                              "exchange", "optimizer"}
        assert sum(p["phases_s"].values()) <= p["train_step_s"] * 1.01
        if r["run"] == "fleet":  # the comm threads' spans, recorded although they started before the profile
            assert {"comm.all_gather", "comm.all_reduce"} & set(p["comm_s"]), p["comm_s"]
            assert all(v > 0 for v in p["comm_s"].values())
        else:
            assert p["comm_s"] == {}
    kept = list(work.glob("outputs/benchmark-profile-*/*"))  # every rank of every run: trace and table
    assert sorted(d.name for d in kept) == ["fleet-topk_fp16-granularity-element",
                                            "fleet-topk_fp16-granularity-element-node1", "node0-alone-b64",
                                            "node0-local-b32", "node1-alone-b64", "node1-local-b32",
                                            "torchrun-gloo", "torchrun-gloo-node1"]
    for d in kept:
        rank = 1 if d.name.endswith("node1") else 0
        events = json.loads((d / f"rank{rank}.json").read_text())["traceEvents"]
        if d.name.startswith("fleet"):  # comm threads' spans, beside the training thread's (whose own
            # synchronous collectives run inline, so spans may sit there too)
            main = {e["tid"] for e in events if e.get("name") == "macfleet.forward"}
            comm = {e["tid"] for e in events if str(e.get("name", "")).startswith("comm.")}
            assert main and comm - main
        assert (d / f"rank{rank}.txt").read_text().startswith(f"profile, rank {rank}, 2 steps on cpu: ")
    assert not list((tmp_path / "scratch").glob("macfleet-scaling-*"))  # run dirs, logs and data removed
    if not root:
        assert all(r["link"] == "loopback" and r["cpu_quota"] == [None] * r["nodes"] for r in rows)
        return
    assert rows[1]["link"] == "veth" and rows[1]["cpu_quota"] == [1.0, 0.7]
    assert "core 1, 0.7 of them" in proc.stdout
    assert not left_behind(proc.pid), "namespaces or cgroups were not removed"


def test_a_failed_peer_leaves_the_fleet_measured_and_its_log_kept(tmp_path):
    """A peer is a reference: when its torchrun job fails (here the macfleet backend under
    torchrun with a malformed engine setting, MACFLEET_LANES=x), the benchmark says why, runs the
    fleet without it, names it in the fleet rows' peers_failed, and keeps its log.

    With --runs 2 a round runs each peer and codec once, in the same order every round (a peer
    that failed is not tried again); a row holds its median run's figures (the lower middle one
    of 2, a real run) and every run's samples/s; the table and the plot show the range."""
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    proc = _scaling(tmp_path, "--nodes", "2", "--cores", "1,1", "--steps", "2", "--warmup-steps", "1", "--codecs",
                    "none", "--backends", "macfleet:lanes=x", "--runs", "2", "--json", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["run"], r["backend"], r["runs"]) for r in rows] == [("1 node", None, 1), ("fleet", "macfleet", 2)]
    fleet = rows[-1]
    assert fleet["vs_peers"] == {} and fleet["samples_per_s"] > 0
    why = fleet["peers_failed"]["macfleet:lanes=x"]
    assert why.startswith("torchrun-macfleet-lanes-x-run1 failed: MACFLEET_LANES='x': give a whole number"), why
    assert "the fleet runs without this peer" in proc.stdout
    assert "No figure for torchrun macfleet:lanes=x: its run failed" in proc.stdout
    kept = list((tmp_path / "scratch").glob("macfleet-scaling-*"))
    assert len(kept) == 1 and "a peer failed" in proc.stdout
    log = kept[0] / "logs" / "torchrun-macfleet-lanes-x-run1-node0.log"
    assert "MACFLEET_LANES='x'" in log.read_text()
    assert not (kept[0] / "logs" / "torchrun-macfleet-lanes-x-run2-node0.log").exists()
    order = [line.split(":")[0].strip() for line in proc.stdout.splitlines() if line.startswith("  fleet-")]
    assert order == ["fleet-none-run1", "fleet-none-run2"]
    each = fleet["runs_samples_per_s"]
    assert len(each) == 2 and fleet["samples_per_s"] == min(each)
    assert fleet["speedup"] == pytest.approx(fleet["samples_per_s"] / rows[0]["samples_per_s"])
    assert "runs (min-max)" in proc.stdout and f"2: {_rate(min(each))}-{_rate(max(each))}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, said", [
    (["--cpu-quota", "1.5,1.0"], "--cpu-quota '1.5,1.0': each value is a fraction of the node's cores"),
    (["--cpu-quota", "1.0"], "--cpu-quota '1.0' has 1 value(s) for --nodes 2: give one per node"),
    (["--nodes", "64", "--cores-per-node", "1"], "--nodes 64 needs a core per node"),
    (["--cores", "1"], "--cores '1' has 1 value(s) for --nodes 2: give one per node"),
    (["--cores", "4096,1"], "--cores 4096,1 adds up to 4097 cores; this machine has"),
    (["--cores", "1,1", "--cores-per-node", "1"], "give --cores (each node's own count) or --cores-per-node"),
    (["--cores", "1,x"], "--cores '1,x': give a whole number of cores per node, e.g. 8,4"),
    (["--rate", "1gbit"], "--rate shapes the namespaces' links: add --netns"),
    (["--reference-steps", "0"], "--reference-steps 0: give at least 1 timed step"),
    (["--codecs", "none,zip"], "--codecs 'none,zip': use a comma list of none, fp16, int8, topk, topk_fp16"),
    (["--codecs", "topk_fp16:granularity"], "'granularity' in 'topk_fp16:granularity': give KEY=VALUE"),
    (["--codecs", "topk_fp16:speed=9"], "'speed=9' in 'topk_fp16:speed=9': give KEY=VALUE with KEY one of"),
    (["--codecs", "none,none"], "--codecs 'none,none': a codec is listed twice"),
    (["compression=fp16"], "the scaling benchmark sets compression itself; use --codecs"),
    (["trainer.batch_size=abc"], "a trailing override was refused"),
    (["--throttle", "1:0.5"], "--throttle '1:0.5': give NODE:QUOTA@SECONDS or NODE:QUOTA@stepN"),
    (["--throttle", "2:0.5@10"], "--throttle '2:0.5@10': node 2 is not one of the 2 nodes"),
    (["--backends", "nccl"], "--backends 'nccl': nccl needs --device cuda; use gloo"),
    (["--backends", "gloo,mpi"], "--backends 'gloo,mpi': 'mpi' is not a torch backend train.py runs on"),
    (["--backends", "gloo,gloo"], "--backends 'gloo,gloo': a backend is listed twice"),
    (["--backends", "macfleet:speed=2"], "--backends item 'macfleet:speed=2': engine settings go as"),
    (["--backends", "gloo", "--throttle", "1:0.5@10"], "--throttle watches the fleet adapt; a stock backend's run"),
    (["--runs", "0"], "--runs 0: give 1 to 10 rounds"),
    (["--runs", "2", "--profile", "2"], "--runs with --profile: profile one round (--runs 1)"),
])
def test_bad_option_is_one_clear_line(tmp_path, args, said):
    assert_one_clear_line(_scaling(tmp_path, *args, timeout=120), said)


THROTTLE_KEYS = {"throttle", "adapt_shares", "throttled_single_samples_per_s", "ideal_after_samples_per_s",
                 "throttle_step", "throttle_s", "before_samples_per_s", "final_samples_per_s", "steps_to_recover",
                 "steps_after_throttle", "slowed", "curve", "share_events", "codec_events"}


@pytest.mark.skipif(os.geteuid() != 0, reason="--throttle lowers a cgroup's CPU quota: root only")
def test_throttle_rows_are_consistent(tmp_path):
    """--throttle on two 1-core nodes: node 1's quota drops at step 15 of each fleet run (a step,
    not seconds: the run must outlast it on any machine); the trailing override reaches the
    fleet; every throttle figure derives from the run's own per-step curve and references."""
    import statistics

    out, png = tmp_path / "throttle.json", tmp_path / "throttle.png"
    proc = _scaling(tmp_path, "--nodes", "2", "--cores-per-node", "1", "--steps", "30", "--reference-steps", "6",
                    "--warmup-steps", "2", "--codecs", "none", "--throttle", "1:0.5@step15", "--json", str(out), "--plot", str(png),
                    "cluster.adapt_shares=true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, fleet = json.loads(out.read_text())
    assert set(one) == set(fleet) == KEYS | THROTTLE_KEYS
    for r in (one, fleet):
        assert r["throttle"] == {"node": 1, "quota": 0.5, "seconds": None, "step": 15}
        assert r["throttled_single_samples_per_s"] > 0
    assert all(one[k] is None for k in ("throttle_step", "steps_to_recover", "ideal_after_samples_per_s"))
    assert fleet["adapt_shares"] is True and fleet["cpu_quota"] == [None, None]
    assert (fleet["steps"], fleet["reference_steps"]) == (30, 6)  # the references ran fewer steps
    # Every step logged (trainer.log_every=1), the throttle inside the run.
    steps, sps = [c[0] for c in fleet["curve"]], [c[1] for c in fleet["curve"]]
    assert steps == list(range(1, 33)) and all(v > 0 for v in sps)
    at = fleet["throttle_step"]
    assert 15 <= at < 32 and fleet["throttle_s"] >= 0
    assert fleet["steps_after_throttle"] == 32 - at
    assert fleet["ideal_after_samples_per_s"] == pytest.approx(
        fleet["single_samples_per_s"][0] + fleet["throttled_single_samples_per_s"])
    assert fleet["before_samples_per_s"] == pytest.approx(statistics.median(sps[2:at]), rel=1e-3)
    after = sps[at:]
    assert fleet["final_samples_per_s"] == pytest.approx(statistics.median(after[-5:]), rel=1e-3)
    medians = [statistics.median(after[j - 4:j + 1]) for j in range(4, len(after))]
    ok = [m >= 0.95 * fleet["ideal_after_samples_per_s"] for m in medians]
    # Recovered: the first window from which every later one is within 5% of the ideal after.
    hit = next((j + 5 for j in range(len(ok)) if all(ok[j:])), None)
    assert fleet["steps_to_recover"] == hit
    # Every window within: the throttle made no dip (None: fewer steps than a window after it).
    assert fleet["slowed"] is (None if fleet["steps_after_throttle"] < 5 else not all(ok))
    assert one["slowed"] is None
    assert all(set(e) == {"step", "shares"} and sum(e["shares"]) == pytest.approx(1) for e in fleet["share_events"])
    assert one["codec_events"] == fleet["codec_events"] == []  # compression=none: nothing decides
    assert "node1-alone-b64-throttled" in proc.stdout and "steps to recover" not in proc.stderr
    assert "throttled at step" in proc.stdout and "recovered" in proc.stdout  # the progress line, the table
    assert ("no dip to recover from" in proc.stdout) is (fleet["slowed"] is False)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "scratch").glob("macfleet-scaling-*"))
    assert not left_behind(proc.pid), "cgroups were not removed"



def sigterm_mid_run(args: list[str], after: str, ready, cwd: Path | None = None) -> tuple[str, list, int]:
    """Start `macfleet benchmark ARGS`, wait for an output line containing `after`, then until
    `ready(descendants)` holds for its child processes; SIGTERM it and check it exits 130.
    Returns its output, those descendants and its pid."""
    import signal

    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "macfleet.cli", "benchmark", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=cwd)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if after in line:
                break
        bench, deadline = psutil.Process(proc.pid), time.monotonic() + 120
        while not ready(kids := bench.children(recursive=True)):  # polled: processes have no event to wait on
            assert time.monotonic() < deadline, "".join(seen)
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        text = "".join(seen) + proc.stdout.read()
        assert proc.wait(timeout=60) == 130, text
    finally:
        if proc.poll() is None:  # the test failed first: still let it clean up (killed, it leaves namespaces)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return text, kids, proc.pid


@pytest.mark.parametrize("peer", ["none", "gloo"])
def test_sigterm_mid_run_cleans_up_as_ctrl_c_does(tmp_path, peer):
    """SIGTERM (a `timeout` around a long benchmark) while the fleet trains (peer none), or while
    the peer's torchrun job does (gloo: torchrun's agents and their ranks): exit 130, and no
    namespace (as root) nor training process is left behind; killed outright it left both."""
    import psutil

    root = os.geteuid() == 0
    args = ["--type", "scaling", "--nodes", "2", "--cores", "1,1", "--steps", "100000", "--reference-steps", "4",
            "--warmup-steps", "2", "--codecs", "none", "--backends", peer, *(["--netns"] if root else [])]
    # The references are done once node 1's is printed; then both nodes of the next run start
    # (the peer runs before the fleet).
    def trainers(kids) -> int:  # train.py processes, not torchrun's agents (whose command names it too)
        lines = []
        for k in kids:
            try:
                lines.append(" ".join(k.cmdline()))
            except psutil.Error:  # gone, or a zombie, since it was listed (short-lived helpers)
                continue
        return sum("train.py" in c and "torch.distributed.run" not in c for c in lines)

    _, fleet, pid = sigterm_mid_run(args, "node1-local-b32", lambda kids: trainers(kids) >= 2, cwd=tmp_path)
    assert len(fleet) == (2 if peer == "none" else 4)  # with torchrun: 2 agents and their 2 ranks
    _, alive = psutil.wait_procs(fleet, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    if root:
        assert not left_behind(pid)
