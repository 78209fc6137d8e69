"""Real-model prompt conventions (issue 37): a tokenizer that adds a BOS gets it in every
command, `--prompt-template chat` is the tokenizer's chat template as transformers applies
it, and a checkpoint's generation_config.json eos ids stop rows by default."""

from __future__ import annotations

import json

import pytest
from hf_fixtures import SMALL, write_questions
from refusals import assert_refused

from jaxrast.cli import main
from jaxrast.models.hf import load_tokenizer

# a chat template that writes its own BOS, as Llama 3's does (in the character vocabulary)
CHAT = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def bos_ckpt(ckpt_dir):
    return ckpt_dir("llama", seed=5, adds_bos=True, chat_template=CHAT, **SMALL)


def decode(ckpt, data, out, *extra):
    return main(["decode", "--base", ckpt, "--mode", "base", "--dataset", data, "--max-new-tokens", "6",
                 "--temperature", "0", "--save-token-ids", "--out", str(out), "--no-progress", *extra])


def rows_of(path):
    return [json.loads(line) for line in open(path)]


def test_a_tokenizer_that_adds_bos_gets_it_in_every_command(bos_ckpt, tmp_path):
    import asyncio

    from jaxrast.analysis.trajectories import read_trajectories
    from jaxrast.grpo.rewards import as_rewards
    from jaxrast.grpo.trainer import GRPOTrainer
    from jaxrast.models.hf import load_model
    from jaxrast.rast.decoding import RAST
    from jaxrast.serve.config import ServeConfig
    from jaxrast.serve.protocol import ChatCompletionRequest, CompletionRequest
    from jaxrast.serve.server import build_service

    tok = load_tokenizer(bos_ckpt)
    bos, question = tok.bos_token_id, "abc "
    want = [bos, *tok(question, add_special_tokens=False)["input_ids"]]
    assert tok(question)["input_ids"] == want  # the tokenizer's default

    data = write_questions(tmp_path / "q.jsonl", 1)
    assert decode(bos_ckpt, data, tmp_path / "out.jsonl", "--prompt-template", "{question}") == 0
    (row,) = rows_of(tmp_path / "out.jsonl")
    assert row["prompt_ids"] == want  # decode

    text_only = tmp_path / "text.jsonl"  # analysis re-tokenizes a row's text as decode encoded it
    text_only.write_text(json.dumps({k: v for k, v in row.items() if not k.endswith("_ids")}) + "\n")
    (traj,) = read_trajectories(str(text_only), tok)
    assert traj.prompt_ids == want and traj.token_ids[0] != bos

    model, _, _ = load_model(bos_ckpt)
    engine = RAST(model, tokenizer=tok, batch_size=1, max_len=64)
    assert engine._encode([question]) == [want]  # RAST.generate's text prompts (the demo's)

    service, _ = build_service(ServeConfig(base=bos_ckpt, max_slots=2, max_len=64, steps_per_call=4))
    try:
        ids, _ = asyncio.run(service.prepare(CompletionRequest(model="m", prompt=question, max_tokens=2)))
        assert ids == [want]  # serve: completions
        chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": question}], max_tokens=2,
                                     continue_text="ab", min_tokens=1)
        ids, params = asyncio.run(service.prepare(chat))
        assert ids[0][0] == bos and bos not in ids[0][1:]  # the template's BOS, once
        assert bos not in params.continue_ids  # a continuation is mid-sequence
    finally:
        service.stop()

    trainer = GRPOTrainer(_grpo_config(tmp_path), policy=model, tokenizer=tok, rewards=as_rewards([no_reward]),
                          rows=[{"id": "0", "question": question, "answer": "a"}])
    assert trainer.prompt_ids == [want]  # GRPO


def no_reward(prompts, completions, **_):
    return [0.0] * len(completions)


def _grpo_config(tmp_path):
    from jaxrast.grpo.config import DataSpec, GRPOConfig, LossSpec, MeshSpec, RolloutSpec

    return GRPOConfig(data=DataSpec(template="{question}"), mesh=MeshSpec(1, 1, 1), steps=1, progress=False,
                      rollout=RolloutSpec(prompts_per_step=1, group_size=2, max_new_tokens=4, batch_size=2),
                      loss=LossSpec(micro_batch_size=2), output_dir=str(tmp_path / "grpo"))


def test_decode_chat_template_is_transformers_chat_template_and_generate(bos_ckpt, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    data = write_questions(tmp_path / "q.jsonl", 2)
    out = tmp_path / "chat.jsonl"
    assert decode(bos_ckpt, data, out, "--prompt-template", "chat", "--system", "be brief", "--stop", "#") == 0
    tok = load_tokenizer(bos_ckpt)
    hf = AutoModelForCausalLM.from_pretrained(bos_ckpt, dtype=torch.float32)
    padding = list(range(len(tok), hf.config.vocab_size))  # embedding rows past the tokenizer: never sampled
    for row in rows_of(out):
        question = "abc " * (1 + int(row["id"][1:]))
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": question}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert row["prompt_ids"] == list(prompt) and row["prompt"].startswith("<bos>system: be brief\nuser: abc")
        assert row["prompt_ids"].count(tok.bos_token_id) == 1
        generated = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=1,
                                pad_token_id=0, suppress_tokens=padding)[0, len(prompt):].tolist()
        assert row["token_ids"] == generated[:len(row["token_ids"])] and row["prompt_template"] == "chat"


def test_the_chat_template_needs_one_and_the_system_text_needs_it(ckpt_dir, tmp_path, capsys):
    plain = ckpt_dir("qwen2", seed=1, **SMALL)  # no chat template
    data = write_questions(tmp_path / "q.jsonl", 1)
    args = ["decode", "--base", plain, "--mode", "base", "--dataset", data, "--out", str(tmp_path / "o.jsonl")]
    assert_refused([*args, "--prompt-template", "chat"], "needs the tokenizer.s chat template.*has none", capsys)
    assert_refused([*args, "--prompt-template", "{question}", "--system", "x"], "needs the prompt template 'chat'",
                   capsys)


def test_generation_config_eos_ids_are_default_stop_ids(ckpt_dir, tmp_path):
    import shutil

    from jaxrast.rast.requests import default_stop_ids

    ckpt = shutil.copytree(ckpt_dir("qwen2", seed=1, **SMALL), tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    tok = load_tokenizer(str(ckpt))
    assert default_stop_ids(tok) == (1, 7)  # the tokenizer's eos (1) and the generation config's
    assert default_stop_ids(tok, [5]) == (5,)  # given stop ids replace them
