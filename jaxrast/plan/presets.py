"""Architecture fields of public `config.json` files, embedded so `jaxrast plan` works offline.

Only the keys that decide parameter and cache sizes (plus what `ModelConfig.from_hf_dict`
requires) are kept. Fine-tunes share their base's architecture, so RL checkpoints such as
SimpleRL-Zoo resolve to the base entry through the alias table.
"""

from __future__ import annotations

import re
from typing import Any


def _qwen25(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool,
            eps: float, max_pos: int) -> dict[str, Any]:
    return {"model_type": "qwen2", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": tied, "rms_norm_eps": eps, "rope_theta": 1000000.0,
            "max_position_embeddings": max_pos, "use_sliding_window": False, "hidden_act": "silu",
            "bos_token_id": 151643, "eos_token_id": 151643}


def _qwen3(hidden: int, inter: int, layers: int, heads: int, tied: bool) -> dict[str, Any]:
    return {"model_type": "qwen3", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
            "tie_word_embeddings": tied, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 40960, "use_sliding_window": False, "attention_bias": False,
            "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645}


def _llama31(hidden: int, inter: int, layers: int, heads: int) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": 8, "vocab_size": 128256,
            "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "max_position_embeddings": 131072, "attention_bias": False, "mlp_bias": False,
            "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001}


# Small Qwen2.5 models tie the LM head to the embedding and keep the tokenizer-sized vocab
# (151936); from 7B on the head is separate and the vocab padded to 152064.
PRESETS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B": _qwen25(896, 4864, 24, 14, 2, 151936, True, 1e-6, 32768),
    "Qwen/Qwen2.5-1.5B": _qwen25(1536, 8960, 28, 12, 2, 151936, True, 1e-6, 131072),
    "Qwen/Qwen2.5-3B": _qwen25(2048, 11008, 36, 16, 2, 151936, True, 1e-6, 32768),
    "Qwen/Qwen2.5-7B": _qwen25(3584, 18944, 28, 28, 4, 152064, False, 1e-6, 131072),
    "Qwen/Qwen2.5-14B": _qwen25(5120, 13824, 48, 40, 8, 152064, False, 1e-5, 131072),
    "Qwen/Qwen2.5-32B": _qwen25(5120, 27648, 64, 40, 8, 152064, False, 1e-5, 131072),
    "Qwen/Qwen2.5-72B": _qwen25(8192, 29568, 80, 64, 8, 152064, False, 1e-5, 131072),
    # Qwen3: q/k norms, head_dim 128 whatever the width; 0.6B-4B tie the head
    "Qwen/Qwen3-0.6B": _qwen3(1024, 3072, 28, 16, True),
    "Qwen/Qwen3-1.7B": _qwen3(2048, 6144, 28, 16, True),
    "Qwen/Qwen3-4B": _qwen3(2560, 9728, 36, 32, True),
    "Qwen/Qwen3-8B": _qwen3(4096, 12288, 36, 32, False),
    "Qwen/Qwen3-14B": _qwen3(5120, 17408, 40, 40, False),
    "Qwen/Qwen3-32B": _qwen3(5120, 25600, 64, 64, False),
    "meta-llama/Llama-3.1-8B": _llama31(4096, 14336, 32, 32),
    "meta-llama/Llama-3.1-70B": _llama31(8192, 28672, 80, 64),
}

# Parameter counts the hub shows for these checkpoints (safetensors metadata, 3 digits),
# to check the presets against.
PUBLISHED_PARAMS: dict[str, float] = {
    "Qwen/Qwen2.5-0.5B": 0.494e9, "Qwen/Qwen2.5-1.5B": 1.54e9, "Qwen/Qwen2.5-3B": 3.09e9,
    "Qwen/Qwen2.5-7B": 7.62e9, "Qwen/Qwen2.5-14B": 14.8e9, "Qwen/Qwen2.5-32B": 32.8e9,
    "Qwen/Qwen2.5-72B": 72.7e9, "meta-llama/Llama-3.1-8B": 8.03e9, "meta-llama/Llama-3.1-70B": 70.6e9,
    # the hub's 0.752B and 2.03B for the two smallest count the tied embedding matrix twice
    "Qwen/Qwen3-0.6B": 0.752e9 - 151936 * 1024, "Qwen/Qwen3-1.7B": 2.03e9 - 151936 * 2048,
    "Qwen/Qwen3-4B": 4.02e9, "Qwen/Qwen3-8B": 8.19e9, "Qwen/Qwen3-14B": 14.8e9, "Qwen/Qwen3-32B": 32.8e9,
}

ALIASES: dict[str, str] = {
    **{f"hkust-nlp/Qwen-2.5-{s}-SimpleRL-Zoo": f"Qwen/Qwen2.5-{s}" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B")},
    **{f"Qwen/Qwen2.5-{s}-Instruct": f"Qwen/Qwen2.5-{s}" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")},
    **{f"Qwen/Qwen3-{s}-Base": f"Qwen/Qwen3-{s}" for s in ("0.6B", "1.7B", "4B", "8B", "14B")},
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B",
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", name.lower())


def find_preset(name: str) -> str | None:
    """The preset key for a hub id or a short name ('Qwen2.5-32B', 'qwen2.5-14b-instruct'), or None."""
    table = {**{k: k for k in PRESETS}, **ALIASES}
    for key, target in table.items():
        if _norm(name) in (_norm(key), _norm(key.split("/")[-1])):
            return target
    return None
