"""The device mesh over (data, fsdp, tensor) and its command-line spelling.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded params) and
`tensor` (Megatron-style model parallel). Partition rules over these axes live in
`jaxrast.models.partitioning`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over axes (data, fsdp, tensor); one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("make_mesh: at most one of data/fsdp/tensor may be -1.")
    if any(s < 1 and s != -1 for s in sizes):
        raise ValueError(f"make_mesh: sizes must be >= 1 (or -1 for the remaining devices), got data={data}, "
                         f"fsdp={fsdp}, tensor={tensor}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices cannot be split into {sizes}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"make_mesh: data×fsdp×tensor = {'×'.join(map(str, sizes))} = {int(np.prod(sizes))} "
            f"but {len(devices)} devices are available; choose sizes whose product is {len(devices)} "
            "(or set one of them to -1).")
    return Mesh(np.array(devices).reshape(sizes), AXES)


def mesh_sizes(spec: str) -> dict[str, int]:
    """'data,fsdp,tensor' sizes (e.g. '1,-1,1' or 'fsdp=4,tensor=2') -> {axis: size}; -1 is kept."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    try:
        if all("=" in p for p in parts):
            for p in parts:
                key, value = p.split("=")
                if key not in sizes:
                    raise ValueError
                sizes[key] = int(value)
        elif len(parts) == 3:
            sizes = dict(zip(AXES, map(int, parts)))
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"mesh {spec!r}: use 'DATA,FSDP,TENSOR' sizes (e.g. '1,-1,1') or "
                         "'fsdp=4,tensor=2' (one size may be -1: all remaining devices).") from None
    return sizes


def mesh_of(data: int = 1, fsdp: int = -1, tensor: int = 1) -> Mesh:
    """The mesh of these sizes: with a -1 size over every device, else over the first
    data×fsdp×tensor devices (a run may use fewer devices than the host has)."""
    sizes = (data, fsdp, tensor)
    return make_mesh(*sizes, devices=None if -1 in sizes else jax.devices()[:max(1, int(np.prod(sizes)))])


def parse_mesh(spec: str | None) -> Mesh | None:
    """'data,fsdp,tensor' sizes (e.g. '1,-1,1' or 'fsdp=4,tensor=2') -> Mesh; None/'' -> None."""
    if not spec:
        return None
    return mesh_of(**mesh_sizes(spec))
