"""Hostile and malformed traffic at a live master, on 127.0.0.1: real node processes (the node
program of test_control_plane.py), real ZeroMQ sockets on the test's side. The messages come
from macfleet/benchmark/hostile.py, which `macfleet benchmark --type elastic --cases hostile`
floods a training fleet with.

- The control port: thousands of fuzzed frames (garbage bytes, wrong frame counts, deep nesting,
  huge numbers, unknown kinds, every field of a join with a wrong type or range, behind a valid
  token proof). Each gets an error answer, the master logs them once (rate-limited), and
  `macfleet status` and a real join still work afterwards.
- The heartbeat port: a forged bye for a member (no signature, a wrong one, under the member's
  old routing id) and garbage are rejected and logged; the member stays a member, and killing it
  later is still reported as a loss within 2x the heartbeat interval (it used to turn loss
  detection off, then abort the master inside libzmq).
- A local fleet (`python train.py cluster=local`) listens on 127.0.0.1 only (it listened on every
  interface), and its normal end is no departure.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import zmq

from macfleet.benchmark.hostile import (FORGED_BYE, HOSTILE_JOIN, HOSTILE_JOINS, flood_control, flood_heartbeat,
                                        forged_byes)
from macfleet.cluster.protocol import decode, encode, make_socket, tcp
from macfleet.comm.launch import free_ports
from tests.integration.test_cluster_training import TrainProc
from tests.integration.test_control_plane import Node

INTERVAL = 0.5
TOKEN = "tok"  # the node program's token


def _ask(sock: zmq.Socket, frames: list[bytes], timeout: float = 5.0) -> dict:
    sock.send_multipart(frames)
    assert sock.poll(int(timeout * 1000)), f"no answer to {frames[0][:80]!r}"
    return decode(sock.recv())


def _status(port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "macfleet.cli", "status", "--master", "127.0.0.1", "--master-port",
                           str(port), "--token", TOKEN, "--timeout", "10", "--json"],
                          capture_output=True, text=True, timeout=60)


def test_fuzzed_control_messages_are_answered_and_the_master_keeps_serving():
    port = free_ports(1)[0]
    master = Node([], "master", "127.0.0.1", port=port, interval=INTERVAL)
    worker = None
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER)
    try:
        sock.connect(tcp("127.0.0.1", port))
        # The master is up once it answers a HELLO (queued until it binds).
        assert _ask(sock, [encode("hello", purpose="status", name="macfleet", cnonce="00")], timeout=30)["t"] == "challenge"
        # 3250 messages, the last one too big for the socket (over MAXMSGSIZE: libzmq drops that
        # connection, nothing else); one in 25 a hostile join, every one of HOSTILE_JOINS 5 times.
        tally = flood_control(ctx, "127.0.0.1", port, TOKEN, 3250, random.Random(10))
        print(f"{tally.sent} hostile messages in {tally.seconds:.1f} s, answers: {tally.answers}")
        # Every malformed message was answered with an error, never a crash or silence.
        assert (tally.sent, tally.answered, tally.dropped, tally.unanswered) == (3250, 3249, 1, 0), tally.as_dict()
        assert set(tally.answers) == {"garbage", "join hello", HOSTILE_JOIN}, tally.answers
        assert tally.count("garbage", "error: ") == sum(tally.answers["garbage"].values()) >= 3000, tally.answers
        assert tally.answers["join hello"] == {"challenge": tally.count(HOSTILE_JOIN)}, tally.answers
        assert tally.count(HOSTILE_JOIN, "error: ") == tally.count(HOSTILE_JOIN) >= 5 * len(HOSTILE_JOINS), tally.answers

        assert master.proc.poll() is None, "".join(master.stderr)
        out = _status(port)
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)["nodes"]
        assert rows[0]["rank"] == 0 and rows[0]["host"].startswith("master-")
        # A real worker still joins and the run forms.
        worker = Node([], "worker", "127.0.0.1", port=port, interval=INTERVAL)
        assert master.wait_for("formed")["world_size"] == 2
        assert worker.wait_for("formed")["rank"] == 1
        # Logged, but once per kind of complaint, not 3000 times.
        log = "".join(master.stderr)
        assert "coordinator: malformed message:" in log and "coordinator: malformed join:" in log, log[-3000:]
        assert log.count("coordinator: malformed message:") <= 2 and log.count("coordinator: malformed join:") <= 2
        assert log.count("\n") < 40, log[-3000:]
    finally:
        sock.close(0)
        ctx.term()
        for node in (worker, master):
            if node is not None:
                node.kill()


def _forge(ctx: zmq.Context, hb_port: int, frames: list[bytes], identity: bytes | None = None) -> dict | None:
    sock = make_socket(ctx, zmq.DEALER, identity=identity)
    try:
        sock.connect(tcp("127.0.0.1", hb_port))
        sock.send_multipart(frames)
        return decode(sock.recv()) if sock.poll(3000) else None
    finally:
        sock.close(0)


def test_forged_bye_is_rejected_and_a_later_kill_is_still_a_loss():
    port = free_ports(1)[0]
    master = Node([], "master", "127.0.0.1", port=port, interval=INTERVAL)
    worker = Node([], "worker", "127.0.0.1", port=port, interval=INTERVAL)
    ctx = zmq.Context()
    try:
        hb_port = master.wait_for("listening")["hb_port"]
        master.wait_for("formed")
        worker.wait_for("formed")
        for what, (identity, frames) in forged_byes("g1-r1", 1).items():
            answer = _forge(ctx, hb_port, frames, identity)
            assert answer is not None and answer["t"] == "error", (what, answer)
            # Those naming the member are seen as forged (the old way in names none: a non-member).
            assert identity is not None or "forged" in answer["reason"], (what, answer)
        # Garbage, forged byes and heartbeats for the member, and one too big for the socket.
        tally = flood_heartbeat(ctx, "127.0.0.1", hb_port, ["g1-r1"], 600, random.Random(11))
        assert (tally.sent, tally.answered, tally.dropped, tally.unanswered) == (600, 599, 1, 0), tally.as_dict()
        assert all(kind.startswith("error: ") for kinds in tally.answers.values() for kind in kinds), tally.answers
        assert tally.count(FORGED_BYE, "error: forged heartbeat rejected") > 0, tally.answers
        time.sleep(3 * INTERVAL)  # heartbeats go on meanwhile; a forged bye would have stopped them
        master.send("status")
        row = master.wait_for("status")["nodes"][1]
        assert row["state"] not in ("left", "lost") and row["last_heartbeat_s"] < 2 * INTERVAL, row
        assert all(ev["event"] != "lost" for node in (master, worker) for ev in list(node.events.queue))
        log = "".join(master.stderr)
        assert "heartbeat server: forged heartbeat rejected: bye for node rank 1" in log, log[-3000:]
        assert log.count("forged heartbeat rejected") <= 2, log[-3000:]
        # Loss detection still works for that rank, and the master survives it.
        t0 = time.time()
        worker.kill()
        lost = master.wait_for("lost", timeout=10)
        assert lost["rank"] == 1 and "sent no heartbeat" in lost["msg"], lost
        assert lost["t"] - t0 < 2 * INTERVAL + 0.5, lost["t"] - t0
        master.send("status")
        assert master.wait_for("status")["nodes"][1]["state"] == "lost"
        assert master.proc.poll() is None
    finally:
        ctx.term()
        for node in (worker, master):
            node.kill()


def _listening(pid: int) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of `pid` and its children."""
    import psutil

    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
        except psutil.NoSuchProcess:
            continue
        found += [(proc.pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def test_local_fleet_listens_on_loopback_only_and_ends_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    fleet = TrainProc(["cluster=local", "compression=none", "trainer.progress=false", "trainer.epochs=1",
                       "trainer.max_steps=60", "trainer.batch_size=16", "trainer.checkpoint_every=0",
                       f"hydra.run.dir={run_dir}"], tmp_path)
    try:
        fleet.wait_line("rank 0 of 2", timeout=90)
        # Master: coordinator, heartbeats, data plane; worker: its data plane. Seen while training.
        deadline = time.monotonic() + 10
        while len(sockets := _listening(fleet.proc.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        code = fleet.wait(120)
    finally:
        fleet.kill()
    assert len({pid for pid, _, _ in sockets}) == 2 and len(sockets) >= 4, sockets
    assert all(addr == "127.0.0.1" for _, addr, _ in sockets), sockets
    assert code == 0, fleet.text()[-3000:]
    assert "left (" not in fleet.text(), fleet.text()[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["world_size"] == 2
