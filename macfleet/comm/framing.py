"""Wire format of the data plane: one header frame + one raw buffer frame per message.

Every data-plane message is a ZeroMQ multipart message of exactly two frames:

    frame 0  header, little-endian, fixed part of 60 bytes followed by the shape:
               offset size field
                    0    2 magic        b"MF"
                    2    1 version      WIRE_VERSION (bumped on any incompatible change)
                    3    1 kind         1 HELLO (connection check, empty body), 2 DATA
                    4    1 dtype        code from DTYPE_CODES (float32=1 ... uint8=6)
                    5    1 ndim         number of dimensions of the whole tensor (<= MAX_NDIM)
                    6    2 sender       rank of the sender
                    8    4 generation   membership generation; other generations are dropped
                   12    8 session      64-bit id of this Group's run and generation (unsigned);
                                        frames of another session are rejected, never summed
                   20    8 step         training step set by Group.set_step (signed)
                   28    8 seq          per-Group collective counter: which collective this is
                   36    8 offset       byte offset of this chunk inside the whole tensor
                   44    8 nbytes       bytes in frame 1 (this chunk)
                   52    8 total        bytes of the whole tensor = numel(shape) * itemsize
                   60 8*ndim shape      int64 per dimension, each >= 0
    frame 1  the chunk's raw bytes (native little-endian element order), nbytes long.

A tensor larger than the chunk size travels as several messages with increasing offsets and the
same header otherwise, so the receiver can land each chunk where it belongs and reuse buffers.
The session exists because a PUSH socket whose peer died keeps its queued frames and delivers
them to whichever process binds that port next: sender, generation and seq of such a stale frame
can all look right, the session (every rank of one Group shares it, two runs differ) does not.
No pickle anywhere: a frame is decoded with `struct` and checked before a single byte is used.
`decode` raises `FrameError` naming what was wrong (version, truncation, size, dtype, shape).
"""

from __future__ import annotations

import hashlib
import os
import struct
import warnings
from dataclasses import dataclass

import torch

from macfleet.errors import FrameError, MacFleetError

# zmq frames are read-only buffers; tensors over them are only read (sums, copies), never written.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

WIRE_VERSION = 2
MAGIC = b"MF"
MAX_NDIM = 16
KIND_HELLO = 1
KIND_DATA = 2
SESSION_BITS = 64

_FIXED = struct.Struct("<2sBBBBHIQqQQQQ")
HEADER_FIXED_BYTES = _FIXED.size

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.uint8: 6,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in DTYPE_CODES}
SUPPORTED_DTYPES = tuple(DTYPE_CODES)


@dataclass(frozen=True)
class Header:
    """The decoded frame 0 of one message."""

    kind: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    sender: int
    generation: int
    session: int
    step: int
    seq: int
    offset: int
    nbytes: int
    total: int


def session_id(*parts) -> int:
    """A stable 64-bit session from values every rank of one run knows (e.g. run id, generation).

    blake2b, not hash(): Python salts str hashes per process, and the ranks must agree.
    """
    text = "\x1f".join(str(p) for p in parts)  # a separator no run id contains, so ("a1", 2) != ("a", 12)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=SESSION_BITS // 8).digest(), "little")


