"""Model configuration read from a HuggingFace `config.json` (qwen2, qwen3, llama and gemma3_text
families)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

# model_type -> the transformers class an export names in `architectures`
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# transformers' Qwen3Config and Gemma3TextConfig default head_dim to 128 and 256, not
# hidden_size / heads, so a config.json without the key means that.
_DEFAULT_HEAD_DIM = {"qwen3": 128, "gemma3_text": 256}
# MLP activations by their transformers name (Gemma's GELU is the tanh approximation)
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
SLIDING, FULL = "sliding_attention", "full_attention"
# Gemma3TextConfig's defaults for keys a gemma3_text config.json may leave out
_GEMMA3 = dict(sliding_window=4096, sliding_window_pattern=6, query_pre_attn_scalar=256, rope_theta=1_000_000.0,
               rope_local_base_freq=10_000.0, hidden_activation="gelu_pytorch_tanh")


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
    # Gemma 3: each layer's attention kind (SLIDING or FULL; () means every layer FULL), the
    # window of the SLIDING ones, their RoPE theta (FULL layers use rope_theta / rope_scaling),
    # scores scaled by query_pre_attn_scalar**-0.5 (None: head_dim**-0.5), and tanh soft-capping
    # of attention scores (every backend applies it; Gemma 2 sets it, Gemma 3's is refused) and
    # of the final logits (None: none)
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    rope_local_base_freq: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    @property
    def o_proj_bias(self) -> bool:
        """Llama's and Qwen3's `attention_bias` cover o_proj as well; Qwen2's q/k/v biases do not."""
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Whether each query and key head is RMS-normed (over head_dim) before RoPE (Qwen3, Gemma 3)."""
        return self.model_type in ("qwen3", "gemma3_text")

    @property
    def norm_offset(self) -> float:
        """RMSNorm scales by (norm_offset + weight): Gemma stores its scales as offsets from 1."""
        return 1.0 if self.model_type == "gemma3_text" else 0.0

    @property
    def sandwich_norms(self) -> bool:
        """Gemma 3 norms the attention and MLP outputs as well as their inputs (four norms a block)."""
        return self.model_type == "gemma3_text"

    @property
    def embed_scale(self) -> float | None:
        """Gemma multiplies the token embeddings by sqrt(hidden_size); None: no scaling."""
        return self.hidden_size**0.5 if self.model_type == "gemma3_text" else None

    @property
    def attention_divisor(self) -> float:
        """Attention scores are q·k divided by this: sqrt(query_pre_attn_scalar) or sqrt(head_dim)."""
        return math.sqrt(self.query_pre_attn_scalar or self.head_dim)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer` (its query at p sees keys in (p - window, p]);
        None: it attends to every earlier position."""
        return self.sliding_window if self.layer_types and self.layer_types[layer] == SLIDING else None

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
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen2/Qwen2.5, Qwen3, Llama and Gemma 3 text checkpoints)."
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
            _check_whole(raw[key], key, source)
        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads") or heads
        _check_whole(kv_heads, "num_key_value_heads", source)
        if heads % kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}."
            )
        head_dim = raw.get("head_dim") or _DEFAULT_HEAD_DIM.get(model_type, raw["hidden_size"] // heads)
        gemma = _gemma3_settings(raw, source) if model_type == "gemma3_text" else {}
        theta, rope = gemma.pop("rope") if gemma else _rope(raw, 10000.0, source)
        # Gemma configs name the MLP activation `hidden_activation` (their `hidden_act`, when
        # present, is a leftover transformers ignores)
        act = gemma.pop("hidden_act") if gemma else raw.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"{source}: MLP activation {act!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ACTIVATIONS)}.")
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
            # Gemma3TextConfig ties the embeddings unless told otherwise
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", model_type == "gemma3_text")),
            attention_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            mlp_bias=model_type == "llama" and bool(raw.get("mlp_bias", False)),  # Qwen/Gemma MLPs have none
            hidden_act=act,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos,
            **gemma,
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
        elif self.model_type == "gemma3_text":
            for key in ("rope_theta", "rope_scaling", "hidden_act"):  # Gemma3TextConfig's names differ
                del out[key]
            out.update(self._gemma3_hf_dict())
        else:
            out["use_sliding_window"] = False
        return out

    def _gemma3_hf_dict(self) -> dict[str, Any]:
        """Gemma3TextConfig's own keys: RoPE per layer type (a top-level rope_scaling would be
        merged into the full_attention set again), the activation under its Gemma name."""
        full = {"rope_theta": self.rope_theta, **dict(self.rope_scaling)}
        return {
            "rope_parameters": {FULL: full, SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_base_freq}},
            "hidden_activation": self.hidden_act,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            # Gemma3TextConfig validates it as an int
            "query_pre_attn_scalar": int(self.query_pre_attn_scalar) if self.query_pre_attn_scalar.is_integer()
            else self.query_pre_attn_scalar,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
        }

