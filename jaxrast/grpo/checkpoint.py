"""Training checkpoints: an Orbax `CheckpointManager` over (array pytree, JSON metadata).

Each step directory holds the arrays (params, optimiser state, ...) and a JSON item
(step, RNG key, data position, config, ...). A checksum of every array is stored in the
JSON and verified on restore, because a flipped byte in a tensor file restores silently;
`restore_latest` walks back from the newest step to the newest one that restores and
verifies. Broken newer steps are moved aside (to `<directory>.corrupt/`, never deleted) once
an older one has restored, so training can save over them. A checkpoint whose arrays do not
fit this run (a changed model or optimiser) is an error, not corruption: nothing is moved.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxrast.runtime.distributed import host_array

STATE, META = "state", "meta"


class CorruptCheckpointError(RuntimeError):
    pass


class CheckpointMismatchError(ValueError):
    """The checkpoint is intact but holds other arrays than this run expects."""


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
        meta = dict(meta, checksums=checksums(state),
                    layout={k: [list(np.shape(v)), str(v.dtype)] for k, v in _flat(state).items()})
        self._manager.save(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(_flat(state)), META: ocp.args.JsonSave(meta)}))

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step`. target: a pytree like the saved state whose leaves are
        `jax.ShapeDtypeStruct`s carrying the shardings to restore onto. Raises
        `CheckpointMismatchError` when the step holds other arrays than `target`, and
        `CorruptCheckpointError` (or the reader's error) when its files are damaged."""
        flat_target = _flat(target)
        meta = self._read_meta(step)  # the small JSON item first: a config mismatch reads no arrays
        self._check_layout(step, meta, flat_target)
        out = self._manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(flat_target)}))
        flat = dict(out[STATE])
        if set(flat) != set(flat_target):
            raise CorruptCheckpointError(f"step {step} holds {len(flat)} arrays where its metadata lists "
                                         f"{len(flat_target)}.")
        state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), [flat[k] for k in flat_target])
        meta.pop("layout", None)
        stored, found = meta.pop("checksums", None), checksums(state)
        if stored != found:
            bad = sorted(k for k in found if (stored or {}).get(k) != found[k])
            raise CorruptCheckpointError(f"step {step}: checksum mismatch in {len(bad)} array(s), e.g. {bad[:2]}.")
        return state, meta

    def _read_meta(self, step: int) -> dict[str, Any]:
        out = self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        return dict(out[META])

    def _check_layout(self, step: int, meta: dict[str, Any], flat_target: dict[str, Any]) -> None:
        """Refuses a step whose arrays (names, shapes, dtypes) differ from this run's."""
        stored = meta.get("layout") or {k: None for k in meta.get("checksums", {})}
        want = {k: [list(v.shape), str(v.dtype)] for k, v in flat_target.items()}
        differ = sorted(k for k in set(stored) | set(want)
                        if k not in stored or k not in want or (stored[k] is not None and stored[k] != want[k]))
        if differ:
            detail = "; ".join(f"{k}: saved {stored.get(k)}, expected {want.get(k)}" for k in differ[:3])
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} holds other arrays than this run builds "
                f"({len(differ)} differ, e.g. {detail}). The model or optimiser config changed (e.g. "
                "max_grad_norm, param dtype, model size): resume with the config the run was started "
                "with, or train into a new output_dir. Nothing was deleted.")

    def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest step that restores intact, as (step, state, meta); None if there is none.

        Broken newer steps are reported with a warning and, once an older step has
        restored, moved to `<directory>.corrupt/` so the resumed run can save those steps
        again. If no step restores, nothing is moved and `CorruptCheckpointError` is raised.
        A step that does not fit `target` raises `CheckpointMismatchError` at once.
        """
        self._manager.reload()
        broken: list[int] = []
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, target)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure to read means "unusable"
                warnings.warn(f"checkpoint step {step} in {self.directory} is unreadable or corrupt "
                              f"({type(err).__name__}: {str(err)[:300]}); falling back to the previous one.",
                              stacklevel=2)
                broken.append(step)
                continue
            for bad in broken:
                self._move_aside(bad)
            return step, state, meta
        if broken:
            raise CorruptCheckpointError(
                f"no checkpoint in {self.directory} restores intact (steps {sorted(broken)}; see the warnings). "
                "Move the directory away to start afresh, or restore an older copy.")
        return None

    def _move_aside(self, step: int) -> None:
        """Moves a broken step directory to `<directory>.corrupt/<step>-<time>` (process 0)."""
        if jax.process_index() == 0:
            aside = f"{self.directory}.corrupt"
            os.makedirs(aside, exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), os.path.join(aside, f"{step}-{int(time.time())}"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxrast-ckpt-aside-{step}")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves on `shardings` (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)
