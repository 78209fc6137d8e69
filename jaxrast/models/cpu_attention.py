"""The engine's decode attention on CPU: a small C++ kernel (`kernels/decode_attention.cc`)
called through `jax.ffi`, in which each query reads exactly the keys it may see.

Why: with XLA's ops an engine slot either reads its whole cache (the toy family's slots
hold 256 positions while most live rows hold ~100) or gathers its own blocks first, and on
XLA:CPU the gathers cost about what the reads do. The kernel costs a row its own length, in
one call per layer (~1.35x the toy family's long-tail engine throughput; the measurements
are in docs/performance.md).

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, else `c++` or
`g++`; ~3 s) against the FFI headers jaxlib ships, for this CPU (`-march=native`), and kept
in `$JAXRAST_CACHE_DIR` (default `~/.cache/jaxrast`) under a name that hashes the source, the
compiler, its target flags and the jaxlib version. Without a compiler, or with
`JAXRAST_CPU_KERNEL=0`, `available()` is False and `models.attention_backend.choose` picks
XLA's attention (the same results up to float rounding). A row's result depends on its own keys only, in a fixed
order: never on its neighbours or its slot.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrast.models.attention import LayerAttention, row_pages

log = logging.getLogger(__name__)

TARGET = "jaxrast_decode_attention"
SOURCE = Path(__file__).parent / "kernels" / "decode_attention.cc"
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _run(args: list[str]) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=300).stdout


def _library() -> Path:
    """The compiled kernel for this machine, built into the cache if it is not there yet."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]
    # the target flags -march=native expands to: a cached library built on another CPU is not reused
    target = _run([cxx, "-march=native", "-Q", "--help=target"]) if "clang" not in cxx else ""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), _run([cxx, "--version"]), target, jax.__version__,
                                    " ".join(flags)]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("JAXRAST_CACHE_DIR", Path.home() / ".cache" / "jaxrast")) / "kernels"
    path = cache / f"decode_attention-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then moved in whole
            built = Path(tmp) / path.name
            try:
                _run([cxx, *flags, str(SOURCE), "-o", str(built)])
            except subprocess.CalledProcessError as err:
                raise RuntimeError(f"compiling {SOURCE.name} failed: {err.stderr.strip()[-2000:]}") from err
            os.replace(built, path)
    return path


def available() -> bool:
    """Whether the kernel is built and registered with XLA for CPU (built on the first call)."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = False
            if os.environ.get("JAXRAST_CPU_KERNEL", "1") == "0":
                log.info("JAXRAST_CPU_KERNEL=0: decode attention runs on XLA's ops")
            else:
                try:
                    lib = ctypes.cdll.LoadLibrary(str(_library()))
                    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.jaxrast_decode_attention),
                                                platform="cpu")
                    _state["ok"] = True
                except (RuntimeError, OSError, subprocess.SubprocessError) as err:
                    log.warning("the CPU decode-attention kernel is unavailable (%s); decode attention runs on "
                                "XLA's ops instead", err)
        return _state["ok"]


def kernel_fits(q_shape, k_shape, dtype) -> bool:
    """Shapes and dtype the kernel takes: float32, head size and cache length multiples of 8."""
    return dtype == jnp.float32 and q_shape[-1] % 8 == 0 and k_shape[-1] % 8 == 0


def decode_attention(q, k, v, positions, key_mask, layer: LayerAttention, pages=None):
    """Softmax attention of queries q [b, kv, g, t, d] over the cache k [b, kv, d, s], v
    [b, kv, s, d] (or the page pools k [P, kv, d, page], v [P, kv, page, d] and the rows'
    page table `pages` [b, n], s = n · page): query (b, t) sees key j when j <= positions[b, t],
    key_mask[b, j] and, for a sliding `layer`, j > positions[b, t] - window (the keys behind
    it are never read); scores are scaled and soft-capped as `layer` says. A query that sees
    nothing gives 0. Returns [b, kv, g, t, d] float32. Needs `available()` (and shapes that
    `kernel_fits`)."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    pages = row_pages(k) if pages is None else pages
    # 0 stands for "none" in the kernel's attributes (a window or cap of 0 is meaningless)
    return call(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), pages.astype(jnp.int32),
                positions.astype(jnp.int32), key_mask.astype(bool),
                divisor=np.float32(layer.divisor), window=np.int64(layer.window or 0),
                softcap=np.float32(layer.softcap or 0.0))
