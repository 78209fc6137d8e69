"""`jaxrast serve` on the toy family, through the official openai client: completions and chat,
streaming and not, n > 1, stop strings, seeds, concurrency, errors, disconnects, metrics."""

import asyncio
import json
import random
import urllib.request

import jax
import numpy as np
import openai
import pytest
from serve_fixtures import FAMILY, get_json, post, running, wait_until

from jaxrast.analysis.teacher_forcing import trace_positions
from jaxrast.analysis.trajectories import Trajectory
from jaxrast.cli import main
from jaxrast.rast.ensemble import Pair
from jaxrast.serve.config import ServeConfig
from jaxrast.serve.server import build_service
from jaxrast.toy.task import ChainTask

PROBLEMS = [r["question"] for r in ChainTask().rows(8, seed=4242)]


@pytest.fixture(scope="module")
def server():
    # paged KV: a pool of 16-position pages holding the 8 slots' rows, a request's n samples
    # sharing its prompt's pages
    cfg = ServeConfig(base=f"{FAMILY}/m_base", pairs=((f"{FAMILY}/s_rl", f"{FAMILY}/s_base", 1.0),), max_slots=8,
                      max_len=128, steps_per_call=8, max_waiting=512, page_size=16)
    service, app = build_service(cfg)
    with running(app) as url:
        yield url, service


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_completions_streamed_and_not_agree(client):
    kw = dict(model="jaxrast", prompt=PROBLEMS[0], max_tokens=40, temperature=1.0, seed=7, n=3)
    plain = client.completions.create(**kw)
    assert [c.index for c in plain.choices] == [0, 1, 2]
    assert plain.usage.prompt_tokens == len(PROBLEMS[0]) and plain.usage.completion_tokens > 0
    streamed = {i: "" for i in range(3)}
    finish = {}
    chunks = client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    usage = None
    for chunk in chunks:
        for c in chunk.choices:
            streamed[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert [streamed[i] for i in range(3)] == [c.text for c in plain.choices]
    assert finish == {c.index: c.finish_reason for c in plain.choices}
    assert usage.completion_tokens == plain.usage.completion_tokens
    again = client.completions.create(**kw)  # a seed fixes the draws
    assert [c.text for c in again.choices] == [c.text for c in plain.choices]


def test_chat_streamed_and_not_agree_and_rast_extras_apply(client):
    messages = [{"role": "user", "content": PROBLEMS[1]}]
    kw = dict(model="jaxrast", messages=messages, max_tokens=40, temperature=0.8, seed=3)
    plain = client.chat.completions.create(**kw)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                   if c.choices)
    assert text == plain.choices[0].message.content and plain.choices[0].message.role == "assistant"
    # the RL shift changes the answer's style: RAST writes steps, the base mostly guesses directly
    greedy = dict(model="jaxrast", prompt=PROBLEMS[:4], max_tokens=60, temperature=0)
    rast = client.completions.create(**greedy, extra_body={"lam": 1.0})
    base = client.completions.create(**greedy, extra_body={"mode": "base"})
    assert [c.text for c in rast.choices] != [c.text for c in base.choices]
    assert sum("=" in c.text for c in rast.choices) > sum("=" in c.text for c in base.choices)


def test_stop_strings_cut_the_text(client):
    free = client.completions.create(model="jaxrast", prompt=PROBLEMS[2], max_tokens=60, temperature=0,
                                     extra_body={"lam": 1.0})
    text = free.choices[0].text
    stop = text[6:8]
    cut = client.completions.create(model="jaxrast", prompt=PROBLEMS[2], max_tokens=60, temperature=0, stop=[stop],
                                    extra_body={"lam": 1.0})
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="jaxrast", prompt=PROBLEMS[2], max_tokens=60, temperature=0, stop=[stop], stream=True,
        extra_body={"lam": 1.0}) if c.choices)
    assert streamed == cut.choices[0].text  # a partial stop string is held back, never shown


def test_greedy_output_equals_jaxrast_decode(server, client, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, q in enumerate(PROBLEMS[:4])))
    out = tmp_path / "decode.jsonl"
    assert main(["decode", "--base", f"{FAMILY}/m_base", "--pair", f"{FAMILY}/s_rl", f"{FAMILY}/s_base", "1.0",
                 "--dataset", str(data), "--prompt-template", "{question}", "--temperature", "0",
                 "--max-new-tokens", "48", "--out", str(out), "--no-progress"]) == 0
    rows = {r["id"]: r["completion"] for r in map(json.loads, out.read_text().splitlines())}
    served = client.completions.create(model="jaxrast", prompt=PROBLEMS[:4], max_tokens=48, temperature=0,
                                       stop=["\nQuestion:"])
    assert [c.text for c in served.choices] == [rows[f"q{i}"] for i in range(4)]


