"""Pack nested state (dicts, lists, tensors, numbers, strings, numpy arrays) into one uint8
tensor and back, without pickle.

Used to move per-rank state (RNG, error-feedback residuals) to rank 0 for a checkpoint and
resume state from rank 0 to every node. Format: 8-byte little-endian header length, a UTF-8
JSON skeleton in which each tensor is {"__t__": i, "dtype", "shape"}, then the raw bytes of the
tensors in order.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch

from macfleet.errors import FrameError

_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
                                torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
                                torch.uint16, torch.uint32, torch.uint64)}


def pack(obj) -> torch.Tensor:
    tensors: list[torch.Tensor] = []

    def enc(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().to("cpu").contiguous()
            tensors.append(t)
            return {"__t__": len(tensors) - 1, "dtype": str(t.dtype), "shape": list(t.shape)}
        if isinstance(o, np.ndarray):
            return {"__np__": enc(torch.from_numpy(np.ascontiguousarray(o)))}
        if isinstance(o, dict):
            if all(isinstance(k, str) for k in o):
                return {"__d__": {k: enc(v) for k, v in o.items()}}
            return {"__kv__": [[enc(k), enc(v)] for k, v in o.items()]}
        if isinstance(o, tuple):
            return {"__tuple__": [enc(v) for v in o]}
        if isinstance(o, list):
            return [enc(v) for v in o]
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"statepack cannot encode {type(o).__name__}")

    skeleton = json.dumps(enc(obj)).encode()
    parts = [struct.pack("<Q", len(skeleton)), skeleton]
    parts += [t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"" for t in tensors]
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def unpack(buf: torch.Tensor):
    raw = buf.contiguous().numpy().tobytes()
    if len(raw) < 8:
        raise FrameError("state blob too short")
    (n,) = struct.unpack_from("<Q", raw, 0)
    if 8 + n > len(raw):
        raise FrameError("state blob header length exceeds the blob")
    skeleton = json.loads(raw[8 : 8 + n])
    pos = 8 + n
    tensors: dict[int, torch.Tensor] = {}

    def dec(o):
        nonlocal pos
        if isinstance(o, list):
            return [dec(v) for v in o]
        if isinstance(o, dict):
            if "__t__" in o:
                dtype = _DTYPES[o["dtype"]]
                shape = o["shape"]
                count = int(np.prod(shape)) if shape else 1
                nbytes = count * torch.empty((), dtype=dtype).element_size()
                if pos + nbytes > len(raw):
                    raise FrameError("state blob truncated")
                chunk = bytearray(raw[pos : pos + nbytes])
                pos += nbytes
                t = torch.frombuffer(chunk, dtype=torch.uint8).view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
                return t.clone()
            if "__np__" in o:
                return dec(o["__np__"]).numpy()
            if "__d__" in o:
                return {k: dec(v) for k, v in o["__d__"].items()}
            if "__kv__" in o:
                return {dec(k): dec(v) for k, v in o["__kv__"]}
            if "__tuple__" in o:
                return tuple(dec(v) for v in o["__tuple__"])
        return o

    return dec(skeleton)
