"""A server that hostile clients cannot hurt (the toy family, with an API key): each class of
hostile request gets a 4xx in OpenAI's shape naming the field while five normal streams beside
it come back whole; a request the engine fails ends alone, as a 500 or an SSE error event; the
event loop answers /health while the largest body is refused; a speculative server takes every
request the plain one does; and schemathesis finds no 5xx and no answer outside the schema."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import openai
import pytest
from serve_fixtures import FAMILY, get_json, post, running, wait_until

from jaxrast.serve.config import ServeConfig
from jaxrast.serve.server import build_service
from jaxrast.toy.task import ChainTask

KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROBLEM = ChainTask().rows(1, seed=4242)[0]["question"]
NORMAL_TOKENS = 120
MAX_BODY = 2**20
MAX_LEN = 160
SETTINGS = dict(base=f"{FAMILY}/m_base", pairs=((f"{FAMILY}/s_rl", f"{FAMILY}/s_base", 1.0),), max_slots=8,
                max_len=MAX_LEN, steps_per_call=8, max_waiting=16, api_key=KEY, max_body_bytes=MAX_BODY,
                read_timeout=2.0)


@pytest.fixture(scope="module")
def server():
    service, app = build_service(ServeConfig(**SETTINGS))
    with running(app) as url:
        yield url, service


def completion(**fields) -> dict:
    return {"model": "jaxrast", "prompt": PROBLEM, "max_tokens": 5, **fields}


def chat(content, **fields) -> dict:
    return {"model": "jaxrast", "messages": [{"role": "user", "content": content}], "max_tokens": 5, **fields}


# (what, route, body (a dict, or raw bytes), headers, status, the field the error names)
HOSTILE = [
    ("top_k overflows int32", "/v1/completions", completion(top_k=2**31), AUTH, 400, "top_k"),
    ("min_tokens overflows int32", "/v1/completions", completion(min_tokens=2**31), AUTH, 400, "min_tokens"),
    ("max_tokens overflows int32", "/v1/completions", completion(max_tokens=2**31), AUTH, 400, "max_tokens"),
    ("gamma overflows int32", "/v1/completions", completion(gamma=2**31), AUTH, 400, "gamma"),
    ("λ infinite in float32", "/v1/completions", completion(lam=1e39), AUTH, 400, "lam"),
    ("λ of 1e308", "/v1/completions", completion(lam=[1e308]), AUTH, 400, "lam"),
    ("λ of -1e308", "/v1/completions", completion(lam=-1e308), AUTH, 400, "lam"),
    ("temperature 0 in float32", "/v1/completions", completion(temperature=1e-40), AUTH, 400, "temperature"),
    ("top_p 0 in float32", "/v1/completions", completion(top_p=1e-300), AUTH, 400, "top_p"),
    ("n beyond any queue", "/v1/completions", completion(n=2**40), AUTH, 400, "n"),
    ("a negative seed", "/v1/completions", completion(seed=-1), AUTH, 400, "seed"),
    ("a lone surrogate in a prompt", "/v1/completions", completion(prompt="Q \ud800"), AUTH, 400, "prompt"),
    ("a lone surrogate in a batch", "/v1/completions", completion(prompt=["Q", "\udfff"]), AUTH, 400, "prompt"),
    ("a lone surrogate in continue_text", "/v1/completions", completion(continue_text="\ud800"), AUTH, 400,
     "continue_text"),
    ("a lone surrogate in a stop", "/v1/completions", completion(stop=["\ud800"]), AUTH, 400, "stop"),
    ("continue_text beyond max_forced", "/v1/completions", completion(continue_text=PROBLEM * 3), AUTH, 400,
     "continue_text"),
    ("a stop of 300 characters", "/v1/completions", completion(stop="1" * 300), AUTH, 400, "stop"),
    ("a token id beyond int32", "/v1/completions", completion(prompt=[2**40]), AUTH, 400, "prompt"),
    ("a negative token id", "/v1/completions", completion(prompt=[[3, -1]]), AUTH, 400, "prompt"),
    ("a batch larger than the queue", "/v1/completions", completion(prompt=["Q"] * 17), AUTH, 400, "prompt"),
    ("a prompt over the byte limit", "/v1/completions", completion(prompt="Q" * 100_000), AUTH, 400, "prompt"),
    ("a prompt over the context", "/v1/completions", completion(prompt=[3] * MAX_LEN), AUTH, 400, "prompt"),
    ("a lone surrogate in chat content", "/v1/chat/completions", chat("hi \ud800"), AUTH, 400, "messages"),
    ("a lone surrogate in a content part", "/v1/chat/completions", chat([{"type": "text", "text": "\ud800"}]),
     AUTH, 400, "messages"),
    ("chat beyond the context", "/v1/chat/completions", chat(PROBLEM * 20), AUTH, 400, "messages"),
    ("a lone surrogate to grade", "/v1/rast/grade", {"completions": ["\ud800"], "gold": "1"}, AUTH, 400,
     "completions"),
    ("not JSON", "/v1/completions", b"{not json", AUTH, 400, None),
    ("not UTF-8", "/v1/completions", b'{"model": "jaxrast", "prompt": "\xff\xfe"}', AUTH, 400, None),
    ("nested 100,000 deep", "/v1/completions", b"[" * 100_000, AUTH, 400, None),
    ("a wrong key", "/v1/completions", completion(), {"Authorization": "Bearer nope"}, 401, None),
    ("no key", "/v1/models", None, {}, 401, None),
    ("an unknown route", "/v1/nothing", None, AUTH, 404, None),
    ("a wrong method", "/v1/completions", None, AUTH, 405, None),
]


def send(url: str, route: str, body, headers: dict) -> tuple[int, dict]:
    """(status, JSON body): a POST of `body` (raw bytes, a dict as JSON), or a GET without one."""
    if body is None:
        req = urllib.request.Request(url + route, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())
    data = body if isinstance(body, bytes) else json.dumps(body).encode()  # "\ud800" stays an escape
    code, answer, _ = post(url + route, data, headers)
    return code, answer


def send_headers_only(url: str, route: str, length: int, key: str = KEY, part: bytes = b"") -> tuple[int, dict]:
    """A POST that declares `length` bytes and sends only `part` of them: the answer must not
    wait for the rest."""
    host, port = urllib.parse.urlsplit(url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {route} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode() + part)
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < _length(raw):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, body = raw.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def _length(raw: bytes) -> int:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    return next(int(line.split(":")[1]) for line in head.split("\r\n") if line.startswith("content-length"))


def assert_openai_error(code: int, answer: dict, status: int, param: str | None, what: str) -> None:
    assert code == status, (what, code, answer)
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, (what, answer)
    assert answer["error"]["message"], what
    if param is not None:
        assert answer["error"]["param"] == param, (what, answer)


async def normal_streams(url: str, count: int = 5, **extra) -> list[tuple[int, str]]:
    """(completion tokens, finish reason) of `count` concurrent streams of NORMAL_TOKENS tokens."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)

    async def one(seed: int):
        usage, reason = None, None
        async for chunk in await client.completions.create(
                model="jaxrast", prompt=PROBLEM, max_tokens=NORMAL_TOKENS, temperature=1.0, seed=seed, stream=True,
                stream_options={"include_usage": True}, extra_body={"min_tokens": NORMAL_TOKENS, **extra}):
            usage = chunk.usage or usage
            reason = next((c.finish_reason for c in chunk.choices if c.finish_reason), reason)
        return usage.completion_tokens, reason

    try:
        return await asyncio.gather(*(one(seed) for seed in range(count)))
    finally:
        await client.close()


