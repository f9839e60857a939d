"""Wire format: round trips for every dtype and shape, and clear errors for malformed frames."""

from __future__ import annotations

import struct

import pytest
import torch

from macfleet.comm import framing
from macfleet.comm.framing import KIND_DATA, Header, as_tensor, byte_view, decode, encode
from macfleet.errors import FrameError, MacFleetError

SHAPES = [(0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 1, 5), ()]


def _header(t: torch.Tensor, **over) -> Header:
    fields = dict(kind=KIND_DATA, dtype=t.dtype, shape=tuple(t.shape), sender=1, generation=3,
                  session=0xFEDC_BA98_7654_3210, step=-2, seq=9,
                  offset=0, nbytes=t.numel() * t.element_size(), total=t.numel() * t.element_size())
    fields.update(over)
    return Header(**fields)


@pytest.mark.parametrize("dtype", framing.SUPPORTED_DTYPES)
def test_round_trip_every_dtype_and_shape(dtype):
    for shape in SHAPES:
        t = (torch.randn(shape) * 50).to(dtype) if shape else torch.tensor(3).to(dtype)
        frames = encode(_header(t), byte_view(t))
        # What the receiver sees: bytes off the wire, not the sender's buffers.
        header, body = decode([bytes(frames[0]), bytes(frames[1])], world_size=2)
        assert header == _header(t)
        back = as_tensor(body, header.dtype).reshape(header.shape)
        assert back.dtype == dtype and back.shape == t.shape
        assert torch.equal(back, t)


def test_byte_view_is_zero_copy_and_writable():
    t = torch.zeros(4, dtype=torch.bfloat16)
    mv = byte_view(t)
    mv[0:2] = torch.tensor([1.5], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    assert t[0].item() == 1.5
    assert len(byte_view(torch.empty(0))) == 0


def _good_frames():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    return [framing.encode_header(_header(t)), bytes(byte_view(t))]


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda f: [f[0][:2] + bytes([framing.WIRE_VERSION + 1]) + f[0][3:], f[1]], "wire version"),
        (lambda f: [f[0][:20], f[1]], "truncated header"),
        (lambda f: [f[0][:-4], f[1]], "truncated or padded"),
        (lambda f: [f[0], f[1][:-4]], "truncated or wrong-size"),
        (lambda f: [f[0], f[1] + b"\0" * 8], "wrong-size"),
        (lambda f: [f[0][:4] + bytes([99]) + f[0][5:], f[1]], "unknown dtype"),
        (lambda f: [b"XX" + f[0][2:], f[1]], "bad magic"),
        (lambda f: [f[0]], "exactly 2"),
        (lambda f: [f[0][:6] + struct.pack("<H", 7) + f[0][8:], f[1]], "outside this group"),
        # Byte offsets from the table in framing's docstring: total at 52, offset at 36, shape at 60.
        (lambda f: [f[0][:52] + struct.pack("<Q", 999) + f[0][60:], f[1]], "total"),
        (lambda f: [f[0][:36] + struct.pack("<Q", 20) + f[0][44:], f[1]], "outside the"),
        (lambda f: [f[0][:60] + struct.pack("<q", -2) + f[0][68:], f[1]], "negative"),
    ],
)
def test_malformed_frames_raise_clear_errors(mutate, words):
    with pytest.raises(FrameError, match=words):
        decode(mutate(_good_frames()), world_size=2)


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(FrameError, match="convert the tensor"):
        framing.dtype_code(torch.complex64)


def test_header_layout_matches_the_docstring_and_carries_the_full_64_bit_session():
    t = torch.zeros(2, 3)
    for session in (0, 1, 2**63, 2**64 - 1):
        head = framing.encode_header(_header(t, session=session))
        assert framing.HEADER_FIXED_BYTES == 60 and len(head) == 60 + 8 * 2
        assert struct.unpack_from("<Q", head, 12)[0] == session
        assert framing.decode_header(head).session == session


def test_session_ids_are_stable_distinct_and_checked():
    # Same inputs, same id (what every rank of one run relies on); a neighbouring run or generation differs.
    assert framing.session_id("2024-01-01_00-00-00_abc123", 0) == framing.session_id("2024-01-01_00-00-00_abc123", 0)
    ids = {framing.session_id(run, gen) for run in ("run-a", "run-b", "run-a1") for gen in (0, 1, 10)}
    ids.add(framing.session_id("run-a", 11))
    assert len(ids) == 10
    assert all(0 <= i < 2**64 for i in ids)
    assert framing.random_session() != framing.random_session()
    for bad in (-1, 2**64, 1.5, "7", True):
        with pytest.raises(MacFleetError, match="session"):
            framing.check_session(bad)
