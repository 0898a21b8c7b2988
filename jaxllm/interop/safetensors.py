"""Reading and writing the safetensors format with NumPy alone, one tensor at a time.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets
relative to the end of the header) and the raw little-endian tensor bytes. Reading maps the file
(`np.memmap`), so a tensor is a view into the page cache until someone copies it: loading a
checkpoint never holds a second full copy in host memory. Writing streams tensors in order, so
only one is in host memory at a time. bfloat16 comes from `ml_dtypes` (a JAX dependency); the
`safetensors` package is not needed (and its NumPy backend has no bfloat16).

Only this format and JSON are read — never pickle.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
# Headers are small JSON; refuse absurd lengths instead of reading a corrupt file into memory.
_MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
    """A file that is not valid safetensors, or a tensor it does not hold."""


class SafetensorsFile:
    """The tensors of one `.safetensors` file, read lazily from a memory map.

    `names()`, `shape(name)`, `dtype(name)` read only the header; `get(name)` returns a read-only
    array view of the mapped bytes.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path}: too short to be a safetensors file")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER:
                    raise SafetensorsError(f"{self.path}: header of {n} bytes; not safetensors")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: the header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: the header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict] = header
        self._data_start = 8 + n
        size = self.path.stat().st_size
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has dtype {e.get('dtype')!r}")
            begin, end = e["data_offsets"]
            want = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - begin != want or self._data_start + end > size:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has bad data offsets")
        self._map: np.memmap | None = None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entry(name)["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only view into the mapped file."""
        e = self._entry(name)
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = e["data_offsets"]
        raw = self._map[self._data_start + begin : self._data_start + end]
        return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])

    def _entry(self, name: str) -> dict:
        try:
            return self._entries[name]
        except KeyError:
            raise SafetensorsError(f"{self.path}: no tensor {name!r}") from None


def write(
    path: str | Path,
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file from `(name, shape, dtype, produce)` entries; returns its size.

    The header is written first from the shapes and dtypes, then each `produce()` is called in
    turn and its bytes appended, so only one tensor is in host memory at a time.
    """
    entries = list(tensors)
    header: dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype, _ in entries:
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise SafetensorsError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": _NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    # The data that follows starts 8-byte aligned, as the reference writer does.
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in entries:
            array = np.ascontiguousarray(produce(), dtype=np.dtype(dtype))
            if array.shape != tuple(shape):
                raise SafetensorsError(f"tensor {name!r}: produced {array.shape}, declared {shape}")
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return 8 + len(blob) + offset


class Checkpoint:
    """The tensors of a Hugging Face checkpoint folder: `model.safetensors`, or the shards that
    `model.safetensors.index.json` lists. Tensor names map to their file; files open lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise SafetensorsError(f"{index}: no 'weight_map'")
            self._where = dict(weight_map)
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                found = sorted(p.name for p in self.folder.glob("*.bin"))
                hint = (
                    " (pickle .bin weights are never read; convert to safetensors)" if found else ""
                )
                raise SafetensorsError(f"{self.folder}: no *.safetensors weights{hint}")
            self._where = {}
            for file in files:
                for name in SafetensorsFile(file).names():
                    self._where[name] = file.name
        self._open: dict[str, SafetensorsFile] = {}

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file(self, name: str) -> SafetensorsFile:
        try:
            fname = self._where[name]
        except KeyError:
            raise SafetensorsError(
                f"{self.folder}: the checkpoint has no tensor {name!r}"
            ) from None
        if fname not in self._open:
            path = self.folder / fname
            if not path.exists():
                raise SafetensorsError(f"{path}: listed in the index but missing")
            self._open[fname] = SafetensorsFile(path)
        return self._open[fname]

    def get(self, name: str) -> np.ndarray:
        return self.file(name).get(name)

    def close_files(self) -> None:
        """Drop the open maps (the next `get` reopens), so a finished shard's pages go."""
        self._open.clear()

    def by_file(self) -> Iterator[tuple[str, list[str]]]:
        """(file, its tensor names), one shard after the other (the order to stream in)."""
        groups: dict[str, list[str]] = {}
        for name, fname in self._where.items():
            groups.setdefault(fname, []).append(name)
        for fname in sorted(groups):
            yield fname, groups[fname]
