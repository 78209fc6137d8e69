"""A real published checkpoint (SmolLM2-135M-Instruct, `tests/real_checkpoints.py`) served to
the client our users evaluate with: lm-evaluation-harness's `local-completions` (log-likelihood
of multiple-choice answers, `generate_until`) and `local-chat-completions`, whose scores must
be transformers' own; `echo` + `logprobs` prompt log-probs equal transformers'; and
`jaxrast decode --prompt-template chat` writes what `apply_chat_template` + `generate` writes;
`--base FILE.gguf` decodes as the converted checkpoint does."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from real_checkpoints import Unavailable, gguf_cache, smollm2_checkpoint, smollm2_gguf
from serve_fixtures import post, running

from jaxrast.cli import main

pytestmark = pytest.mark.slow

QUESTIONS = [("What is the capital of France?", [" Paris", " London", " Berlin", " Madrid"], 0),
             ("How many legs does a spider have?", [" six", " eight", " ten", " four"], 1),
             ("Which planet is known as the red planet?", [" Venus", " Jupiter", " Mars", " Saturn"], 2),
             ("What is two plus two?", [" three", " five", " four", " six"], 2)]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{target}"
{extra}"""


@pytest.fixture(scope="module")
def smollm2():
    try:
        return smollm2_checkpoint()
    except Unavailable as err:
        pytest.skip(f"SmolLM2-135M-Instruct is not reachable here: {err}")


@pytest.fixture(scope="module")
def torch_model(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def server(smollm2):
    from jaxrast.serve.config import ServeConfig
    from jaxrast.serve.server import build_service

    service, app = build_service(ServeConfig(base=smollm2, max_slots=4, max_len=256, steps_per_call=8))
    with running(app) as url:
        yield url, service


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A multiple-choice and a generate_until task over the same four questions (lm-eval's
    local-task YAML, the dataset a JSONL beside it)."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / "mc.yaml").write_text(TASK.format(
        name="jaxrast_mc", data=data, kind="multiple_choice", target="{{answer}}",
        extra='doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n'))
    (folder / "gen.yaml").write_text(TASK.format(
        name="jaxrast_gen", data=data, kind="generate_until", target="{{choices[answer]}}",
        extra="generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
              "metric_list:\n  - metric: exact_match\n"))
    return str(folder)


def transformers_log_probs(torch_model, ids: list[int]) -> np.ndarray:
    """log p(ids[j] | ids[:j]) for j >= 1, from one transformers forward (float32)."""
    import torch

    model, _ = torch_model
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def test_echo_logprobs_of_the_prompt_equal_transformers(server, torch_model):
    url, _ = server
    _, tok = torch_model
    prompts = ["The capital of France is", "def fib(n):\n    return", "Question: What is two plus two?\nAnswer: four"]
    status, body, _ = post(url + "/v1/completions", {"model": "jaxrast", "prompt": prompts, "max_tokens": 0,
                                                     "echo": True, "logprobs": 1, "temperature": 0})
    assert status == 200, body
    for prompt, choice in zip(prompts, sorted(body["choices"], key=lambda c: c["index"])):
        ids = tok(prompt)["input_ids"]
        got = choice["logprobs"]["token_logprobs"]
        assert choice["text"] == prompt and got[0] is None and len(got) == len(ids)
        np.testing.assert_allclose(got[1:], transformers_log_probs(torch_model, ids), atol=1e-3)


def lm_eval_cli(model: str, url: str, tokenizer: str, tasks: str, names: str, out: str) -> dict:
    """Runs the `lm_eval` command against the server; returns {task: samples}."""
    args = f"model=jaxrast,base_url={url},num_concurrent=2,max_retries=1,tokenizer_backend=huggingface," \
           f"tokenizer={tokenizer}"
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", args, "--include_path", tasks,
           "--tasks", names, "--batch_size", "8", "--log_samples", "--output_path", out]  # 8 prompts a request
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: [json.loads(line) for line in open(path)]
            for name in names.split(",") for path in glob.glob(f"{out}/**/samples_{name}_*.jsonl", recursive=True)}