def random_session() -> int:
    """A fresh random 64-bit session, for a rendezvous where one rank draws and publishes it."""
    return int.from_bytes(os.urandom(SESSION_BITS // 8), "little")


def check_session(session) -> int:
    if isinstance(session, bool) or not isinstance(session, int) or not 0 <= session < 1 << SESSION_BITS:
        raise MacFleetError(
            f"session={session!r} must be an int in [0, 2**{SESSION_BITS}); derive it with session_id()")
    return session


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise FrameError(f"dtype {dtype} cannot be sent; convert the tensor to one of {names}") from None


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * ITEMSIZE[dtype]


def encode_header(h: Header) -> bytes:
    if len(h.shape) > MAX_NDIM:
        raise FrameError(f"tensor has {len(h.shape)} dimensions; at most {MAX_NDIM} can be sent, reshape it")
    fixed = _FIXED.pack(
        MAGIC, WIRE_VERSION, h.kind, dtype_code(h.dtype), len(h.shape), h.sender, h.generation,
        h.session, h.step, h.seq, h.offset, h.nbytes, h.total,
    )
    return fixed + struct.pack(f"<{len(h.shape)}q", *h.shape)


def encode(h: Header, body=None) -> list:
    """Frames of one message: [header bytes, body buffer]. The body is not copied here."""
    return [encode_header(h), body if body is not None else b""]


def decode_header(buf, *, world_size: int | None = None) -> Header:
    """Parse and check frame 0; raise FrameError saying what is wrong."""
    buf = memoryview(buf)
    if len(buf) < HEADER_FIXED_BYTES:
        raise FrameError(
            f"truncated header: {len(buf)} bytes, need at least {HEADER_FIXED_BYTES}; "
            "the sender is not a MacFleet rank of this version, or the message was cut"
        )
    (magic, version, kind, code, ndim, sender, generation, session, step, seq, offset, nbytes,
     total) = _FIXED.unpack_from(buf)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}: something other than a MacFleet rank is sending to the tensor port")
    if version != WIRE_VERSION:
        raise FrameError(
            f"wire version {version} from rank {sender}, this rank speaks {WIRE_VERSION}: "
            "install the same macfleet version on every node"
        )
    if kind not in (KIND_HELLO, KIND_DATA):
        raise FrameError(f"unknown message kind {kind} from rank {sender}")
    if code not in CODE_DTYPES:
        raise FrameError(f"unknown dtype code {code} from rank {sender}; known codes: {sorted(CODE_DTYPES)}")
    if ndim > MAX_NDIM:
        raise FrameError(f"header claims {ndim} dimensions (max {MAX_NDIM}) from rank {sender}")
    if world_size is not None and sender >= world_size:
        raise FrameError(f"sender rank {sender} is outside this group of {world_size} ranks")
    expected_len = HEADER_FIXED_BYTES + 8 * ndim
    if len(buf) != expected_len:
        raise FrameError(
            f"header from rank {sender} is {len(buf)} bytes but {ndim} dimensions need {expected_len}: truncated or padded"
        )
    shape = struct.unpack_from(f"<{ndim}q", buf, HEADER_FIXED_BYTES)
    if any(dim < 0 for dim in shape):
        raise FrameError(f"negative dimension in shape {shape} from rank {sender}")
    dtype = CODE_DTYPES[code]
    if tensor_nbytes(dtype, shape) != total:
        raise FrameError(
            f"header from rank {sender} says shape {tuple(shape)} of {dtype} ({tensor_nbytes(dtype, shape)} bytes) "
            f"but total {total} bytes"
        )
    if offset + nbytes > total:
        raise FrameError(f"chunk [{offset}, {offset + nbytes}) from rank {sender} lies outside the {total}-byte tensor")
    return Header(kind, dtype, tuple(shape), sender, generation, session, step, seq, offset, nbytes, total)


def decode(frames, *, world_size: int | None = None) -> tuple[Header, memoryview]:
    """Parse a received multipart message into (header, body view); raise FrameError if malformed."""
    if len(frames) != 2:
        raise FrameError(f"message has {len(frames)} frames, a MacFleet data message has exactly 2 (header, body)")
    header = decode_header(_buffer(frames[0]), world_size=world_size)
    body = _buffer(frames[1])
    if len(body) != header.nbytes:
        raise FrameError(
            f"body from rank {header.sender} is {len(body)} bytes but the header says {header.nbytes}: "
            "truncated or wrong-size frame"
        )
    return header, body


def _buffer(frame) -> memoryview:
    # zmq.Frame exposes .buffer; bytes and memoryviews are used as they are.
    return memoryview(getattr(frame, "buffer", frame)).cast("B")


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor without a copy; the view keeps the tensor alive."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(bytearray(0))
    return memoryview(flat.view(torch.uint8).numpy())


def as_tensor(body: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor over received bytes without a copy (read-only use: sums and copies)."""
    if len(body) == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(body, dtype=dtype)
