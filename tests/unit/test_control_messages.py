"""Control messages in one process: every malformed frame is a FrameError (never another
exception), heartbeat signatures, the fingerprint's normal form and how a difference is named."""

from __future__ import annotations

import json
import random

import pytest

from macfleet.cluster.membership import leave_reason
from macfleet.cluster.protocol import SCHEMAS, decode, encode, session_key, sign, verify
from macfleet.errors import FrameError
from macfleet.fingerprint import LISTED, diff, fingerprint

VALID = [
    encode("hello", purpose="join", name="macfleet", cnonce="ab" * 16),
    encode("auth", purpose="join", has_token=True, proof="cd" * 32, fingerprint={"trainer.epochs": "10"},
           facts={"host": "air", "rank": 1, "samples_per_s": 300.0}, tensor_addr=":6001", weight="auto", proto=1),
    encode("welcome", rank=1, world_size=2, generation=1, addrs=[":6000", "10.0.0.2:6001"], weights=[0.5, 0.5],
           run={"run_id": "r"}, nodes=[{"host": "pro"}, {"host": "air"}], hb_port=6002, peer_id="g1-r1", proto=1),
    encode("hb", peer="g1-r1", n=3, step=12, samples_per_s=345.0, state="training",
           gone={"g1-r2": {"rank": 2, "kind": "left", "msg": "rank 2 left (Ctrl-C)", "reason": "Ctrl-C", "after": None}}),
    encode("bye", peer="g1-r1", n=4, reason="Ctrl-C", after=None, step=12, rank=1),
]
JUNK = [None, True, -1, 0, 2**70, 1.5, float("inf"), "", "x" * 70000, [], [1, [2]], {}, {"a": {"b": None}}]


def _mutations(rng: random.Random, frame: bytes):
    msg = json.loads(frame)
    for _ in range(400):
        bad = dict(msg)
        key = rng.choice([*msg, "t", "v", "extra"])
        bad[key] = rng.choice(JUNK + [rng.choice(list(SCHEMAS))])
        yield json.dumps(bad).encode()
        raw = bytearray(frame)
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        yield bytes(raw)
        yield frame[: rng.randrange(len(frame))]


def test_valid_messages_pass_and_every_mutation_is_a_frame_error_or_valid():
    for frame in VALID:
        assert decode(frame)["t"] == json.loads(frame)["t"]
    rng = random.Random(5)
    counts = {"ok": 0, "refused": 0}
    for frame in VALID:
        for bad in _mutations(rng, frame):
            try:
                msg = decode(bad)
            except FrameError:
                counts["refused"] += 1
                continue
            counts["ok"] += 1  # still well-formed (e.g. an extra field): every field it has is right
            for name, check in SCHEMAS[msg["t"]].items():
                if name in msg:
                    check(msg[name], name)
    assert counts["refused"] > 4000, counts


@pytest.mark.parametrize("frame, words", [
    (b"[" * 100000, "not JSON"),
    (b'{"t":"hello","v":1,"cnonce":' + b"1" * 5000 + b"}", "not JSON"),
    (encode("auth", purpose="join", has_token=True, proof="", fingerprint=5), "auth.fingerprint must be an object"),
    (encode("hello", purpose="join", name="m", cnonce="00").replace(b'"v":1', b'"v":true'), "lacks its type"),
    (encode("boom"), "unknown control message kind 'boom'"),
    (encode("welcome", rank=2, world_size=2, generation=1, addrs=[":1", ":2"], weights=[0.5, 0.5], run={},
            nodes=[{}, {}], hb_port=3, peer_id="p"), "inconsistent"),
    (encode("auth", purpose="join", has_token=False, proof="", tensor_addr="h:70000"), "port in [0, 65535]"),
    (encode("hb", samples_per_s=float("nan")), "finite number"),
])
def test_hostile_frames_name_what_is_wrong(frame, words):
    with pytest.raises(FrameError) as info:
        decode(frame)
    assert words in str(info.value)


def test_signatures_bind_key_direction_and_body():
    key = session_key("tok", "aa", "bb")
    assert key != session_key("tok", "aa", "bc") and key != session_key("other", "aa", "bb")
    body, mac = sign(key, b"node->master", b'{"t":"bye"}')
    assert verify(key, b"node->master", body, mac)
    assert not verify(key, b"master->node", body, mac)  # reflected back: refused
    assert not verify(key, b"node->master", b'{"t":"hb"}', mac)
    assert not verify(session_key("tok", "aa", "cc"), b"node->master", body, mac)
    assert not verify(key, b"node->master", body, mac[:-1])


def test_fingerprint_is_canonical_and_leaves_per_node_keys_out():
    a = fingerprint({"trainer": {"learning_rate": 1, "device": "cpu", "epochs": 3.0}, "cluster": {"role": "master",
                     "heartbeat_interval": 1.0, "token": "secret"}, "logger": {"name": "wandb"}, "run_id": "x"})
    b = fingerprint({"trainer": {"learning_rate": 1.0, "device": "mps", "epochs": 3}, "cluster": {"role": "worker",
                     "heartbeat_interval": 1, "token": None}, "logger": {"name": "none"}, "run_id": "y"})
    assert a == b == {"trainer.learning_rate": "1", "trainer.epochs": "3", "cluster.heartbeat_interval": "1"}
    assert "secret" not in json.dumps(a)


def test_diff_names_every_key_with_both_values_settings_first():
    master = fingerprint({"trainer": {"learning_rate": 0.1, "optimizer": "sgd"}, "model": {"layers": {"fc": "Linear(2)"}},
                          "optimizer": {"class": "torch.optim.sgd.SGD"}})
    node = fingerprint({"trainer": {"learning_rate": 0.5, "optimizer": None}, "model": {"layers": {"fc": "Linear(3)"}},
                        "compression": {"name": "fp16"}, "optimizer": {"class": "torch.optim.adamw.AdamW"}})
    # trainer.optimizer is a copy of the optimizer group (null in train.py): the built one counts.
    assert diff(master, node) == ["compression.name: master (unset), this node fp16",
                                  "optimizer.class: master torch.optim.sgd.SGD, this node torch.optim.adamw.AdamW",
                                  "trainer.learning_rate: master 0.1, this node 0.5",
                                  "model.layers.fc: master Linear(2), this node Linear(3)"]
    many = diff({f"k{i}": "1" for i in range(LISTED + 5)}, {})
    assert len(many) == LISTED + 1 and many[-1] == "and 5 more differences"


def test_leave_reason():
    assert leave_reason(None) is None and leave_reason(SystemExit(0)) is None
    assert leave_reason(KeyboardInterrupt()) == "Ctrl-C"
    assert leave_reason(RuntimeError("CUDA out of memory\nmore")) == "stopped on RuntimeError: CUDA out of memory"