def test_lm_eval_scores_through_the_server_are_transformers_scores(server, torch_model, smollm2, tasks, tmp_path):
    """lm-eval's multiple-choice log-likelihoods through `local-completions` equal its `hf`
    model's per choice (the transformers model, in this process) and give the same accuracy;
    `generate_until` answers are the server's greedy text."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    url, _ = server
    served = lm_eval_cli("local-completions", url + "/v1/completions", smollm2, tasks, "jaxrast_mc,jaxrast_gen",
                         str(tmp_path / "served"))
    model, tok = torch_model
    reference = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4),
                                        tasks=["jaxrast_mc"], task_manager=TaskManager(include_path=tasks),
                                        log_samples=True)["samples"]["jaxrast_mc"]
    by_doc = {s["doc_id"]: s for s in served["jaxrast_mc"]}
    assert sorted(by_doc) == list(range(len(QUESTIONS)))
    for ref in reference:
        mine = by_doc[ref["doc_id"]]
        np.testing.assert_allclose([float(r[0]) for r in mine["filtered_resps"]],
                                   [float(r[0]) for r in ref["filtered_resps"]], atol=1e-2)
        assert mine["acc"] == ref["acc"]
    for sample in served["jaxrast_gen"]:
        (question, *_), = [q for q in QUESTIONS if q[0] == sample["doc"]["question"]]
        text = post(url + "/v1/completions", {"model": "jaxrast", "prompt": f"Question: {question}\nAnswer:",
                                              "max_tokens": 8, "temperature": 0, "stop": ["\n"]})[1]
        assert sample["filtered_resps"][0] == text["choices"][0]["text"]


def test_lm_eval_chat_completions_run(server, smollm2, tasks):
    """`local-chat-completions` (lm-eval in this process: the command's startup is paid once,
    above) answers a generation task through the tokenizer's chat template."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    url, _ = server
    args = f"model=jaxrast,base_url={url}/v1/chat/completions,num_concurrent=2,max_retries=1"
    samples = lm_eval.simple_evaluate(model="local-chat-completions", model_args=args, tasks=["jaxrast_gen"],
                                      task_manager=TaskManager(include_path=tasks), apply_chat_template=True,
                                      log_samples=True)["samples"]["jaxrast_gen"]
    answers = [s["filtered_resps"][0] for s in samples]
    assert len(answers) == len(QUESTIONS) and all(isinstance(a, str) and a for a in answers)


def test_decode_with_the_chat_template_equals_transformers_generate(smollm2, torch_model, tmp_path, monkeypatch):
    """`jaxrast decode --prompt-template chat` writes transformers' `apply_chat_template` +
    greedy `generate` tokens; `--base FILE.gguf` writes the same rows as the converted
    directory (the conversion the fixture made, found in the cache: no second dequantization)."""
    import torch

    model, tok = torch_model
    questions = [q for q, _, _ in QUESTIONS[:2]]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, q in enumerate(questions)))
    monkeypatch.setenv("JAXRAST_GGUF_CACHE", gguf_cache())
    rows = {}
    for base in (smollm2, smollm2_gguf()):
        out = tmp_path / f"{os.path.basename(base)}.jsonl"
        assert main(["decode", "--base", base, "--dataset", str(data), "--prompt-template", "chat",
                     "--temperature", "0", "--max-new-tokens", "24", "--save-token-ids", "--out", str(out),
                     "--no-progress"]) == 0
        rows[base] = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    same = ("prompt_ids", "token_ids", "completion")
    assert [[r[k] for k in same] for r in rows[smollm2_gguf()].values()] == \
        [[r[k] for k in same] for r in rows[smollm2].values()]
    for i, q in enumerate(questions):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_dict=False)
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        assert rows[smollm2][f"q{i}"]["prompt_ids"] == list(ids)
        assert rows[smollm2][f"q{i}"]["token_ids"] == want