def beside_normal_streams(url: str, hostile) -> tuple[list, object]:
    """Runs `hostile()` in a thread once 5 normal streams decode; (their results, its result)."""
    async def both():
        streams = asyncio.create_task(normal_streams(url))
        while get_json(url + "/health")["running"] < 5 and not streams.done():
            await asyncio.sleep(0.02)
        result = await asyncio.to_thread(hostile)
        return await streams, result

    return asyncio.run(both())


def test_hostile_requests_get_4xx_naming_the_field_and_normal_rows_come_back_whole(server, caplog, monkeypatch):
    url, service = server
    caplog.set_level(logging.INFO)
    uvicorn_log = logging.getLogger("uvicorn.error")  # (it does not propagate to the root logger)
    monkeypatch.setattr(uvicorn_log, "handlers", [*uvicorn_log.handlers, caplog.handler])

    def every_hostile_request():
        answers = [send(url, route, body, headers) for _, route, body, headers, _, _ in HOSTILE]
        answers.append(send_headers_only(url, "/v1/completions", MAX_BODY + 1))  # refused unread
        answers.append(send_headers_only(url, "/v1/completions", 10**12, key="nope"))  # the key before the body
        answers.append(send_headers_only(url, "/v1/completions", 100, part=b'{"model": '))  # then it stalls
        return answers

    normal, answers = beside_normal_streams(url, every_hostile_request)
    assert normal == [(NORMAL_TOKENS, "length")] * 5
    for (what, _, _, _, status, param), (code, answer) in zip(HOSTILE, answers):
        assert_openai_error(code, answer, status, param, what)
    assert_openai_error(*answers[-3], 413, None, "a body over --max-body-bytes")
    assert_openai_error(*answers[-2], 401, None, "a wrong key with a body of a terabyte")
    assert_openai_error(*answers[-1], 408, None, "a body that stalls past --read-timeout")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], "a traceback in the log"
    assert get_json(url + "/health") == {"status": "ok", "slots": 8, "running": 0, "waiting": 0}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the poisoned λ, on purpose
