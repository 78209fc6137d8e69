"""Checkpoints loaded once per command: a ref shared by two pairs, or a base that is also
analysed, is one model in memory. Every tokenizer is checked against the first one loaded,
and the error names the checkpoint that differs."""

from __future__ import annotations

import os
from typing import Any

from jaxrast.models.hf import as_dtype, check_tokenizers_compatible, load_model
from jaxrast.models.transformer import CausalLM


def checkpoint_key(path: str) -> str:
    """One spelling per local checkpoint (`./ckpt`, `ckpt/` and its absolute path agree);
    hub ids stay as they are."""
    expanded = os.path.expanduser(path)
    return os.path.realpath(expanded) if os.path.exists(expanded) else path


class ModelTable:
    """`cache(path) -> CausalLM`, loading each checkpoint once with one dtype and mesh.

    dtype: 'auto' (float32 on CPU, bfloat16 on accelerators) or a dtype name. `tokenizer`
    is the first tokenizer loaded (the base's, when the base is loaded first: callers load
    it first, so a differing tokenizer is blamed on the model that has it)."""

    def __init__(self, *, dtype: Any = "auto", mesh=None, allow_pickle: bool = False, progress: bool | None = None):
        self.dtype, self.mesh, self.allow_pickle, self.progress = as_dtype(dtype), mesh, allow_pickle, progress
        self.models: dict[str, CausalLM] = {}
        self.tokenizers: dict[str, Any] = {}
        self.tokenizer = None
        self.tokenizer_source: str | None = None  # the checkpoint `tokenizer` came from

    def __call__(self, path: str) -> CausalLM:
        key = checkpoint_key(path)
        if key not in self.models:
            model, _, tok = load_model(path, dtype=self.dtype, mesh=self.mesh, allow_pickle=self.allow_pickle,
                                       progress=self.progress)
            check_tokenizers_compatible(self.tokenizer, tok, path, self.tokenizer_source or "the base model")
            if self.tokenizer is None and tok is not None:
                self.tokenizer, self.tokenizer_source = tok, path
            self.models[key], self.tokenizers[key] = model, tok
        return self.models[key]

    @property
    def vocab(self) -> int:
        """The real vocabulary: the tokenizer's, else (checkpoints without tokenizer files,
        trajectories with token ids) the smallest model's rows."""
        if self.tokenizer is not None:
            return len(self.tokenizer)
        return min(m.cfg.vocab_size for m in self.models.values())
