"""Builds and runs a server: load the models once, compile every program (one warm-up
request), then serve on uvicorn until SIGTERM / Ctrl-C."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import sys
import threading

from jaxrast.serve.config import ServeConfig


def build_service(cfg: ServeConfig):
    """(service, app) for `cfg`: models loaded, programs warmed up."""
    from jaxrast.models.table import ModelTable
    from jaxrast.rast.capacity import plan_slots
    from jaxrast.rast.engine_spec import EngineSpec, default_prefill_chunk
    from jaxrast.rast.ensemble import Pair
    from jaxrast.rast.scheduler import row_split
    from jaxrast.runtime.distributed import on_every_process, process_count
    from jaxrast.runtime.mesh import parse_mesh
    from jaxrast.serve.app import create_app
    from jaxrast.serve.guard import Limits
    from jaxrast.serve.service import Service

    if not cfg.base:
        raise ValueError("jaxrast serve needs --base (and usually --pair RL REF LAM).")
    # several processes without a mesh would each serve on one device: use them all
    mesh = parse_mesh(cfg.mesh or ("1,-1,1" if process_count() > 1 else None))
    load = ModelTable(dtype=cfg.dtype, mesh=mesh, allow_pickle=cfg.allow_pickle)
    base, pairs = on_every_process(lambda: (load(cfg.base), [Pair(load(rl), load(ref), float(lam))
                                                              for rl, ref, lam in cfg.pairs]), "loading the models")
    if load.tokenizer is None:
        raise ValueError(f"{cfg.base} has no tokenizer files; serving text needs one.")
    template = None
    if cfg.chat_template:
        if not os.path.isfile(cfg.chat_template):
            raise FileNotFoundError(f"chat template {cfg.chat_template} does not exist.")
        template = open(cfg.chat_template, encoding="utf-8").read()
    context = min(m.cfg.max_position_embeddings for m in [base, *(m for p in pairs for m in (p.rl, p.ref))])
    max_len = cfg.max_len or min(context, 4096)
    # γ positions beyond the context: a speculative round writes them past a row's budget, so
    # the speculative server takes every request the plain one does
    capacity = plan_slots([base, *(m for p in pairs for m in (p.rl, p.ref))], max_len + cfg.speculative,
                          slots=cfg.max_slots, kv_memory=cfg.kv_memory, page_size=cfg.page_size,
                          devices=1 if mesh is None else mesh.devices.size, multiple=row_split(mesh))
    spec = EngineSpec(max_slots=capacity.slots, max_len=max_len + cfg.speculative, steps=cfg.steps_per_call,
                      prefill_batch=min(8, capacity.slots), prefill_chunk=default_prefill_chunk(),
                      gamma=cfg.speculative, page_size=cfg.page_size, pages=capacity.pages)
    service = Service(base, pairs, spec=spec, tokenizer=load.tokenizer, mesh=mesh,
                      speculative_mode=cfg.speculative_mode, max_waiting=cfg.max_waiting,
                      model_name=cfg.served_model_name, chat_template=template, top_logprobs=cfg.top_logprobs,
                      max_prompt_bytes=cfg.max_prompt_bytes, prepare_timeout_s=cfg.prepare_timeout)
    print(f"jaxrast serve: {capacity.describe()}, slots of {max_len} positions, attention backend "
          f"{service.scheduler.attention}", file=sys.stderr, flush=True)
    warm_up(service)
    return service, create_app(service, api_key=cfg.api_key, grace_s=cfg.grace, limits=Limits.of(cfg))


def warm_up(service) -> None:
    """One request through the admit and decode programs: every prompt length runs the same
    admit program, so nothing compiles once serving."""
    from jaxrast.rast.requests import Request, RequestParams

    for group in service.scheduler.groups:  # every slot-count bucket, before the first request
        group.warm_up(service.scheduler.record)
    for _ in service.scheduler.run([Request([3, 3], RequestParams(max_tokens=2))], service.scheduler.record):
        pass


def check_exposure(cfg: ServeConfig) -> None:
    """Refuses to expose a server without a key to the network, unless told to (--insecure)."""
    if cfg.api_key or is_loopback(cfg.host):
        return
    if not cfg.insecure:
        raise ValueError(f"--host {cfg.host} exposes the server to the network without an API key: set "
                         "$JAXRAST_API_KEY or --api-key-file FILE, or pass --insecure to serve it open.")
    print(f"jaxrast serve: WARNING: serving {cfg.host} without an API key (--insecure): anyone who can reach it "
          "can use it", file=sys.stderr, flush=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only localhost is known to stay on this machine
        return False


def serve(cfg: ServeConfig) -> int:
    import uvicorn

    from jaxrast.runtime.distributed import is_main

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """SIGTERM / Ctrl-C drain the server and end the command with exit 0 (uvicorn's own
            handling re-raises the signal once drained, so the process would die of it)."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    check_exposure(cfg)
    service, app = build_service(cfg)
    if not is_main():  # a multi-process server: process 0 takes the HTTP requests, the others follow its plans
        service.scheduler.follow()
        return 0
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                            timeout_graceful_shutdown=int(cfg.grace) + 1, limit_concurrency=cfg.max_connections,
                            timeout_keep_alive=5)  # an idle keep-alive connection closes after 5 s
    server = Server(config)
    print(f"jaxrast serve: {cfg.served_model_name} ({cfg.base} + {len(cfg.pairs)} pair(s)), {service.slots} slots of "
          f"{service.max_len} positions, on http://{cfg.host}:{cfg.port}", file=sys.stderr, flush=True)
    server.run()
    return 0
