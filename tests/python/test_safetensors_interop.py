"""safetensors files written with numpy only (tests/python/st_util.py).

The C reader/writer are covered by tests/test_safetensors.c, which also holds
a golden image produced by st_util.build_safetensors and checks that the C
writer reproduces it byte for byte; test_golden_image below pins the Python
side of that contract.
"""

import json
import struct

import numpy as np
import pytest

import st_util


def _sample_tensors():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    return {
        "model.embed.weight": ("BF16", st_util.f32_to_bf16_bits(w)),
        "model.norm.weight": ("F16", np.linspace(-2, 2, 9, dtype=np.float16)),
        "lm_head.weight": ("F32", w),
        "position_ids": ("I64", np.arange(6, dtype=np.int64).reshape(2, 3) - 3),
        "step": ("I64", np.array(12345678901)),  # 0-d scalar
        "empty": ("U8", np.zeros((0, 4), np.uint8)),  # zero-size
        "mask": ("BOOL", np.array([True, False, True])),
        "fp8": ("F8_E4M3", np.array([0x38, 0xB8, 0x7E], np.uint8)),
        "d": ("F64", np.array([np.pi, -np.e])),
    }


def test_round_trip(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = _sample_tensors()
    st_util.write_safetensors(path, tensors, metadata={"format": "pt", "nz": "test"})

    got, meta = st_util.read_safetensors(path)
    assert meta == {"format": "pt", "nz": "test"}
    assert list(got) == list(tensors)
    for name, (dtype, values) in tensors.items():
        gd, shape, raw = got[name]
        assert gd == dtype
        assert shape == np.shape(values)
        expect = np.asarray(values, dtype=st_util.NUMPY_DTYPES[dtype])
        assert raw == expect.tobytes()
        np.testing.assert_array_equal(st_util.to_numpy(gd, shape, raw), expect)

    arrays, _ = st_util.read_arrays(path)
    assert arrays["step"][1].shape == ()
    assert int(arrays["step"][1]) == 12345678901
    assert arrays["empty"][1].shape == (0, 4)


def test_layout(tmp_path):
    """Length prefix, space padding to 8, consecutive offsets, metadata first."""
    path = tmp_path / "m.safetensors"
    tensors = _sample_tensors()
    st_util.write_safetensors(path, tensors, metadata={"k": "v"})
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    assert (8 + n) % 8 == 0
    text = data[8 : 8 + n].decode("utf-8")
    assert text.rstrip(" ").endswith("}") and len(text) - len(text.rstrip(" ")) < 8
    assert text.startswith('{"__metadata__":{"k":"v"},')
    header = json.loads(text)
    offset = 0
    for name, (dtype, values) in tensors.items():
        info = header[name]
        size = int(np.prod(np.shape(values))) * st_util.dtype_size(dtype)
        assert info["data_offsets"] == [offset, offset + size]
        offset += size
    assert len(data) == 8 + n + offset


def test_golden_image():
    """The image embedded in tests/test_safetensors.c (k_golden_header/data)."""
    data = st_util.build_safetensors(
        {
            "w.bf16": ("BF16", np.array([0x3F80, 0xC000, 0x7F80], np.uint16)),
            "step": ("I64", np.array(-2)),
            "empty": ("U8", np.zeros((0, 3), np.uint8)),
            "f": ("F32", np.array([[1.5], [-0.25]], np.float32)),
        },
        metadata={"format": "pt", "by": "st_util"},
    )
    header = (
        b'{"__metadata__":{"format":"pt","by":"st_util"},'
        b'"w.bf16":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]},'
        b'"step":{"dtype":"I64","shape":[],"data_offsets":[6,14]},'
        b'"empty":{"dtype":"U8","shape":[0,3],"data_offsets":[14,14]},'
        b'"f":{"dtype":"F32","shape":[2,1],"data_offsets":[14,22]}} '
    )
    body = bytes.fromhex("803f00c0807f" "feffffffffffffff" "0000c03f000080be")
    assert data == struct.pack("<Q", len(header)) + header + body


def test_bf16_bits():
    x = np.array([1.0, -2.5, 0.0, np.inf, 1.00390625, 1.01171875, 3.4e38], np.float32)
    bits = st_util.f32_to_bf16_bits(x)
    assert bits.dtype == np.uint16
    # exact values, ties to even, overflow to inf
    assert [hex(b) for b in bits] == [
        "0x3f80", "0xc020", "0x0", "0x7f80", "0x3f80", "0x3f82", "0x7f80"
    ]
    np.testing.assert_array_equal(st_util.bf16_bits_to_f32(bits[:4]), x[:4])
    assert np.isnan(st_util.bf16_bits_to_f32(st_util.f32_to_bf16_bits(np.float32(np.nan))))
    assert st_util.f32_to_bf16_bits(np.float32(1.0)).shape == ()


def test_writer_rejects_bad_input(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(TypeError, match="bit patterns"):
        st_util.write_safetensors(path, {"w": ("BF16", np.ones(3, np.float32))})
    with pytest.raises(ValueError, match="unknown dtype"):
        st_util.write_safetensors(path, {"w": ("F7", np.ones(3))})
    with pytest.raises(ValueError, match="reserved"):
        st_util.write_safetensors(path, {"__metadata__": ("U8", np.ones(3))})
    with pytest.raises(TypeError, match="metadata"):
        st_util.write_safetensors(path, {}, metadata={"k": 1})


def test_reader_rejects_bad_files():
    good = st_util.build_safetensors({"a": ("F32", np.ones(4, np.float32))})
    for cut in (0, 7, 20, len(good) - 1):
        with pytest.raises(ValueError):
            st_util.parse_safetensors(good[:cut])