def test_a_request_the_engine_fails_ends_alone_as_a_500_or_an_sse_error(server, monkeypatch):
    """A request whose λ got past every check (simulated: the checks are switched off for the
    requests of user "poison") makes NaN logits; the id guard ends it alone."""
    url, service = server
    params = service.params

    def poisoned(body, prompts, default_max, **kw):
        p = params(body, prompts, default_max, **kw)
        return dataclasses.replace(p, lam=(1e39,)) if body.user == "poison" else p

    monkeypatch.setattr(service, "params", poisoned)
    monkeypatch.setattr(service, "validate", lambda ids, p: None)
    monkeypatch.setattr(service.scheduler, "check", lambda req: None)
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    errors_before = _metric(url, "jaxrast_request_errors_total")

    def poison():
        code, answer = send(url, "/v1/completions", completion(user="poison", max_tokens=50), AUTH)
        with pytest.raises(openai.APIError) as streamed:
            for _ in client.completions.create(model="jaxrast", prompt=PROBLEM, max_tokens=50, stream=True,
                                               user="poison"):
                pass
        return code, answer, streamed.value

    normal, (code, answer, streamed) = beside_normal_streams(url, poison)
    assert normal == [(NORMAL_TOKENS, "length")] * 5
    assert_openai_error(code, answer, 500, None, "a failed request")
    assert answer["error"]["type"] == "server_error" and answer["error"]["code"] == "engine_error"
    assert "engine failed" in streamed.message
    assert _metric(url, "jaxrast_request_errors_total") == errors_before + 2


