"""Prometheus metrics of the server (`GET /metrics`, the text format every Prometheus scraper reads), after vLLM's
(its names under our prefix): requests by model and finish reason, prompt and generated tokens, time to first token and
end-to-end latency per model, prefix-cache hits, running and waiting requests, prefix-cache size, Aligners loaded.
Through `prometheus_client`, in a registry of the server's own (several servers in one process do not share
counters)."""

import time
from typing import Callable, Dict

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lit_aligner.serving.engine import Event, Request

# Seconds; from a fast GPU (tens of ms) to a busy CPU (tens of s).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Metrics:
    """Counts what the server answered. `observe(req, model)` returns the callback that sees each of the request's
    events (the first one times the first token; the last one counts the request and its tokens)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, load: Callable[[], Dict[str, int]], aligners_loaded: Callable[[], int]):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lit_aligner_requests", "Finished requests (each choice), by model and finish reason.",
                                ["model", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("lit_aligner_prompt_tokens", "Prompt tokens prefilled.", ["model"], registry=r)
        self.generation_tokens = Counter("lit_aligner_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.prefix_cache_hits = Counter("lit_aligner_prefix_cache_hits", "Prompt tokens whose keys and values came "
                                         "from the prefix cache (of lit_aligner_prompt_tokens).", ["model"], registry=r)
        self.ttft = Histogram("lit_aligner_time_to_first_token_seconds", "From arrival to the first text sent.",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("lit_aligner_e2e_request_latency_seconds", "From arrival to the last token.",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        Gauge("lit_aligner_num_requests_running", "Requests in the decode batch.",
              registry=r).set_function(lambda: load()["active"])
        Gauge("lit_aligner_num_requests_waiting", "Requests queued for a row.",
              registry=r).set_function(lambda: load()["waiting"])
        Gauge("lit_aligner_prefix_cache_tokens", "Prompt tokens held in the prefix cache.",
              registry=r).set_function(lambda: load()["prefix_cache_tokens"])
        Gauge("lit_aligner_aligners_loaded", "Aligners held in memory (the LRU cache).",
              registry=r).set_function(aligners_loaded)

    def observe(self, req: Request, model: str) -> Callable[[Event], None]:
        first = [True]

        def see(ev: Event) -> None:
            now = time.monotonic()
            if first[0] and (ev.text or ev.finish is not None):
                first[0] = False
                self.ttft.labels(model).observe(now - req.arrival)
            if ev.finish is not None:
                self.requests.labels(model, ev.finish).inc()
                if ev.finish != "error":
                    self.prompt_tokens.labels(model).inc(ev.prompt_tokens)
                    self.generation_tokens.labels(model).inc(ev.completion_tokens)
                    self.prefix_cache_hits.labels(model).inc(ev.cached_tokens)
                    self.latency.labels(model).observe(now - req.arrival)

        return see

    def render(self) -> bytes:
        return generate_latest(self.registry)