def _check_whole(value: Any, key: str, source: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: {key} must be a whole number >= 1, got {value!r}.")


def _rope(params: dict[str, Any], default_theta: float, source: str, *, key: str = "rope") -> tuple[float, dict]:
    """(theta, scaling) from one set of rope parameters: transformers>=5 writes
    `rope_parameters` (with rope_theta inside); older files write `rope_theta` and
    `rope_scaling` at the top level. `key` names the set in errors."""
    rope = dict(params.get("rope_parameters") or params.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", params.get("rope_theta", default_theta)))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: unsupported {key} scaling type {rope['rope_type']!r}; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    return theta, rope


def _gemma3_settings(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The gemma3_text fields, read as transformers' Gemma3TextConfig reads them (its defaults
    for absent keys); `rope` is the FULL layers' (theta, scaling), `hidden_act` the activation."""
    if raw.get("use_bidirectional_attention"):
        raise ValueError(f"{source}: use_bidirectional_attention=true (an encoder-style Gemma) is not "
                         "supported; jaxrast decodes causal models only.")
    layers = raw["num_hidden_layers"]
    types = raw.get("layer_types")
    if types is None:  # older files give the pattern: every n-th layer is global
        pattern = raw.get("sliding_window_pattern", _GEMMA3["sliding_window_pattern"])
        _check_whole(pattern, "sliding_window_pattern", source)
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or not set(types) <= {SLIDING, FULL}:
        raise ValueError(f"{source}: layer_types must list {layers} entries (one per layer), each "
                         f"{SLIDING!r} or {FULL!r}; got {types!r}.")
    window = raw.get("sliding_window", _GEMMA3["sliding_window"])
    if SLIDING in types:
        _check_whole(window, "sliding_window", source)
    per_type = raw.get("rope_parameters") or {}
    if FULL in per_type or SLIDING in per_type:  # transformers>=5: one set of rope parameters per layer type
        full = {"rope_parameters": {"rope_theta": _GEMMA3["rope_theta"], **(per_type.get(FULL) or {})}}
        local = {"rope_parameters": {"rope_theta": _GEMMA3["rope_local_base_freq"], **(per_type.get(SLIDING) or {})}}
    else:  # older files: rope_theta / rope_scaling for global layers, rope_local_base_freq for local ones
        full = raw
        local = {"rope_theta": raw.get("rope_local_base_freq", _GEMMA3["rope_local_base_freq"])}
    local_theta, local_scaling = _rope(local, _GEMMA3["rope_local_base_freq"], source, key="sliding_attention rope")
    if local_scaling["rope_type"] != "default":
        raise ValueError(f"{source}: rope scaling on sliding_attention layers ({local_scaling['rope_type']!r}) is not "
                         "supported; Gemma 3 scales the full_attention layers' RoPE only.")
    if raw.get("attn_logit_softcapping") is not None:
        # transformers' Gemma3Attention stores the setting but never applies it (Gemma 2's does):
        # a checkpoint that sets it has no single meaning, so it is refused rather than guessed
        raise ValueError(f"{source}: attn_logit_softcapping={raw['attn_logit_softcapping']!r} is not supported for "
                         "gemma3_text: transformers' Gemma 3 ignores it (Gemma 3 checkpoints set it to null). Set it "
                         "to null to run the model as transformers does.")
    cap = raw.get("final_logit_softcapping")
    return dict(
        rope=_rope(full, _GEMMA3["rope_theta"], source, key="full_attention rope"),
        hidden_act=raw.get("hidden_activation") or _GEMMA3["hidden_activation"],
        layer_types=tuple(types),
        sliding_window=int(window) if SLIDING in types else None,
        rope_local_base_freq=local_theta,
        query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar") or _GEMMA3["query_pre_attn_scalar"]),
        final_logit_softcapping=None if cap is None else float(cap),
    )