def test_health_is_degraded_after_failed_calls_in_a_row_and_recovers(server, monkeypatch, caplog):
    """Decode calls that fail (injected: the device call raises) answer 500s with a logged
    traceback; three in a row turn /health into a 503 "degraded"; the next call that works
    serves its request and /health is "ok" again."""
    url, service = server
    caplog.set_level(logging.ERROR, logger="jaxrast")
    group = service.scheduler.groups[0]
    execute = group.execute

    def broken(plan):
        raise RuntimeError("injected device failure")

    monkeypatch.setattr(group, "execute", broken)
    for _ in range(3):
        code, answer = send(url, "/v1/completions", completion(max_tokens=5), AUTH)
        assert_openai_error(code, answer, 500, None, "an injected failure")
    tracebacks = [r for r in caplog.records if r.exc_info and "injected device failure" in str(r.exc_info[1])]
    assert len(tracebacks) == 3 and tracebacks[0].name == "jaxrast.rast.scheduler"
    degraded = urllib.request.Request(url + "/health")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(degraded, timeout=30)
    assert err.value.code == 503 and json.loads(err.value.read())["status"] == "degraded"
    monkeypatch.setattr(group, "execute", execute)
    code, answer = send(url, "/v1/completions", completion(max_tokens=5), AUTH)
    # served whole (an unseeded draw may end on the stop id within 5 tokens)
    assert code == 200 and answer["choices"][0]["finish_reason"] in ("length", "stop")
    assert get_json(url + "/health")["status"] == "ok"


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_health_answers_while_the_largest_body_is_refused(server):
    """A body of exactly --max-body-bytes (one prompt) is read, parsed and refused by its byte
    count before tokenizing; /health keeps answering meanwhile. The bound is generous (a busy
    machine); on an idle one both take milliseconds (the bug took 15 s for 5 MB)."""
    url, _ = server
    body = json.dumps({"model": "jaxrast", "max_tokens": 5, "prompt": ""}).encode()
    body = body[:-2] + b"Q" * (MAX_BODY - len(body)) + b'"}'
    assert len(body) == MAX_BODY
    refused: dict = {}

    def largest():
        refused["answer"] = send(url, "/v1/completions", body, AUTH)

    worker = threading.Thread(target=largest)
    worker.start()
    slowest = 0.0
    while worker.is_alive():
        t0 = time.perf_counter()
        assert get_json(url + "/health", timeout=30)["status"] == "ok"
        slowest = max(slowest, time.perf_counter() - t0)
    worker.join()
    assert_openai_error(*refused["answer"], 400, "prompt", "the largest body")
    assert "--max-prompt-bytes" in refused["answer"][1]["error"]["message"]
    assert slowest < 5.0, f"/health took {slowest:.2f} s while a body was refused"


@pytest.fixture(scope="module")
def speculative():
    # requests go one at a time: 2 slots (2 buckets to warm up, not 4)
    service, app = build_service(ServeConfig(**{**SETTINGS, "max_slots": 2}, speculative=3, speculative_mode="on"))
    with running(app) as url:
        yield url, service


def test_a_speculative_server_takes_every_request_the_plain_one_takes(server, speculative):
    plain_url, spec_url = server[0], speculative[0]
    prompt_len = len(server[1].encode(PROBLEM))
    requests = [("/v1/chat/completions", chat(PROBLEM, max_tokens=None, temperature=0))]
    requests += [("/v1/completions", completion(max_tokens=MAX_LEN - prompt_len - k, temperature=0))
                 for k in (0, 1, 2, 3)]  # the last positions of the context: γ = 3 has no room for a round there
    requests += [("/v1/completions", completion(max_tokens=MAX_LEN - prompt_len + 1))]  # beyond: both refuse
    for route, body in requests:
        body = {k: v for k, v in body.items() if v is not None}
        plain, spec = send(plain_url, route, body, AUTH), send(spec_url, route, body, AUTH)
        assert plain[0] == spec[0], (body, plain, spec)
        if plain[0] == 200:  # exact speculative decoding: the same greedy text
            assert spec[1]["choices"] == plain[1]["choices"], body
        else:
            assert spec[1]["error"]["param"] == plain[1]["error"]["param"] == "max_tokens"
    assert wait_until(lambda: get_json(spec_url + "/health")["running"] == 0)


def served(case):
    """The served model's name in a body: past the 404, into tokenizing and the engine's checks."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "jaxrast"
    return case


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(server):
    """Every route of the OpenAPI document, a bounded number of generated requests each (valid
    and invalid by the schema), with the key."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    url = server[0]
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                                              "/metrics", "/v1/rast/grade", "/v1/rast/problems"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode).map(served))
            @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                response = case.call(base_url=url, headers=AUTH, timeout=60)
                case.validate_response(response, checks=checks)

            try:
                fuzz()
            except Unsatisfiable:  # a route without parameters has no invalid request to make
                assert mode == GenerationMode.NEGATIVE and not operation.body and not operation.query
