"""Join, refusals and membership on 127.0.0.1: a real Coordinator and real join() calls on threads."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from macfleet.cluster.coordinator import Coordinator, compute_weights, fingerprint_diff
from macfleet.cluster.membership import join
from macfleet.cluster.protocol import decode, encode, make_socket, request, tcp
from macfleet.config import PROTOCOL_VERSION, ClusterConfig
from macfleet.errors import JoinRefusedError, MacFleetError

FP = {"model": "resnet50", "dataset": "cifar10", "compression": "topk", "global_batch": "256"}


def _cfg(**kw) -> ClusterConfig:
    base = dict(master_port=0, nodes=2, token="secret", heartbeat_interval=0.3, wait_timeout=15)
    base.update(kw)
    return ClusterConfig(**base)


def _facts(host: str, **kw) -> dict:
    return dict({"host": host, "chip": "Apple M2 Pro", "device": "mps"}, **kw)


@pytest.fixture
def coord():
    c = Coordinator(_cfg(), FP, _facts("pro"), {"run_id": "run-1", "seed": 3}, log_sink=lambda line: None)
    c.start()
    yield c
    c.stop()


def _join_in_thread(cfg, fp, facts, addr):
    out = {}

    def go():
        try:
            out["m"] = join(cfg, fp, facts, addr)
        except Exception as exc:  # handed to the test thread
            out["exc"] = exc

    th = threading.Thread(target=go)
    th.start()
    return th, out


def test_join_assigns_rank_weights_run_and_addresses(coord):
    lines = []
    coord.log_sink = lines.append
    th, out = _join_in_thread(_cfg(master_port=coord.port, role="worker", weight=0.5), FP,
                              _facts("air", chip="Apple M1"), ":6001")
    waits = []
    master = coord.wait_for_nodes(":6000", on_wait=lambda j, e, t: waits.append((j, e)))
    th.join(10)
    worker = out["m"]
    try:
        assert (master.rank, worker.rank, master.world_size, worker.world_size) == (0, 1, 2, 2)
        assert master.addrs == worker.addrs == ["127.0.0.1:6000", "127.0.0.1:6001"]
        # master weight 1.0, worker 0.5, normalised.
        assert master.weights == pytest.approx([2 / 3, 1 / 3]) and worker.weights == master.weights
        assert worker.run == {"run_id": "run-1", "seed": 3, "elastic": True} and worker.generation == 1
        assert [n["host"] for n in worker.nodes] == ["pro", "air"]
        assert all(e == 2 for _, e in waits)
        worker.log("epoch 1 loss 0.5")
        worker.report(12, 345.0)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (lines and coord.status()[1]["step"] == 12):
            time.sleep(0.05)
        assert lines == ["[rank 1 air] epoch 1 loss 0.5"]
        row = coord.status()[1]
        assert (row["host"], row["chip"], row["step"], row["samples_per_s"]) == ("air", "Apple M1", 12, 345.0)
        master.check()
        worker.check()
    finally:
        worker.close()
    time.sleep(0.5)
    master.check()  # a clean goodbye is not a loss
    assert coord.status()[1]["state"] == "left"


@pytest.mark.parametrize("token, match", [
    (None, "requires a join token"),
    ("wrong", "could not prove it knows the join token"),
])
def test_wrong_or_missing_token_is_refused(coord, token, match):
    with pytest.raises(JoinRefusedError, match=match):
        join(_cfg(master_port=coord.port, token=token), FP, _facts("air"), ":6001")
    assert coord.joined() == 1


def test_node_with_token_refuses_master_without_one():
    c = Coordinator(_cfg(token=None), FP, _facts("pro"), {}).start()
    try:
        with pytest.raises(JoinRefusedError, match="master has no join token"):
            join(_cfg(master_port=c.port), FP, _facts("air"), ":6001")
    finally:
        c.stop()


def test_wrong_proof_is_refused_by_master(coord):
    # A client that skips checking the master and sends a made-up proof.
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER)
    try:
        sock.connect(tcp("127.0.0.1", coord.port))
        sock.send(encode("hello", purpose="join", name="macfleet", cnonce="00"))
        assert sock.poll(5000)
        assert decode(sock.recv())["t"] == "challenge"
        sock.send(encode("auth", purpose="join", has_token=True, proof="ab" * 32, fingerprint=FP))
        assert sock.poll(5000)
        answer = decode(sock.recv())
        assert answer["t"] == "refuse" and "wrong join token" in answer["reason"]
    finally:
        sock.close(0)
        ctx.term()


def test_other_protocol_version_is_refused_by_name(coord):
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER)
    try:
        sock.connect(tcp("127.0.0.1", coord.port))
        frame = encode("hello", purpose="join", name="macfleet", cnonce="00").replace(
            f'"v":{PROTOCOL_VERSION}'.encode(), f'"v":{PROTOCOL_VERSION + 1}'.encode())
        sock.send(frame)
        assert sock.poll(5000)
        answer = decode(sock.recv())
        assert answer["t"] == "refuse"
        assert f"master speaks MacFleet protocol {PROTOCOL_VERSION}, this node speaks {PROTOCOL_VERSION + 1}" in answer["reason"]
    finally:
        sock.close(0)
        ctx.term()


def test_differing_config_is_refused_naming_each_key(coord, capsys):
    fp = dict(FP, model="gpt2", global_batch="128")
    with pytest.raises(JoinRefusedError) as info:
        join(_cfg(master_port=coord.port), fp, _facts("air"), ":6001")
    msg = str(info.value)
    assert "model: master resnet50, this node gpt2" in msg
    assert "global_batch: master 256, this node 128" in msg
    assert "compression" not in msg
    # The master says it too, with the same list.
    assert "refused a node's join from 127.0.0.1 (air): this node's config differs from the master's in what " \
           "must match: global_batch: master 256, this node 128; model: master resnet50, this node gpt2" \
           in capsys.readouterr().err


def test_other_cluster_name_is_refused(coord):
    with pytest.raises(JoinRefusedError, match="cluster name differs"):
        join(_cfg(master_port=coord.port, name="other"), FP, _facts("air"), ":6001")


def test_worker_without_master_says_so_and_times_out(capsys):
    t0 = time.monotonic()
    with pytest.raises(MacFleetError, match="found no MacFleet master at 127.0.0.1:1"):
        join(_cfg(master_port=1, wait_timeout=1.5), FP, _facts("air"), ":6001")
    assert 1.4 < time.monotonic() - t0 < 8
    assert "no master at 127.0.0.1:1 yet; retrying" in capsys.readouterr().err


def test_master_names_how_many_came_on_timeout():
    c = Coordinator(_cfg(nodes=3, wait_timeout=1.0), FP, _facts("pro"), {}).start()
    try:
        th, out = _join_in_thread(_cfg(master_port=c.port, wait_timeout=10), FP, _facts("air"), ":6001")
        with pytest.raises(MacFleetError, match=r"only 2 of cluster.nodes=3 nodes joined .*workers in: air"):
            c.wait_for_nodes(":6000")
        th.join(10)
        assert isinstance(out.get("exc"), JoinRefusedError)
    finally:
        c.stop()


def test_status_request_needs_the_token(coord):
    ctx = zmq.Context()
    try:
        answer = request(ctx, "127.0.0.1", coord.port, "secret", "macfleet", "status", {}, timeout=5)
        assert answer["nodes"][0]["host"] == "pro" and answer["nodes"][0]["rank"] == 0
        with pytest.raises(JoinRefusedError):
            request(ctx, "127.0.0.1", coord.port, "nope", "macfleet", "status", {}, timeout=5)
    finally:
        ctx.term()


def test_requested_ranks_and_auto_weights():
    cfg = _cfg(nodes=3, weight="auto")
    c = Coordinator(cfg, FP, _facts("pro", samples_per_s=300.0), {}).start()
    try:
        wcfg = _cfg(master_port=c.port, weight="auto")
        # "b" asks for rank 1 although it sorts after "a".
        t1, o1 = _join_in_thread(wcfg, FP, _facts("b", samples_per_s=100.0, rank=1), ":7001")
        t2, o2 = _join_in_thread(wcfg, FP, _facts("a", samples_per_s=200.0), ":7002")
        m = c.wait_for_nodes(":7000")
        t1.join(10)
        t2.join(10)
        assert [n["host"] for n in m.nodes] == ["pro", "b", "a"]
        assert m.weights == pytest.approx([0.5, 1 / 6, 1 / 3])
        assert (o1["m"].rank, o2["m"].rank) == (1, 2)
        o1["m"].close()
        o2["m"].close()
    finally:
        c.stop()


def test_weights_and_fingerprint_helpers():
    assert compute_weights(ClusterConfig(weights=[3, 1]), [1.0, 1.0], [None, None]) == [0.75, 0.25]
    assert compute_weights(ClusterConfig(), ["auto", 1.0], [10.0, None]) == [0.5, 0.5]
    with pytest.raises(MacFleetError, match="one weight per rank"):
        compute_weights(ClusterConfig(weights=[1, 1, 1]), [1, 1], [None, None])
    assert fingerprint_diff({"a": "1"}, {"a": "1"}) == []
    assert fingerprint_diff({"a": "1"}, {"b": "2"}) == ["a: master 1, this node (unset)", "b: master (unset), this node 2"]
    assert fingerprint_diff({"c": '"fp16"'}, {"c": '"none"'}) == ["c: master fp16, this node none"]


def test_a_flood_of_the_same_refusal_is_said_once_then_counted(capsys, monkeypatch):
    import zmq

    from macfleet.cluster import coordinator

    msg = {"t": "hello", "purpose": "join", "facts": {"host": "flood"}}
    for _ in range(100):
        coordinator.say_refused(zmq.Frame(b"x"), msg, "wrong join token (flood test)")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "flood test" in ln]
    assert len(lines) == 1 and "refused a node's join from ? (flood): wrong join token (flood test)" in lines[0]
    # Once the window has passed, the next one is said with the count of those held back.
    monkeypatch.setattr(coordinator, "_REFUSED_EVERY_S", 0.0)
    coordinator.say_refused(zmq.Frame(b"x"), msg, "wrong join token (flood test)")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "flood test" in ln]
    assert len(lines) == 1 and "(99 more like it in the last" in lines[0]