def test_echo_scores_the_prompt_under_the_request_law(server, client):
    """`echo` + `logprobs`, as lm-evaluation-harness scores choices: every prompt token's
    log-prob (the first null) under the request's law, equal to `jaxrast analyze`'s
    teacher-forced numbers, with its alternatives; `max_tokens: 0` scores without decoding;
    streamed and not agree; a batch of token-id prompts scores each."""
    url, service = server
    prompt = PROBLEMS[3]
    ids = service.encode(prompt)
    pair = service.pairs[0]
    for model, extra, lam in (("jaxrast", {"lam": 0.7}, 0.7), ("jaxrast:base", {}, 0.0)):  # a name fixes a mode
        got = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=2,
                                        temperature=0, extra_body=extra)
        c = got.choices[0]
        assert c.text == prompt and c.finish_reason == "length" and got.usage.completion_tokens == 0
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        want = trace_positions([Trajectory(ids[:1], ids[1:])], service.base, [Pair(pair.rl, pair.ref, lam)],
                               vocab=service.vocab, top_k=2, progress=False)[0]
        np.testing.assert_allclose(lp.token_logprobs[1:], want["logp_combined"], atol=1e-4)
        for top, best, p in zip(lp.top_logprobs[1:], want["combined/ids"][:, 0], want["combined/values"][:, 0]):
            assert top[service.token_text(int(best))] == pytest.approx(np.log(p), abs=1e-4)
    kw = dict(model="jaxrast", prompt=prompt, max_tokens=3, echo=True, logprobs=1, temperature=0)
    plain = client.completions.create(**kw).choices[0]
    assert plain.text.startswith(prompt) and len(plain.logprobs.token_logprobs) == len(ids) + 3
    streamed = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
    assert "".join(c.text for c in streamed) == plain.text
    assert sum((c.logprobs.token_logprobs for c in streamed if c.logprobs), []) == plain.logprobs.token_logprobs
    batch = post(url + "/v1/completions", {"model": "jaxrast", "prompt": [ids, ids[:5]], "max_tokens": 0,
                                           "echo": True, "logprobs": 0})[1]["choices"]
    assert [len(c["logprobs"]["token_logprobs"]) for c in batch] == [len(ids), 5]
    assert batch[1]["logprobs"]["token_logprobs"] == pytest.approx(batch[0]["logprobs"]["token_logprobs"][:5])


