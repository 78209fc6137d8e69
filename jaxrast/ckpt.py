"""Training checkpoints: an Orbax `CheckpointManager` over (array pytree, JSON metadata).

Each step directory holds the arrays (params, optimiser state, ...) and a JSON item
(step, RNG key, data position, config, ...). A checksum of every array is stored in the
JSON and verified on restore, because a flipped byte in a tensor file restores silently;
`restore_latest` walks back from the newest step to the newest one that restores and
verifies, warning about (and deleting) the broken ones so training can save over them.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import orbax.checkpoint as ocp

from jaxrast.distributed import host_array

STATE, META = "state", "meta"


class CorruptCheckpointError(RuntimeError):
    pass


def _flat(tree: Any) -> dict[str, Any]:
    """{'[0].mu['layers'][0]...': leaf}: a plain dict Orbax stores without knowing our pytree classes."""
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _mix(x: jax.Array) -> jax.Array:
    """A position-weighted uint32 sum of `x`'s bits. Integer sums wrap exactly, so the result
    does not depend on sharding or reduction order (unlike a float sum)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


_checksums = jax.jit(lambda flat: {k: _mix(v) for k, v in flat.items()})


def checksums(tree: Any) -> dict[str, int]:
    """{leaf path: uint32 checksum} of a pytree of arrays."""
    return {k: int(v) for k, v in host_array(_checksums(_flat(tree))).items()}


class Checkpointer:
    """Saves every `save_every`-th step (and on demand), keeps the newest `keep`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Writes `state` (a pytree of jax arrays) and JSON-able `meta` as `step`."""
        meta = dict(meta, checksums=checksums(state))
        self._manager.save(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(_flat(state)), META: ocp.args.JsonSave(meta)}))

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step`. target: a pytree like the saved state whose leaves are
        `jax.ShapeDtypeStruct`s carrying the shardings to restore onto."""
        flat_target = _flat(target)
        out = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(flat_target), META: ocp.args.JsonRestore()}))
        flat, meta = dict(out[STATE]), dict(out[META])
        if set(flat) != set(flat_target):
            raise CorruptCheckpointError(f"step {step} holds different arrays than this run expects "
                                         f"({len(flat)} vs {len(flat_target)}); was the model or optimiser changed?")
        state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), [flat[k] for k in flat_target])
        stored, found = meta.pop("checksums", None), checksums(state)
        if stored != found:
            bad = sorted(k for k in found if (stored or {}).get(k) != found[k])
            raise CorruptCheckpointError(f"step {step}: checksum mismatch in {len(bad)} array(s), e.g. {bad[:2]}.")
        return state, meta

    def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest step that restores intact, as (step, state, meta); None if there is none.

        A broken newer step is reported with a warning and deleted, so that the resumed
        run can save that step again.
        """
        self._manager.reload()
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, target)
            except Exception as err:  # noqa: BLE001 - any failure to read means "unusable"
                warnings.warn(f"checkpoint step {step} in {self.directory} is unreadable or corrupt "
                              f"({type(err).__name__}: {str(err)[:300]}); falling back to the previous one.",
                              stacklevel=2)
                self._manager.delete(step)
                continue
            return step, state, meta
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves on `shardings` (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)
