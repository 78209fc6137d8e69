"""Random tiny HuggingFace checkpoints built offline with transformers + torch (test-only)."""

from __future__ import annotations

import os

from jaxrast.toy.tokenizer import char_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-*=#:?.\n"
# the smallest checkpoint shape the command tests load (one layer: loading is the point)
SMALL = dict(hidden=32, layers=1, heads=2, kv_heads=1, inter=64)


def write_questions(path, n: int, cycle: int | None = None) -> str:
    """A JSONL of `n` rows {id: q<i>, question: "abc " repeated 1 + i (mod `cycle`) times}."""
    import json

    reps = (lambda i: 1 + i) if cycle is None else (lambda i: 1 + i % cycle)
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": f"q{i}", "question": "abc " * reps(i)}) + "\n" for i in range(n))
    return str(path)


def hf_config(kind: str = "qwen2", *, vocab: int = 64, hidden: int = 64, layers: int = 2, heads: int = 4,
              kv_heads: int = 2, inter: int = 96, tie: bool = False, rope_scaling: dict | None = None,
              init_range: float = 0.2, theta: float = 10000.0, max_pos: int = 2048, bias: bool = False,
              head_dim: int | None = None, window: int = 8, layer_types: tuple[str, ...] | None = None,
              local_theta: float = 100.0, scalar: int | None = None, final_cap: float | None = None):
    """`bias`: llama's q/k/v/o and MLP biases, qwen3's and gemma3's q/k/v/o biases (qwen2
    always has q/k/v biases); `head_dim` (qwen3, llama, gemma3): None is hidden // heads.
    gemma3 only: sliding `window`, `layer_types` (None: sliding, full, sliding, ...), the
    sliding layers' RoPE `local_theta`, `query_pre_attn_scalar` (None: head_dim) and the final
    logits' soft-cap (None: none)."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                  initializer_range=init_range, max_position_embeddings=max_pos, rms_norm_eps=1e-6,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    rope = {"rope_type": "default", "rope_theta": theta}
    if rope_scaling:
        rope.update(rope_scaling)
    head_dim = head_dim or hidden // heads  # given always: Qwen3Config's own default is 128
    if kind == "qwen2":
        return Qwen2Config(**common, rope_parameters=rope)
    if kind == "qwen3":
        return Qwen3Config(**common, rope_parameters=rope, attention_bias=bias, head_dim=head_dim)
    if kind == "gemma3":
        types = layer_types or tuple("full_attention" if i % 2 else "sliding_attention" for i in range(layers))
        return Gemma3TextConfig(
            **common, attention_bias=bias, head_dim=head_dim, sliding_window=window, layer_types=list(types),
            rope_parameters={"full_attention": rope, "sliding_attention": {"rope_type": "default",
                                                                           "rope_theta": local_theta}},
            query_pre_attn_scalar=scalar or head_dim, final_logit_softcapping=final_cap)
    return LlamaConfig(**common, rope_parameters=rope, attention_bias=bias, mlp_bias=bias, head_dim=head_dim)


def make_checkpoint(directory: str, kind: str = "qwen2", seed: int = 0, adds_bos: bool = False,
                    chat_template: str | None = None, **kw) -> str:
    """Builds a random `*ForCausalLM`, randomises biases and norms too, and saves it with a
    character tokenizer (fewer tokens than `vocab`, so the embedding is padded); `adds_bos`:
    the tokenizer puts its BOS before every text it encodes (as Llama 3's does)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(kind, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif "norm" in name:  # Gemma's norms scale by 1 + weight
                p.uniform_(-0.5, 0.5) if kind == "gemma3" else p.uniform_(0.5, 1.5)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tok = char_tokenizer(CHARS)
    if adds_bos:
        from tokenizers import processors
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.chat_template = chat_template
    assert len(tok) <= cfg.vocab_size
    tok.save_pretrained(directory)
    return directory
