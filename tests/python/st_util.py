"""Minimal safetensors reader/writer for tests (numpy only).

The safetensors layout is: u64 little-endian N, then N bytes of UTF-8 JSON
header, then the data section. The header maps each tensor name to
``{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}`` (offsets
relative to the data section) and may hold a ``"__metadata__"`` object of
string values.

Tensors are passed around as raw element values: a numpy array whose dtype
has the width of the safetensors dtype. Types numpy lacks are carried as
unsigned bit patterns: BF16 as uint16 (see f32_to_bf16_bits /
bf16_bits_to_f32), F8_E4M3 and F8_E5M2 as uint8.

write_safetensors() produces the same bytes as the C writer
(engine/nz_safetensors.c) and the reference implementation: compact JSON,
``__metadata__`` first, tensors laid out consecutively in the given order,
header padded with spaces so that the data section starts at a multiple of 8.

Example::

    from st_util import write_safetensors, read_safetensors, f32_to_bf16_bits
    write_safetensors("m.safetensors",
                      {"w": ("BF16", f32_to_bf16_bits(np.ones((2, 3), np.float32))),
                       "step": ("I64", np.array(7))},
                      metadata={"format": "pt"})
    tensors, meta = read_safetensors("m.safetensors")
    dtype, shape, raw = tensors["w"]          # "BF16", (2, 3), 12 bytes
"""

import json
import struct

import numpy as np

# safetensors dtype -> numpy dtype of the raw element values (little-endian).
NUMPY_DTYPES = {
    "BOOL": np.dtype("bool"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "F8_E4M3": np.dtype("u1"),  # bit patterns
    "F8_E5M2": np.dtype("u1"),  # bit patterns
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # bit patterns
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F64": np.dtype("<f8"),
}

# dtypes stored as bit patterns: the caller must give integers of that width.
_BIT_PATTERN_DTYPES = {"BF16", "F8_E4M3", "F8_E5M2"}

METADATA_KEY = "__metadata__"


def dtype_size(dtype):
    """Bytes per element of a safetensors dtype string (KeyError if unknown)."""
    return NUMPY_DTYPES[dtype].itemsize


def f32_to_bf16_bits(x):
    """float32 values -> bfloat16 bit patterns (uint16), round to nearest even.

    NaNs stay NaN (quiet)."""
    x = np.asarray(x, dtype=np.float32, order="C")
    u = x.view(np.uint32).astype(np.uint64)
    sh = np.uint64(16)
    rounded = (u + np.uint64(0x7FFF) + ((u >> sh) & np.uint64(1))) >> sh
    quiet_nan = (u >> sh) | np.uint64(0x40)
    return np.where(np.isnan(x), quiet_nan, rounded).astype(np.uint16)


def bf16_bits_to_f32(bits):
    """bfloat16 bit patterns (uint16) -> float32 values (exact)."""
    bits = np.asarray(bits, dtype=np.uint16, order="C")
    wide = np.asarray(bits.astype(np.uint32) << np.uint32(16), dtype=np.uint32)
    return wide.view(np.float32)


def _raw_values(name, dtype, values):
    """Check/convert values to the numpy dtype that stores `dtype`."""
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
    want = NUMPY_DTYPES[dtype]
    arr = np.asarray(values)
    if dtype in _BIT_PATTERN_DTYPES:
        if arr.dtype.kind not in "iu" or arr.dtype.itemsize != want.itemsize:
            raise TypeError(
                f"tensor {name!r}: {dtype} takes {want.itemsize * 8}-bit integer bit patterns, "
                f"got {arr.dtype} (use f32_to_bf16_bits for BF16)"
            )
        return np.asarray(arr, order="C").view(want)
    # (np.ascontiguousarray would turn 0-d scalars into shape (1,))
    return np.asarray(arr, dtype=want, order="C")


def build_safetensors(tensors, metadata=None):
    """Return the bytes of a safetensors file (see write_safetensors)."""
    header = {}
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str to str, got {k!r}: {v!r}")
        header[METADATA_KEY] = dict(metadata)
    blobs = []
    offset = 0
    for name, (dtype, values) in tensors.items():
        if name == METADATA_KEY:
            raise ValueError(f"tensor name {METADATA_KEY!r} is reserved")
        arr = _raw_values(name, dtype, values)
        raw = arr.tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": [int(d) for d in arr.shape],
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write_safetensors(path, tensors, metadata=None):
    """Write a safetensors file.

    tensors:  dict name -> (dtype_str, values); values is anything np.asarray
              accepts; it is converted to the dtype's storage type (see
              NUMPY_DTYPES), except BF16/F8_* which must already be integer
              bit patterns of the right width. Insertion order = data order.
    metadata: optional dict str -> str, written as "__metadata__" (first).
    """
    data = build_safetensors(tensors, metadata)
    with open(path, "wb") as f:
        f.write(data)


def parse_safetensors(data):
    """Parse safetensors bytes; see read_safetensors for the result."""
    if len(data) < 8:
        raise ValueError(f"truncated: {len(data)} bytes")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > len(data) - 8:
        raise ValueError(f"header length {n} exceeds file size {len(data)}")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    body = data[8 + n :]
    metadata = header.pop(METADATA_KEY, None)
    tensors = {}
    for name, info in header.items():
        dtype = info["dtype"]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = info["data_offsets"]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype_size(dtype)
        if not 0 <= begin <= end <= len(body) or end - begin != nbytes:
            raise ValueError(f"tensor {name!r}: bad data_offsets {[begin, end]}")
        tensors[name] = (dtype, shape, bytes(body[begin:end]))
    return tensors, metadata


def read_safetensors(path):
    """Read a safetensors file.

    Returns (tensors, metadata): tensors maps name -> (dtype_str, shape tuple,
    raw bytes) in header order; metadata is the "__metadata__" dict or None.
    """
    with open(path, "rb") as f:
        return parse_safetensors(f.read())


def to_numpy(dtype, shape, raw):
    """Raw bytes of one tensor -> numpy array of its storage type (BF16 as uint16)."""
    return np.frombuffer(raw, dtype=NUMPY_DTYPES[dtype]).reshape(shape)


def read_arrays(path):
    """Like read_safetensors but values are numpy arrays (see to_numpy)."""
    tensors, metadata = read_safetensors(path)
    return {k: (d, to_numpy(d, s, r)) for k, (d, s, r) in tensors.items()}, metadata
