"""Model configuration read from a HuggingFace `config.json` (qwen2, qwen3 and llama families)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# model_type -> the transformers class an export names in `architectures`
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# transformers' Qwen3Config defaults head_dim to 128, not hidden_size / heads, so a qwen3
# config.json without the key means 128.
_QWEN3_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only transformer.

    `vocab_size` is the number of embedding rows, which may exceed the tokenizer's
    vocabulary (Qwen2.5-7B+ pads to 152064); decoding masks the extra rows.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # rope scaling as in HF `rope_parameters` minus theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (qwen2: always True); llama, qwen3: on o_proj too
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    @property
    def o_proj_bias(self) -> bool:
        """Llama's and Qwen3's `attention_bias` cover o_proj as well; Qwen2's q/k/v biases do not."""
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Whether each query and key head is RMS-normed (over head_dim) before RoPE (Qwen3)."""
        return self.model_type == "qwen3"

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (GQA ratio)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds a config from the parsed `config.json`; errors name the offending key."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object of model settings, got a {type(raw).__name__}.")
        try:
            return cls._from_hf_dict(raw, source)
        except (TypeError, ValueError, OverflowError) as err:
            if str(err).startswith(source):
                raise
            raise ValueError(f"{source}: a setting has a value of the wrong type ({err}).") from None

    @classmethod
    def _from_hf_dict(cls, raw: dict[str, Any], source: str) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: unsupported model_type {model_type!r}; jaxrast supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen2/Qwen2.5, Qwen3 and Llama checkpoints)."
            )
        if raw.get("use_sliding_window"):
            raise ValueError(
                f"{source}: use_sliding_window=true is not supported; Qwen2.5 and Qwen3 checkpoints set it "
                "to false. Set it to false if the model was trained with full attention."
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in raw:
                raise ValueError(f"{source}: missing required key {key!r}.")
            if isinstance(raw[key], bool) or not isinstance(raw[key], int) or raw[key] < 1:
                raise ValueError(f"{source}: {key} must be a whole number >= 1, got {raw[key]!r}.")
        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads") or heads
        if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1:
            raise ValueError(f"{source}: num_key_value_heads must be a whole number >= 1, got {kv_heads!r}.")
        if heads % kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}."
            )
        default_head_dim = _QWEN3_HEAD_DIM if model_type == "qwen3" else raw["hidden_size"] // heads
        head_dim = raw.get("head_dim") or default_head_dim
        # transformers>=5 writes `rope_parameters` (with rope_theta inside); older files
        # write `rope_theta` and `rope_scaling` at the top level.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.setdefault("rope_type", "default")
        if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"{source}: unsupported rope scaling type {rope['rope_type']!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}."
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (silu only).")
        eos = raw.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        return cls(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(heads),
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            mlp_bias=model_type == "llama" and bool(raw.get("mlp_bias", False)),  # Qwen MLPs have none
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos,
        )

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        """Reads `config.json` (a file, or a directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: a HuggingFace checkpoint directory needs a config.json "
                "(save the model with save_pretrained / jaxrast.save_hf)."
            )
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a UTF-8 JSON file; re-download or re-save the checkpoint.") from None
        return cls.from_hf_dict(raw, source=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` content transformers needs to rebuild this architecture."""
        rope = dict(self.rope_scaling)
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if rope.get("rope_type") == "default" else rope,
            "rope_parameters": {"rope_theta": self.rope_theta, **rope},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) > 1 else
            (self.eos_token_id[0] if self.eos_token_id else None),
        }
        if self.model_type != "qwen2":  # qwen2's q/k/v biases are fixed by the architecture
            out["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        else:
            out["use_sliding_window"] = False
        return out