def test_lm_eval_scores_rast_choices_as_jaxrast_analyze_does(server, tmp_path):
    """lm-evaluation-harness (`local-completions`, in this process) scoring a multiple-choice
    task through the server in RAST mode: each choice's log-likelihood is the teacher-forced
    sum of RAST's combined log-probs `jaxrast analyze` computes (λ = the pair's 1.0)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    url, service = server
    rows = ChainTask().rows(3, seed=11)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"question": r["question"], "choices": [f"#{int(r['answer']):02d}", "#00",
                                                                              "#50"], "answer": 0}) + "\n"
                            for r in rows))
    (tmp_path / "toy_mc.yaml").write_text(
        f"task: toy_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    args = f"model=jaxrast,base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={FAMILY}/m_base," \
           "num_concurrent=2,max_retries=1"
    samples = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["toy_mc"],
                                      task_manager=TaskManager(include_path=str(tmp_path)),
                                      log_samples=True)["samples"]["toy_mc"]
    pair = service.pairs[0]
    for sample in samples:
        context = service.encode(sample["doc"]["question"])
        for choice, (score, _) in zip(sample["doc"]["choices"], sample["filtered_resps"]):
            cont = service.encode(choice, special_tokens=False)
            want = trace_positions([Trajectory(context, cont)], service.base, [Pair(pair.rl, pair.ref, 1.0)],
                                   vocab=service.vocab, progress=False)[0]["logp_combined"].sum()
            assert float(score) == pytest.approx(float(want), abs=1e-3)


def test_64_concurrent_clients_each_get_their_own_answer_once(server):
    url, service = server
    rng = random.Random(0)
    jobs = [dict(prompt=rng.choice(PROBLEMS), max_tokens=rng.randrange(4, 40), n=rng.randrange(1, 5), seed=i,
                 temperature=rng.choice([0.0, 0.7, 1.0]), stream=rng.random() < 0.5,
                 extra_body={"mode": rng.choice(["rast", "rast", "base", "rl"]), "lam": rng.choice([0.5, 1.0, 1.5])})
            for i in range(64)]

    async def one(client, job):
        kw = {k: v for k, v in job.items() if k != "stream"}
        if not job["stream"]:
            r = await client.completions.create(model="jaxrast", **kw)
            return sorted((c.index, c.text) for c in r.choices)
        texts: dict[int, str] = {}
        async for chunk in await client.completions.create(model="jaxrast", stream=True, **kw):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
        return sorted(texts.items())

    async def all_of(order):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        results = await asyncio.gather(*(one(client, jobs[i]) for i in order))
        await client.close()
        return dict(zip(order, results))

    first = asyncio.run(all_of(list(range(64))))
    second = asyncio.run(all_of(list(range(63, -1, -1))))  # other neighbours, other slots, other order
    assert all(len(first[i]) == jobs[i]["n"] for i in range(64))
    assert first == second
    assert wait_until(lambda: get_json(url + "/health")["running"] == 0)
    assert get_json(url + "/health")["waiting"] == 0
    metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    assert "jaxrast_time_to_first_token_seconds_count" in metrics and "jaxrast_slot_occupancy" in metrics
    assert f'jaxrast_attention_info{{backend="{server[1].scheduler.attention}"}} 1.0' in metrics
    gauge = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("jaxrast_")}
    assert gauge["jaxrast_kv_pages"] == 8 * 8 and gauge["jaxrast_kv_pages_used"] == 0  # 8 rows of 128 positions
    assert 0 < gauge["jaxrast_kv_pages_peak"] <= 64 and gauge["jaxrast_prompt_prefills_shared"] > 0


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "jaxrast", "max_tokens": 5}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "Q", "max_tokens": 5}, 404, None),
    ({"model": "jaxrast", "prompt": "Q", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "jaxrast", "prompt": "Q", "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": "jaxrast", "prompt": "Q", "max_tokens": 5, "temperature": -0.5}, 400, "temperature"),
    ({"model": "jaxrast", "prompt": "Q", "max_tokens": 5, "top_p": 0}, 400, "top_p"),
    ({"model": "jaxrast", "prompt": "Q", "max_tokens": 5, "top_p": 1.5}, 400, "top_p"),
    ({"model": "jaxrast", "prompt": "Q", "max_tokens": 5, "n": 99}, 400, "n"),
    ({"model": "jaxrast", "prompt": "Q", "max_tokens": 5, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "jaxrast", "prompt": "Q", "max_tokens": 5, "lam": [1.0, 2.0]}, 400, "lam"),
    ({"model": "jaxrast", "prompt": "Q" * 200, "max_tokens": 5}, 400, "prompt"),
    ({"model": "jaxrast", "prompt": [999999], "max_tokens": 5}, 400, "prompt"),
])
def test_bad_completion_requests_get_openai_errors(server, body, status, param):
    url = server[0]
    code, err, _ = post(url + "/v1/completions", body)
    assert code == status, err
    assert set(err["error"]) >= {"message", "type", "param", "code"} and err["error"]["message"]
    assert err["error"]["param"] == param
    assert post(url + "/v1/completions", {"model": "jaxrast", "prompt": "Q", "max_tokens": 2})[0] == 200


def test_bad_chat_requests_get_openai_errors(server):
    url = server[0] + "/v1/chat/completions"
    for body, status in [({"model": "jaxrast"}, 400), ({"model": "jaxrast", "messages": []}, 400),
                         ({"model": "jaxrast", "messages": [{"role": "robot", "content": "x"}]}, 400)]:
        code, err, _ = post(url, body)
        assert code == status and err["error"]["type"] == "invalid_request_error", err


def test_a_full_queue_answers_429_with_retry_after(server):
    url, service = server
    limit, service.max_waiting = service.max_waiting, 4
    try:
        async def flood():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            results = await asyncio.gather(*(client.completions.create(model="jaxrast", prompt=PROBLEMS[0], n=4,
                                                                       max_tokens=100) for _ in range(6)),
                                           return_exceptions=True)
            await client.close()
            return results

        results = asyncio.run(flood())
        limited = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert limited and all(r.response.headers.get("retry-after") for r in limited)
        assert not [r for r in results if isinstance(r, Exception) and not isinstance(r, openai.RateLimitError)]
        # more choices than the queue can ever hold: a 400 naming the field, not a 429 forever
        code, err, _ = post(url + "/v1/completions", {"model": "jaxrast", "prompt": ["Q"] * 3, "n": 2, "max_tokens": 2})
        assert code == 400 and err["error"]["param"] == "prompt" and "--max-waiting" in err["error"]["message"]
    finally:
        service.max_waiting = limit
    assert wait_until(lambda: get_json(url + "/health")["running"] == 0, 60)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    url = server[0]
    stream = client.completions.create(model="jaxrast", prompt=PROBLEMS[3], max_tokens=100, n=4, stream=True,
                                       extra_body={"min_tokens": 100})
    for i, _ in enumerate(stream):
        if i == 2:
            assert get_json(url + "/health")["running"] > 0
            break
    stream.close()
    assert wait_until(lambda: get_json(url + "/health")["running"] == 0)


def test_nothing_compiles_after_warm_up(server, client):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _d, **kw: compiles.append(event) if "backend_compile" in event else None)
    rng = random.Random(2)
    for i in range(200):
        short = rng.random() < 0.3  # prompts of every bucket: a prefix of a problem, or one to three problems
        prompt = rng.choice(PROBLEMS)[: rng.randrange(1, 20)] if short else rng.choice(PROBLEMS) * rng.randrange(1, 4)
        extras = {"lam": rng.uniform(0, 2), "top_k": rng.choice([0, 5]), "mode": rng.choice(["rast", "base", "rl"])}
        client.completions.create(model="jaxrast", prompt=prompt, max_tokens=rng.randrange(1, 20), seed=i,
                                  temperature=rng.choice([0, 1.0]), top_p=rng.choice([1.0, 0.9]),
                                  n=rng.choice([1, 2]), extra_body=extras)
    assert compiles == []


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["jaxrast", "jaxrast:base", "jaxrast:rl"]
    assert get_json(server[0] + "/health")["status"] == "ok"
