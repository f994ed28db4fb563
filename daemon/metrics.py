"""What the engine measures: latency histograms, token and request counters, live gauges.

The engine feeds these as it works; the operations layer exports them (Prometheus text format from
the same registry). Each daemon has its own registry, so several can live in one process (tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from daemon.config import split_host_port

# Seconds: from a millisecond (a decode step of a small model) to minutes (a long queue).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
TOKENS_PER_STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class ClassMetrics:
    queue_time: Histogram
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    request_duration: Histogram


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        by_class = ["priority"]
        self.queue_time = Histogram("edgellm_queue_time_seconds", "Time from arrival to the start of prefill.",
                                    by_class, buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("edgellm_time_to_first_token_seconds",
                                             "Time from arrival to the first generated token.", by_class,
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("edgellm_inter_token_latency_seconds",
                                             "Time between consecutive tokens of one request.", by_class,
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.request_duration = Histogram("edgellm_request_duration_seconds", "Time from arrival to the end.",
                                          by_class, buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_step = Histogram("edgellm_tokens_per_step", "Tokens computed by one engine step.",
                                         buckets=TOKENS_PER_STEP_BUCKETS, registry=r)
        self.prompt_tokens = Counter("edgellm_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.cached_prompt_tokens = Counter("edgellm_cached_prompt_tokens",
                                            "Prompt tokens found in a conversation's cache.", registry=r)
        self.generated_tokens = Counter("edgellm_generated_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("edgellm_requests", "Requests finished, by priority and finish reason.",
                                ["priority", "reason"], registry=r)
        self.preemptions = Counter("edgellm_preemptions", "Running requests paused for a higher class.", registry=r)
        self.evictions = Counter("edgellm_conversation_evictions", "Idle conversation caches evicted.", registry=r)
        self.request_errors = Counter("edgellm_request_errors", "Requests or calls refused or failed, by gRPC status code.",
                                      ["code"], registry=r)

    def for_class(self, priority: str) -> "ClassMetrics":
        """The histogram children of one priority class, looked up once: some are observed on every token."""
        return ClassMetrics(self.queue_time.labels(priority), self.time_to_first_token.labels(priority),
                            self.inter_token_latency.labels(priority), self.request_duration.labels(priority))

    def bind_gauges(self, queue_length: Callable[[], float], slots_in_use: Callable[[], float],
                    kv_cache_tokens: Callable[[], float]) -> None:
        """Gauges read live at scrape time from the engine."""
        r = self.registry
        Gauge("edgellm_queue_length", "Requests waiting for a slot.", registry=r).set_function(queue_length)
        Gauge("edgellm_slots_in_use", "Slots held by running requests or idle conversations.",
              registry=r).set_function(slots_in_use)
        Gauge("edgellm_kv_cache_tokens", "Token positions of the KV cache in use.", registry=r).set_function(kv_cache_tokens)


def serve_metrics(registry: CollectorRegistry, address: str):
    """Serve `registry` in the Prometheus text format at http://address/metrics on a thread of its own.

    Returns the HTTP server (`.server_port` is the bound port; `.shutdown()` stops it)."""
    from prometheus_client import start_http_server

    host, port = split_host_port(address, "service.metrics")
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
