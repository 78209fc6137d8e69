"""The playground page of `jaxrast serve` (`GET /`): base and RAST side by side, the shift
shown token by token, and the few RAST endpoints the page needs beside OpenAI's.

The page itself (`/` and `/static/...`: HTML, CSS and JavaScript shipped in the package, no
CDN) loads without the API key; every `/v1/rast/...` route below takes the server's key like
the rest of /v1 (`guard.Guard` checks it before the body is read), and the page asks for it
when the server answers 401. The streams come from `POST /v1/completions` (`mode: "base"`,
and `mode: "rast"` with `shift: true`).

    GET  /v1/rast/info                       model, context, slots, pairs and their default λ,
                                             problem sources, prompt templates
    GET  /v1/rast/problems?source=S          the problems of a source: [{id, label}]
    GET  /v1/rast/problem?source=S&id=I      one problem: {id, question, answer}
    POST /v1/rast/grade                      {completions, source + id (or gold)} -> verdicts,
                                             by the eval grader in its worker pool
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
import re
import threading
from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from jaxrast.serve.protocol import ERRORS, Text, Texts
from jaxrast.serve.service import BadRequest, Service

TOY = "toy"  # the toy chain task's held-out problems (the demo's data seed)
TOY_PROBLEMS = 100
MAX_COMPLETIONS = 8  # per grade request (the page sends two)
# Everything the page loads comes from this server; nothing else may be fetched or run.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
STATIC = {"playground.js": "text/javascript; charset=utf-8", "shift.js": "text/javascript; charset=utf-8",
          "playground.css": "text/css; charset=utf-8"}


class GradeRequest(BaseModel):
    completions: list[Text] = Field(min_length=1, max_length=MAX_COMPLETIONS, fail_fast=True)
    source: Text | None = None  # "toy" or a shipped benchmark, with `id`
    id: Text | None = None
    gold: Text | Texts | None = Field(None, max_length=MAX_COMPLETIONS)  # or the gold answer itself

    model_config = ConfigDict(extra="ignore")


def _static(name: str) -> str:
    return resources.files("jaxrast.serve").joinpath("static", name).read_text("utf-8")


def sources() -> list[dict]:
    from jaxrast.data.rows import BENCHMARKS

    toy = {"name": TOY, "label": f"toy chain task ({TOY_PROBLEMS} held-out problems)"}
    return [toy, *({"name": name, "label": spec.description} for name, spec in BENCHMARKS.items())]


def canonical_source(source: str) -> str:
    """The one name of a problem source however it is spelled (the cache's key), or a 404."""
    from jaxrast.data.rows import canonical_name

    if source.lower() == TOY:
        return TOY
    try:
        return canonical_name(source)
    except ValueError:
        names = ", ".join(s["name"] for s in sources())
        raise HTTPException(404, f"unknown problem source {source!r}; choose one of {names}") from None


def problems(source: str) -> tuple[dict, ...]:
    """The normalised rows (id, question, answer) of a problem source."""
    return _problems(canonical_source(source))


@functools.lru_cache(maxsize=32)  # keyed by canonical names only: a client cannot grow it
def _problems(source: str) -> tuple[dict, ...]:
    from jaxrast.data.rows import load_benchmark

    if source == TOY:
        from jaxrast.toy.demo import HELD_OUT_SEED
        from jaxrast.toy.task import ChainTask

        rows = ChainTask().rows(TOY_PROBLEMS, HELD_OUT_SEED, id_prefix="heldout")
    else:
        rows = load_benchmark(source)
    return tuple({"id": str(r["id"]), "question": r["question"], "answer": r["answer"]} for r in rows)


def problem(source: str, pid: str) -> dict:
    for row in problems(source):
        if row["id"] == pid:
            return row
    raise HTTPException(404, f"{source} has no problem with id {pid!r}")


def last_number_fallback(source: str | None) -> bool:
    """As `jaxrast eval` grades: per shipped benchmark, else (toy, a custom gold) on."""
    from jaxrast.data.rows import benchmark_spec, is_benchmark

    return benchmark_spec(source).last_number_fallback if source and is_benchmark(source) else True


_POOL = None
_POOL_LOCK = threading.Lock()


def grader_pool():
    """The eval grader's worker pool for the page: two processes (a request grades the two
    columns), started on first use, closed at exit; not one per core as `shared_pool` is."""
    global _POOL
    from jaxrast.eval.pool import GraderPool

    with _POOL_LOCK:
        if _POOL is None:
            _POOL = GraderPool(min(2, os.cpu_count() or 1))
            atexit.register(_POOL.close)
    return _POOL


def grade(body: GradeRequest, pool=None) -> dict:
    """Verdicts of the completions against the problem's gold (or the given gold)."""
    if body.gold is not None:
        gold, source = body.gold, None
    elif body.source and body.id is not None:
        gold, source = problem(body.source, body.id)["answer"], body.source
    else:
        raise BadRequest("give the problem (source and id) or its gold answer", "gold")
    verdicts = (pool or grader_pool()).grade_many(body.completions, [gold] * len(body.completions),
                                                  last_number_fallback=last_number_fallback(source))
    return {"gold": gold, "verdicts": [{"correct": v.correct, "extracted": v.answer, "method": v.method,
                                        "status": v.status} for v in verdicts]}


def _label(question: str, width: int = 80) -> str:
    text = re.sub(r"\s+", " ", question).strip()
    return text if len(text) <= width else text[:width - 1] + "…"


def router(service: Service, pool=None) -> APIRouter:
    """The page (no key) and its /v1/rast routes (the app's guard asks them for the key)."""
    from jaxrast.data.prompts import TEMPLATES

    r = APIRouter()
    page = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

    @r.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(_static("index.html"), headers=page)

    @r.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(_static(name), media_type=STATIC[name], headers=page)

    v1 = APIRouter(prefix="/v1/rast", responses=ERRORS)

    @v1.get("/info")
    async def info():
        return {"model": service.model_name, "max_len": service.max_len, "slots": service.slots,
                "pairs": [{"index": i, "lam": float(p.lam)} for i, p in enumerate(service.pairs)],
                "sources": sources(), "templates": {"none": "{question}", **TEMPLATES}}

    @v1.get("/problems")
    async def listing(source: Text):
        rows = await asyncio.to_thread(problems, source)
        return {"source": source, "problems": [{"id": p["id"], "label": _label(p["question"])} for p in rows]}

    @v1.get("/problem")
    async def one(source: Text, id: Text):
        return await asyncio.to_thread(problem, source, id)

    @v1.post("/grade")
    async def graded(body: GradeRequest):
        return await asyncio.to_thread(grade, body, pool)

    r.include_router(v1)
    return r
