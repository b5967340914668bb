"""safetensors reading and writing for the Python tools (the PyTorch references, the converters,
the training scripts): one implementation of the layout the engine reads (engine/nz_safetensors.c).

File layout written:

1. 8 bytes: the header's length N, little-endian u64;
2. N bytes: the header, compact JSON (no spaces, UTF-8): ``"__metadata__"`` first when given
   (str -> str), then one entry per tensor in the order given,
   ``{"dtype": "F32"|"F16"|"BF16"|"I64", "shape": [...], "data_offsets": [begin, end]}``,
   offsets relative to the data and contiguous; padded with spaces to a multiple of 8;
3. the tensors' raw little-endian bytes, back to back.

This is also tests/python/st_util.py's layout (an independent implementation the tests compare with).
Writes go to PATH.tmp, then replace PATH, so a reader never sees half a file.
"""

import json
import os
import struct

import numpy as np
import torch

_NP = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8"}
_TORCH = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def f32_to_bf16_bits(x):
    """float32 array -> uint16 bf16 bit patterns, rounded to nearest even (NaN stays a quiet NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = np.where(np.isnan(x), (u >> 16) | 0x40, r)
    return r.astype(np.uint16)


def _raw(name, t, dtype):
    """(dtype, shape, bytes) of one tensor: a torch tensor stores its own dtype; a numpy array is stored
    as dtype (default F32; BF16 wants the uint16 bit patterns, f32_to_bf16_bits)."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().contiguous()
        if t.dtype not in _TORCH:
            raise ValueError("tensor %s: dtype %s cannot be stored" % (name, t.dtype))
        dtype = _TORCH[t.dtype]
        a = t.view(torch.int16).numpy() if dtype == "BF16" else t.numpy()
    else:
        dtype = dtype or "F32"
        a = np.asarray(t)
    if dtype not in _NP:
        raise ValueError("tensor %s: dtype %s cannot be stored" % (name, dtype))
    return dtype, list(a.shape), np.ascontiguousarray(a).astype(_NP[dtype]).tobytes()  # int16 -> <u2 keeps bits


def write_safetensors(path, tensors, metadata=None):
    """Write PATH. tensors: a dict name -> tensor, or an iterable of (name, tensor) or
    (name, array, dtype); a tensor is a torch tensor (float32, float16, bfloat16, int64) or a numpy
    array. metadata: an optional dict, stored as str -> str.
    @return None; raises ValueError on a dtype safetensors cannot hold, OSError on a write error."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, off = [], 0
    for item in items:
        name, t, dtype = (item[0], item[1], item[2] if len(item) > 2 else None)
        dtype, shape, raw = _raw(name, t, dtype)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def read_safetensors(path):
    """Read PATH: name -> torch tensor, float32 for F32 / BF16 / F16 (exact), int64 for I64.
    @return the dict; raises ValueError naming the tensor on a dtype it cannot read or data that does
    not fit the header, OSError when the file cannot be read."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("%s: too short for a safetensors header" % path)
        n = struct.unpack("<Q", head)[0]
        hdr = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        dt = v["dtype"]
        if dt not in _NP:
            raise ValueError("%s: tensor %s has unsupported dtype %s" % (path, k, dt))
        b, e = v["data_offsets"]
        if not 0 <= b <= e <= len(data):
            raise ValueError("%s: tensor %s lies outside the data (%d..%d of %d bytes)" % (path, k, b, e, len(data)))
        a = np.frombuffer(data[b:e], dtype=_NP[dt])
        if dt == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        a = a.astype(np.int64 if dt == "I64" else np.float32)
        out[k] = torch.from_numpy(a.reshape(v["shape"]).copy())
    return out
