"""Minimal, lazy safetensors reader and writer on numpy memory maps.

Why our own: `safetensors`' numpy backend cannot hold bfloat16, and loading straight onto
a device mesh needs *slices* of a tensor read lazily (each device reads only its shard).
The format is an 8-byte little-endian header length, a JSON header, then raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """A safetensors file opened as a memory map; `get(name)` returns a lazy numpy view."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError(f"{path}: truncated safetensors file (no header); re-download or re-save it.")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{path}: corrupt or truncated safetensors header ({header_len} bytes "
                                 f"announced, file has {size}); re-download or re-save it.")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{path}: corrupt safetensors header ({err}); re-download or re-save it.") from err
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict] = header
        self._data_start = 8 + header_len
        data_len = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + data_len > size:
            raise ValueError(
                f"{path}: truncated safetensors file: tensors need {self._data_start + data_len} bytes, "
                f"file has {size}. The download or save was interrupted; fetch/write it again.")
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view on the file (no bytes read until sliced)."""
        entry = self.entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}.")
        start, end = entry["data_offsets"]
        flat = self._mmap[self._data_start + start:self._data_start + end]
        return flat.view(dtype).reshape(entry["shape"])


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Writes numpy arrays (bfloat16 included) as a safetensors file, atomically."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _NAMES:
            raise ValueError(f"cannot save tensor {name!r} of dtype {arr.dtype} to safetensors.")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


def open_checkpoint(directory: str, files: Iterable[str]) -> dict[str, SafetensorsFile]:
    """Opens each named safetensors file in `directory` once; returns name -> file."""
    return {name: SafetensorsFile(os.path.join(directory, name)) for name in files}
