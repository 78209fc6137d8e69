"""The real gemma-3-270m (`tests/real_gemma.py`): jaxrast's logits are transformers' on a prompt
past the 512-position window, and its greedy continuations (engine, CPU kernel) are
transformers' greedy `generate`, one of them crossing the window while it decodes."""

from __future__ import annotations

import numpy as np
import pytest
from real_checkpoints import Unavailable
from real_gemma import gemma3_270m_checkpoint

from jaxrast.models.hf import load_model
from jaxrast.rast.decoding import RAST, SamplingParams

pytestmark = pytest.mark.slow

WORDS = "river stone apple cloud seven violet market engine quiet harbor lantern maple".split()


def long_text(sentences: int) -> str:
    """Plain varied English, so the model's attention is not degenerate: ~13 tokens a sentence."""
    return " ".join(f"Sentence {i} mentions the {WORDS[i % 12]} and the {WORDS[(5 * i + 3) % 12]}."
                    for i in range(sentences))


@pytest.fixture(scope="module")
def gemma():
    try:
        path = gemma3_270m_checkpoint()
    except Unavailable as err:
        pytest.skip(f"gemma-3-270m is not reachable here: {err}")
    model, cfg, tok = load_model(path)
    return path, model, cfg, tok


@pytest.fixture(scope="module")
def torch_model(gemma):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma[0], dtype=torch.float32).eval()


def test_the_checkpoint_is_gemma3_with_sliding_layers(gemma):
    _, _, cfg, tok = gemma
    assert cfg.model_type == "gemma3_text" and cfg.sliding_window == 512 and cfg.num_hidden_layers == 18
    assert cfg.layer_types.count("sliding_attention") == 15 and cfg.vocab_size == 262_144
    assert tok("x")["input_ids"][0] == tok.bos_token_id == 2


def test_logits_past_the_window_equal_transformers(gemma, torch_model):
    """A 700-token prompt: positions past 512 see only their window in 15 of the 18 layers. The
    last 160 positions are compared (the full [700, 262144] logits would take 730 MB a copy)."""
    import torch

    _, model, _, tok = gemma
    ids = tok(long_text(70))["input_ids"][:700]
    assert len(ids) == 700
    keep = 160
    with torch.no_grad():
        want = torch_model(torch.tensor([ids]), logits_to_keep=keep).logits.numpy()[0]
    got = np.asarray(model(np.asarray([ids]), logits_from=len(ids) - keep)[0][0])
    # float32 rounding, scaled: Gemma's residual stream reaches ~1e5 (3,000x its logits) and
    # XLA:CPU's float32 dot rounds ~6x more than torch's (measured: 100 vs 15 ulps on a
    # 2048-long contraction), so the logits carry ~1e-4 of their scale in rounding (measured
    # 1.4e-3 here at |z| <= 37; torch's own float32 is 4e-4 from float64): 2^10 ulps of the largest
    atol = 2**10 * np.finfo(np.float32).eps * np.abs(want).max()
    err = np.abs(got - want).max()
    assert err <= atol, (err, atol)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_engine_greedy_equals_transformers_generate(gemma, torch_model):
    """"The capital of France is" (the tokenizer adds BOS), and a 500-token prompt whose 24
    new tokens cross the window, in one engine of mixed row lengths."""
    import torch

    _, model, _, tok = gemma
    long = tok.decode(tok(long_text(70), add_special_tokens=False)["input_ids"][:500])
    prompts, steps = ["The capital of France is", long], 24
    engine = RAST(model, tokenizer=tok, batch_size=2, max_len=576)
    assert engine.attention.startswith(("cpu_kernel", "xla_ragged"))
    rows = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=steps))
    for prompt, (row,) in zip(prompts, rows):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            want = torch_model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                                        pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert row.token_ids == want[:len(row.token_ids)] and (len(row.token_ids) == steps or
                                                                 row.finish_reason == "stop")
    assert len(tok(long)["input_ids"]) + steps > 512
    assert rows[0][0].text.startswith(" the capital of the country of France. It is the largest")
