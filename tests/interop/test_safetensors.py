"""The NumPy safetensors reader / writer (files written by the reference library are the HF
fixtures; this file checks round trips, the reference library reading ours, and bad files)."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from jaxllm.interop import safetensors as st

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.int8, np.uint8]


def _tensors():
    rng = np.random.default_rng(0)
    out = {}
    for i, dt in enumerate(DTYPES):
        shape = [(3, 5), (7,), (2, 3, 4), (1,), (0, 4), (4, 1), (6,)][i]
        out[f"t{i}.{np.dtype(dt).name}"] = (rng.standard_normal(shape) * 50).astype(dt)
    return out


def _write(path, tensors, metadata=None):
    entries = [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()]
    return st.write(path, entries, metadata)


def test_round_trip_every_dtype(tmp_path):
    tensors = _tensors()
    size = _write(tmp_path / "a.safetensors", tensors, {"format": "pt", "note": "x"})
    assert size == (tmp_path / "a.safetensors").stat().st_size
    f = st.SafetensorsFile(tmp_path / "a.safetensors")
    assert f.metadata == {"format": "pt", "note": "x"}
    assert f.names() == list(tensors)
    for name, want in tensors.items():
        got = f.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert not got.flags.writeable  # a view of the read-only map, not a copy


def test_data_starts_eight_byte_aligned(tmp_path):
    _write(tmp_path / "a.safetensors", _tensors())
    (n,) = struct.unpack("<Q", (tmp_path / "a.safetensors").read_bytes()[:8])
    assert (8 + n) % 8 == 0


def test_the_reference_library_reads_what_we_write(tmp_path):
    pytest.importorskip("safetensors")
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    tensors = _tensors()
    _write(tmp_path / "a.safetensors", tensors)
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        assert list(f.keys()) == sorted(tensors)
        for name, want in tensors.items():
            got = f.get_tensor(name)
            if want.dtype == ml_dtypes.bfloat16:
                got, want = got.to(torch.float32), want.astype(np.float32)
            np.testing.assert_array_equal(got.numpy(), want)


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x01\x00")
    with pytest.raises(st.SafetensorsError, match="too short"):
        st.SafetensorsFile(bad)
    bad.write_bytes(struct.pack("<Q", 5) + b"nope!")
    with pytest.raises(st.SafetensorsError, match="not JSON"):
        st.SafetensorsFile(bad)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    with pytest.raises(st.SafetensorsError, match="bad data offsets"):
        st.SafetensorsFile(bad)
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00")
    with pytest.raises(st.SafetensorsError, match="dtype 'F8_E4M3'"):
        st.SafetensorsFile(bad)


def test_a_produced_tensor_must_have_its_declared_shape(tmp_path):
    with pytest.raises(st.SafetensorsError, match="declared"):
        st.write(tmp_path / "a.safetensors", [("w", (2, 2), np.float32, lambda: np.zeros(3))])
