"""/metrics in the Prometheus text format (prometheus_client, one registry per server):
waiting and running requests, slot occupancy, KV pages and preemptions, generated tokens, time to first token and
per-token latency histograms, finished requests by reason, server errors."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

# latency buckets (seconds): a toy token takes ~1 ms on CPU, a 32B one ~30 ms on a TPU slice
_TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, service: Any):  # a jaxrast.serve.service.Service
        self.registry = r = CollectorRegistry()
        sched = service.scheduler
        Info("jaxrast_attention", "The engine's attention backend", registry=r).info({"backend": sched.attention})
        Gauge("jaxrast_requests_waiting", "Requests queued for a slot", registry=r).set_function(
            lambda: len(sched.queue))
        Gauge("jaxrast_requests_running", "Requests decoding in a slot", registry=r).set_function(lambda: sched.running)
        Gauge("jaxrast_slots", "Engine slots", registry=r).set_function(lambda: sched.slots)
        Gauge("jaxrast_slot_occupancy", "Share of slots decoding (now)", registry=r).set_function(
            lambda: sched.running / max(sched.slots, 1))
        Gauge("jaxrast_slot_occupancy_mean", "Share of slot-steps that produced a token since start",
              registry=r).set_function(lambda: sched.stats.occupancy)
        Gauge("jaxrast_kv_pages", "KV pages in the engines' pools (each page: page_size positions of every model)",
              registry=r).set_function(lambda: sched.stats.pages_total)
        Gauge("jaxrast_kv_pages_used", "KV pages held by running rows (now)", registry=r).set_function(
            lambda: sched.stats.pages_used)
        Gauge("jaxrast_kv_pages_peak", "The most KV pages held at once since start", registry=r).set_function(
            lambda: sched.stats.peak_pages)
        Gauge("jaxrast_preemptions", "Rows that gave their KV pages back to run again later, since start",
              registry=r).set_function(lambda: sched.stats.preemptions)
        Gauge("jaxrast_prompt_prefills_shared", "Rows admitted on another sample's prompt pages (no prefill of their "
              "own), since start", registry=r).set_function(lambda: sched.stats.shared)
        Gauge("jaxrast_decode_calls", "Engine decode calls since start", registry=r).set_function(
            lambda: sched.stats.calls)
        Gauge("jaxrast_speculative_acceptance", "Share of drafted tokens accepted (speculative rounds)",
              registry=r).set_function(lambda: sched.stats.acceptance or 0.0)
        Gauge("jaxrast_speculative_tokens_per_round", "Tokens a slot gains per speculative round",
              registry=r).set_function(lambda: sched.stats.accepted_length or 0.0)
        self.tokens = Counter("jaxrast_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("jaxrast_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.requests = Counter("jaxrast_requests", "Choices submitted (n per request)", registry=r)
        self.finished_by = Counter("jaxrast_requests_finished", "Choices finished", ["finish_reason"], registry=r)
        self.errors = Counter("jaxrast_request_errors", "Requests answered with a server error (the engine failed "
                              "them, or the server did)", registry=r)
        self.ttft = Histogram("jaxrast_time_to_first_token_seconds", "Time from submission to the first token",
                              buckets=_TTFT, registry=r)
        self.tpot = Histogram("jaxrast_time_per_output_token_seconds", "Time per token after the first",
                              buckets=_TPOT, registry=r)
        self.e2e = Histogram("jaxrast_request_latency_seconds", "Time from submission to the last token",
                             buckets=_TTFT, registry=r)

    def finished(self, choice: Any) -> None:  # a finished jaxrast.serve.service.Choice
        import time

        req = choice.request
        now = time.perf_counter()
        n = len(req.token_ids)
        self.tokens.inc(n)
        self.prompt_tokens.inc(len(req.prompt_ids))
        reason = req.finish_reason or "cancelled"  # unfinished: its client went away
        self.finished_by.labels(reason).inc()
        if reason == "error":
            self.errors.inc()
        self.e2e.observe(now - req.submitted)
        if choice.first_token_at is not None and n > 1:
            self.tpot.observe((now - choice.first_token_at) / (n - 1))

    def text(self) -> bytes:
        return generate_latest(self.registry)
