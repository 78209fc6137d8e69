"""Pretraining the toy family from scratch: next-token cross-entropy on the chain corpus.

Uses the project's one `CausalLM` forward and saves HuggingFace checkpoints (`save_hf`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxrast.models import CausalLM, ModelConfig
from jaxrast.models.hf import save_hf
from jaxrast.toy.task import CHARS, ChainTask, CorpusMix, corpus_batch
from jaxrast.toy.tokenizer import char_tokenizer

# The family's shapes. Vocabularies are padded differently on purpose (tokenizer: 24
# tokens), as Qwen2.5-1.5B (151936) and 7B+ (152064) are: RAST must align them.
SIZES = {
    "S": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=192, vocab=32),
    "M": dict(hidden=128, layers=4, heads=4, kv_heads=2, inter=384, vocab=40),
}


@dataclasses.dataclass
class PretrainConfig:
    out: str
    size: str = "S"
    steps: int = 3000
    batch: int = 128
    seq_len: int = 64
    lr: float = 2e-3
    warmup: int = 100
    final_lr_fraction: float = 0.1  # cosine decay to this fraction of lr
    weight_decay: float = 0.01
    seed: int = 0
    task: ChainTask = dataclasses.field(default_factory=ChainTask)
    mix: CorpusMix = dataclasses.field(default_factory=CorpusMix)


# The toy task has no roles: a chat is its messages' text in order (a user message is a problem),
# so /v1/chat/completions serves the toy family as /v1/completions does.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def toy_tokenizer():
    tok = char_tokenizer(CHARS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def model_config(size: str, tok) -> ModelConfig:
    if size not in SIZES:
        raise ValueError(f"unknown toy size {size!r}; choose one of {sorted(SIZES)}.")
    s = SIZES[size]
    assert s["vocab"] >= len(tok)
    return ModelConfig("qwen2", s["vocab"], s["hidden"], s["inter"], s["layers"], s["heads"], s["kv_heads"],
                       s["hidden"] // s["heads"], rope_theta=10000.0, max_position_embeddings=256,
                       tie_word_embeddings=False, attention_bias=True,
                       bos_token_id=tok.bos_token_id, eos_token_id=(tok.eos_token_id,))


def token_loss(model: CausalLM, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over `mask`. tokens [b, t+1], mask [b, t]."""
    logits, _ = model(tokens[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(nll * mask) / jnp.maximum(mask.sum(), 1)


def drill_digit_accuracy(model: CausalLM, task: ChainTask, tok, rows: int = 64, seed: int = 12345) -> float:
    """Teacher-forced accuracy of the answer digits of drill lines (a cheap learning probe)."""
    tokens, _ = corpus_batch(task, tok, np.random.default_rng(seed), rows, 64, CorpusMix(1.0, 0.0, 0.0))
    pred = np.asarray(jnp.argmax(model(jnp.asarray(tokens[:, :-1]))[0], -1))
    eq = tok.convert_tokens_to_ids("=")
    hits = [pred[b, i + j] == tokens[b, i + j + 1] for b, i in zip(*np.where(tokens[:, :-1] == eq))
            for j in range(task.value_digits) if i + j < pred.shape[1]]
    return float(np.mean(hits))


def pretrain(cfg: PretrainConfig, progress: bool = True) -> tuple[CausalLM, object, list[dict]]:
    """Trains a fresh model of `cfg.size` on the corpus; saves it to `cfg.out` in HF format."""
    tok = toy_tokenizer()
    model = CausalLM(model_config(cfg.size, tok), rngs=nnx.Rngs(cfg.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps,
                                                  cfg.lr * cfg.final_lr_fraction)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, tokens, mask):
        def loss_fn(p):
            return token_loss(nnx.merge(graphdef, p), tokens, mask)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(cfg.seed)
    history, t0 = [], time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"pretrain {cfg.size}", disable=not progress)
    for i in bar:
        tokens, mask = corpus_batch(cfg.task, tok, rng, cfg.batch, cfg.seq_len, cfg.mix)
        params, opt_state, loss = step(params, opt_state, tokens, mask)
        if i % 100 == 0 or i == cfg.steps - 1:
            entry = {"step": i, "loss": float(loss), "time": time.perf_counter() - t0}
            if i % 500 == 0 or i == cfg.steps - 1:
                entry["drill_digit_acc"] = drill_digit_accuracy(nnx.merge(graphdef, params), cfg.task, tok)
            history.append(entry)
            bar.set_postfix(loss=f"{float(loss):.3f}", drill=f"{history[-1].get('drill_digit_acc', float('nan')):.2f}")
    nnx.update(model, params)
    os.makedirs(cfg.out, exist_ok=True)
    save_hf(model, tok, cfg.out)
    with open(os.path.join(cfg.out, "pretrain_log.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "history": history,
                   "wall_seconds": time.perf_counter() - t0}, f, indent=1)
    return model, tok, history
