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
    """A safetensors file opened as a memory map; `get(name)` returns a lazy numpy view.

    The header is checked when the file is opened: every problem (a header that is not a
    JSON object, an entry without a dtype, shape or offsets, offsets that do not match the
    shape, overlap or run past the end of the file) is a ValueError naming the file and the
    tensor. Messages never quote the file's bytes."""

    def __init__(self, path: str):
        self.path = path
        fix = "re-download or re-save it"
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError(f"{path}: truncated safetensors file (no header); {fix}.")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{path}: not a safetensors file, or a corrupt or truncated one (its header length "
                                 f"does not fit the file's {size} bytes); {fix}.")
            try:
                header = json.loads(f.read(header_len))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: corrupt safetensors header (not JSON: {err.msg} at byte "
                                 f"{err.pos + 8}); {fix}.") from None
            except UnicodeDecodeError:
                raise ValueError(f"{path}: corrupt safetensors header (not UTF-8 text); {fix}.") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object "
                             f"of tensors); {fix}.")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ValueError(f"{path}: corrupt safetensors header (__metadata__ is not an object); {fix}.")
        self.metadata = metadata
        self._data_start = 8 + header_len
        self.entries: dict[str, dict] = {name: _checked_entry(path, name, e) for name, e in header.items()}
        data_len = size - self._data_start
        spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in self.entries.items())
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise ValueError(f"{path}: corrupt safetensors header: tensors {a!r} and {b!r} overlap; {fix}.")
        if spans and max(end for _, end, _ in spans) > data_len:
            name = max(spans, key=lambda t: t[1])[2]
            raise ValueError(
                f"{path}: truncated safetensors file: tensor {name!r} needs "
                f"{self._data_start + self.entries[name]['data_offsets'][1]} bytes, file has {size}. "
                "The download or save was interrupted; fetch/write it again.")
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view on the file (no bytes read until sliced)."""
        if name not in self.entries:
            raise ValueError(f"{self.path} holds no tensor {name!r}; re-download or re-save the checkpoint.")
        entry = self.entries[name]
        dtype = _DTYPES[entry["dtype"]]
        start, end = entry["data_offsets"]
        flat = self._mmap[self._data_start + start:self._data_start + end]
        return flat.view(dtype).reshape(entry["shape"])


def _checked_entry(path: str, name: str, entry: object) -> dict:
    """A header entry, checked: a known dtype, a shape of whole numbers >= 0 and offsets
    [start, end] with end - start = the shape's size in bytes."""
    where = f"{path}: tensor {name!r}"
    fix = "the file is corrupt or not written by a safetensors writer; re-download or re-save it"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: its header entry is not an object; {fix}.")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise ValueError(f"{where}: its header entry has no {' or '.join(missing)}; {fix}.")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        shown = repr(dtype) if isinstance(dtype, str) and len(dtype) <= 16 else "an unknown value"
        raise ValueError(f"{where} has unsupported dtype {shown}; jaxrast reads {', '.join(_DTYPES)}.")

    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(shape, list) or not all(whole(d) for d in shape):
        raise ValueError(f"{where}: its shape is not a list of whole numbers >= 0; {fix}.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(whole(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ValueError(f"{where}: its data_offsets are not [start, end] byte offsets with start <= end; {fix}.")
    nbytes = _DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64))
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but its data_offsets span "
                         f"{offsets[1] - offsets[0]}; {fix}.")
    return entry


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
