"""GGUF files (llama.cpp's format) wherever a checkpoint goes: `--base model.gguf`.

transformers' GGUF reader dequantizes the file into its PyTorch model (it needs `torch`,
`gguf` and `accelerate`: `pip install 'jaxrast[gguf]'`); the weights are then saved once as
a regular safetensors checkpoint with the tokenizer, config and generation config, in a
cache keyed by the file's name, size and modification time, so the next start loads that
directory directly (dequantizing a 135M-parameter file takes ~30 s on 2 CPU cores, loading
the cached directory about a second). The cached weights are float32, as dequantized.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

log = logging.getLogger(__name__)

EXTRA = "pip install 'jaxrast[gguf]' (torch, gguf and accelerate)"


def cache_root() -> str:
    return os.environ.get("JAXRAST_GGUF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxrast", "gguf"))


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf") and os.path.isfile(path)


def gguf_checkpoint(path: str, cache: str | None = None) -> str:
    """The cached checkpoint directory of GGUF file `path` (under `cache`, default
    `cache_root()`), converting it on first use."""
    path, cache = os.path.abspath(path), cache or cache_root()
    stat = os.stat(path)
    stem = os.path.basename(path)[:-len(".gguf")]
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = os.path.join(cache, f"{stem}-{key}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    os.makedirs(cache, exist_ok=True)
    log.warning("converting %s to a safetensors checkpoint in %s (first use of this file)", path, out)
    work = tempfile.mkdtemp(prefix=f".{stem}-", dir=cache)
    try:
        convert(path, work)
        try:
            os.replace(work, out)  # whole or absent: an interrupted conversion leaves nothing behind
        except OSError:
            if not os.path.exists(os.path.join(out, "config.json")):  # (unless another process won)
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def convert(path: str, out: str) -> None:
    """Dequantizes GGUF file `path` with transformers and writes a checkpoint into `out`. The
    model refuses `save_pretrained` (it is marked quantized), so its state dict is saved with
    safetensors (a tied head left out) beside its config, tokenizer and generation config."""
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise ImportError(f"reading a GGUF file needs {EXTRA}: {err}") from None
    folder, name = os.path.split(path)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as err:  # gguf or accelerate missing
        raise ImportError(f"reading a GGUF file needs {EXTRA}: {err}") from None
    except ValueError as err:  # transformers names an architecture its GGUF reader does not know
        raise ValueError(f"{path}: transformers cannot read this GGUF file ({err}).") from None
    tok.save_pretrained(out)
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    model.generation_config.save_pretrained(out)
