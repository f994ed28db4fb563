"""What the daemon measures: latency histograms, token and request counters, live gauges, connections.

The engine and the front door feed these as they work; MetricsEndpoint exports them (Prometheus text
format from the same registry). Each daemon has its own registry, so several can live in one process (tests).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from daemon.config import split_host_port

log = logging.getLogger("edgellm.metrics")

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
                                            "Prompt tokens found in a conversation's cache or the prefix cache.",
                                            registry=r)
        self.prefix_cache_hits = Counter("edgellm_prefix_cache_hits",
                                         "Prefix cache look-ups that found at least one block.", registry=r)
        self.prefix_cache_misses = Counter("edgellm_prefix_cache_misses",
                                           "Prefix cache look-ups that found no block.", registry=r)
        self.prefix_cache_evictions = Counter("edgellm_prefix_cache_evictions",
                                              "Prefix cache blocks evicted (least recently used) to make room.",
                                              registry=r)
        self.prefix_cache_tokens = Counter("edgellm_prefix_cache_tokens",
                                           "Prompt tokens whose K/V were copied from the prefix cache.", registry=r)
        self.speculative_passes = Counter("edgellm_speculative_passes",
                                          "Verify passes of drafted tokens (speculative decoding).", registry=r)
        self.speculative_drafted_tokens = Counter("edgellm_speculative_drafted_tokens", "Drafted tokens verified.",
                                                  registry=r)
        self.speculative_accepted_tokens = Counter("edgellm_speculative_accepted_tokens",
                                                   "Drafted tokens the model agreed with (kept).", registry=r)
        self.generated_tokens = Counter("edgellm_generated_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("edgellm_requests", "Requests finished, by priority and finish reason.",
                                ["priority", "reason"], registry=r)
        self.preemptions = Counter("edgellm_preemptions", "Running requests paused for a higher class.", registry=r)
        self.evictions = Counter("edgellm_conversation_evictions", "Idle conversation caches evicted.", registry=r)
        self.request_errors = Counter("edgellm_request_errors", "Requests or calls refused or failed, by gRPC status code.",
                                      ["code"], registry=r)
        self.connections_refused = Counter("edgellm_connections_refused",
                                           "Client connections closed at once: limits.max_connections were open.",
                                           registry=r)

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

    def bind_prefix_cache(self, bytes_used: Callable[[], float], blocks: Callable[[], float]) -> None:
        """The prefix cache's size, read live at scrape time."""
        r = self.registry
        Gauge("edgellm_prefix_cache_bytes", "Host memory held by prefix cache blocks.", registry=r).set_function(bytes_used)
        Gauge("edgellm_prefix_cache_blocks", "Blocks in the prefix cache.", registry=r).set_function(blocks)

    def bind_connections(self, open_connections: Callable[[], float]) -> None:
        """The front door's open client connections, read live at scrape time."""
        Gauge("edgellm_connections_open", "Client connections open (in the TLS handshake or relayed).",
              registry=self.registry).set_function(open_connections)


METRICS_MAX_CONNECTIONS = 16  # scrapers at once; Prometheus needs one
MAX_REQUEST_HEAD = 8 * 1024  # bytes of request line and headers read before a request is refused


class MetricsEndpoint:
    """Serves a registry at http://host:port/metrics on an event loop (the front door's): no thread per client.

    At most METRICS_MAX_CONNECTIONS are open at once; when a new client comes at the bound, the oldest one
    still sending its request is closed, so clients that never finish a request cannot keep a scraper out.
    Each client has `timeout_s` to send its request and again to take the answer. The text is rendered on
    one thread of its own, so relaying on the loop never waits for it.
    """

    def __init__(self, registry: CollectorRegistry, address: str, timeout_s: float = 10.0):
        self.registry = registry
        self.address = address
        self.timeout_s = timeout_s
        self.port = 0  # the bound port, once started
        self._server: asyncio.Server | None = None
        self._open: dict[asyncio.StreamWriter, asyncio.Task] = {}
        self._reading: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()  # oldest first
        self._render = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgellm-metrics")

    async def start(self) -> None:
        host, port = split_host_port(self.address, "service.metrics")
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_HEAD,
                                                      backlog=METRICS_MAX_CONNECTIONS)
        except OSError as e:
            raise OSError(f"service.metrics: cannot listen on {self.address}: {os.strerror(e.errno) if e.errno else e}") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server:
            self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        await asyncio.gather(*self._open.values(), return_exceptions=True)
        self._render.shutdown(wait=False)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= METRICS_MAX_CONNECTIONS:
            if not self._reading:  # all busy taking an answer: the newcomer waits for none of them
                writer.transport.abort()
                return
            oldest, _ = self._reading.popitem(last=False)
            self._open.pop(oldest, None)
            oldest.transport.abort()
        self._open[writer] = asyncio.current_task()
        self._reading[writer] = None
        answered = False
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout_s)
            finally:
                self._reading.pop(writer, None)
            writer.transport.set_write_buffer_limits(high=0)  # drain() returns once the kernel has the whole answer
            writer.write(await self._answer(head))
            await asyncio.wait_for(writer.drain(), self.timeout_s)
            answered = True
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as e:
            log.debug("metrics client closed: %r", e)
        finally:
            self._open.pop(writer, None)
            if answered:
                writer.close()
            else:
                writer.transport.abort()

    async def _answer(self, head: bytes) -> bytes:
        method, path = (head.split(b"\r\n", 1)[0].split(b" ") + [b"", b""])[:2]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET\n", "text/plain", allow="GET, HEAD")
        if path.split(b"?", 1)[0] not in (b"/metrics", b"/"):
            return _response(404, b"not found: the metrics are at /metrics\n", "text/plain")
        body = await asyncio.get_running_loop().run_in_executor(self._render, generate_latest, self.registry)
        return _response(200, body if method == b"GET" else b"", CONTENT_TYPE_PLAIN_0_0_4, length=len(body))


def _response(status: int, body: bytes, content_type: str, length: int | None = None, allow: str | None = None) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}",
            f"Content-Length: {len(body) if length is None else length}", "Connection: close"]
    if allow:
        head.append(f"Allow: {allow}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
