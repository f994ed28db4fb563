"""The gRPC server: InferenceService turns API messages into engine `Sequence`s and engine events into stream messages.

Handlers run on the asyncio loop and never block it: request preparation (daemon/request_prep.py) tokenizes in a
small thread pool, generation runs on the engine thread. Per-request problems become a gRPC status (Generate) or a
RequestError message for that request id (Session, daemon/session_stream.py); whatever fails while one request is
handled ends that request with a message naming what failed, never the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any, AsyncIterator, Callable

import grpc

from bundle_format.bundle import Bundle
from daemon.access import Connections, Peer
from daemon.config import GenerationConfig, LimitsConfig, StructuredConfig
from daemon.conversation import Conversation
from daemon.request_log import ThrottledLog, log_request
from daemon.request import Failure, Malformed, Request
from daemon.request_prep import RequestPreparer, RequestRejected, internal
from daemon.engine import Engine
from daemon.prefix_cache import MAX_SALT_CHARS, request_scope
from daemon.sequence import FinishEvent, QueueFullError, Sequence, TokenEvent
from daemon.session_stream import SessionStream
from daemon.tokenizer import Tokenizer
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc

log = logging.getLogger("edgellm.server")

SERVICE_NAME = "edgellm.v1.Inference"
STATUS_CODES = {c.value[0]: c for c in grpc.StatusCode}  # RequestError.code -> the status Generate ends with



def lenient_parser(cls: type) -> Callable[[bytes], Any]:
    """A request deserializer that never raises (gRPC would answer UNKNOWN and log a traceback): Malformed instead."""
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as e:  # DecodeError, or anything else protobuf raises on bad bytes
            return Malformed(cls.DESCRIPTOR.full_name, str(e) or type(e).__name__)
    return parse


def add_inference_service(service: "InferenceService", server: grpc.aio.Server) -> None:
    """Register the service as the generated add_InferenceServicer_to_server does, with lenient_parser deserializers."""
    handlers = {
        "Session": grpc.stream_stream_rpc_method_handler(service.Session, lenient_parser(pb.SessionRequest),
                                                         pb.SessionResponse.SerializeToString),
        "Generate": grpc.unary_stream_rpc_method_handler(service.Generate, lenient_parser(pb.GenerateRequest),
                                                         pb.GenerateResponse.SerializeToString),
        "Tokenize": grpc.unary_unary_rpc_method_handler(service.Tokenize, lenient_parser(pb.TokenizeRequest),
                                                        pb.TokenizeResponse.SerializeToString),
        "GetModel": grpc.unary_unary_rpc_method_handler(service.GetModel, lenient_parser(pb.GetModelRequest),
                                                        pb.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def shutting_down() -> RequestRejected:
    return RequestRejected(grpc.StatusCode.UNAVAILABLE,
                           "the server is shutting down and takes no new requests; retry on another instance")


class InferenceService(pb_grpc.InferenceServicer):
    """The Inference RPCs, and every request's path into the engine and its events back out to its RPC."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, bundle: Bundle, generation: GenerationConfig,
                 model_info: pb.ModelInfo, limits: LimitsConfig | None = None, connections: Connections | None = None,
                 stream_interval_ms: int = 0, structured: StructuredConfig | None = None):
        """model_info: what GetModel reports but the default stream interval, `stream_interval_ms` (resolved)."""
        self.engine = engine
        self.generation = generation
        self.model_info = pb.ModelInfo()  # what GetModel answers, built once: the bundle's and the defaults in force
        self.model_info.CopyFrom(model_info)
        self.model_info.stream_interval_ms = stream_interval_ms
        self.limits = limits or LimitsConfig()
        self.connections = connections or Connections()
        self.preparer = RequestPreparer(tokenizer, engine.context_length, generation, self.limits,
                                        bundle.path / "tokenizer.json", stream_interval_ms, structured)
        self.draining = False  # set on SIGTERM: new requests are refused with UNAVAILABLE
        self.prefix_scope = "shared"  # prefix_cache.scope: whose cached prompts a request may reuse (with a cache)
        self.live: set[Sequence] = set()  # submitted and not finished (event loop only)
        self.all_done = asyncio.Event()  # set while `live` is empty
        self.all_done.set()
        self._generate_ids = itertools.count(1)
        self._malformed_log = ThrottledLog(log)

    async def start(self, request: Request, req: pb.GenerateRequest, call_time_left: float | None,
                    conversation: Conversation | None = None) -> None:
        """Prepare and submit one request; raises RequestRejected (INTERNAL for a failure of the server's own)."""
        if self.draining:  # early, to spare the tokenizer pool; _submit checks again, after the await below
            raise shutting_down()
        if len(req.cache_salt) > MAX_SALT_CHARS:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"cache_salt has {len(req.cache_salt)} characters; at most {MAX_SALT_CHARS}")
        try:
            seq = await self.preparer.sequence(req, call_time_left, conversation)
            if self.engine.prefix_cache is not None:
                seq.cache_scope = request_scope(self.prefix_scope, request.peer, req.cache_salt)
            self._submit(request, seq)
        except RequestRejected:
            raise
        except Exception as e:
            raise internal("starting the request", e) from e

    # ---- the engine's events ----------------------------------------------------------------------
    def _submit(self, request: Request, seq: Sequence) -> None:
        """Queue seq in the engine, its events going to request.out. Nothing after engine.submit can fail,
        so a request is either in the engine and counted, or neither."""
        if self.draining:
            raise shutting_down()
        peer = request.peer
        if peer.live >= self.limits.max_requests_per_connection:
            raise RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, f"this connection already has {peer.live} requests running or queued (limits.max_requests_per_connection)", 1.0)
        seq.sink = self._sink(request)
        try:
            self.engine.submit(seq)
        except QueueFullError as e:
            raise RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry in {e.retry_after_s:.1f}s",
                                  e.retry_after_s) from None
        except Exception as e:
            raise internal("queueing the request in the engine", e) from e
        request.seq = seq
        peer.live += 1
        self.live.add(seq)
        self.all_done.clear()

    def _sink(self, request: Request) -> Callable[[TokenEvent | FinishEvent], None]:
        def sink(ev: TokenEvent | FinishEvent) -> None:
            # Called with other requests' events in one batch (Engine._deliver): it must never raise.
            try:
                if isinstance(ev, FinishEvent):
                    self._settle(request)  # first: the live counts never wait on anything that can fail
                if not request.failed:
                    self._hand_off(request, ev)
                if isinstance(ev, FinishEvent):
                    self._log_finished(request, ev)
            except Exception as e:
                self.fail(request, "handing the engine's output to the stream", e)
        return sink

    def _hand_off(self, request: Request, ev: TokenEvent | FinishEvent) -> None:
        """Queue an event for the RPC. A client that reads too slowly lets its undelivered chunks pile up
        here, never in the engine: past the bound its requests are cancelled with a message saying so."""
        request.out.put_nowait((request, ev))
        limit = self.generation.max_buffered_chunks
        if isinstance(ev, TokenEvent) and request.out.qsize() > limit and not request.seq.cancel_requested:
            self.engine.cancel(request.seq, f"the client did not read its stream: {limit} chunks were waiting")

    def _settle(self, request: Request) -> None:
        """The engine is done with the request: off the live counts."""
        if request.settled:
            return
        request.settled = True
        request.peer.live -= 1
        self.live.discard(request.seq)
        if not self.live:
            self.all_done.set()

    def _log_finished(self, request: Request, ev: FinishEvent) -> None:
        log_request(id=request.id, **request.peer.log_fields(), priority=request.seq.priority.name.lower(),
                    prompt_tokens=ev.prompt_tokens, cached_tokens=ev.cached_prompt_tokens,
                    completion_tokens=ev.completion_tokens, queue_ms=round(ev.queue_s * 1e3, 1),
                    ttft_ms=round(ev.ttft_s * 1e3, 1), duration_ms=round(ev.total_s * 1e3, 1),
                    reason=ev.reason.value, **({"message": ev.message} if ev.message else {}))

    def fail(self, request: Request, what: str, e: Exception) -> None:
        """End a running request whose handling failed: the client is told at once, the engine cancels it."""
        if request.failed or request.ended:
            return
        request.failed = True
        log.error("request %s: %s failed", request.id, what, exc_info=e)
        message = f"{what} failed: {type(e).__name__}: {e}"
        self.engine.metrics.request_errors.labels(grpc.StatusCode.INTERNAL.name).inc()
        if request.seq is not None:
            self.engine.cancel(request.seq, message)
        request.out.put_nowait((request, Failure(message)))

    def record_refused(self, rid: str, peer: Peer, code: grpc.StatusCode, message: str) -> None:
        """Count and log a request (or message) that ended before the engine saw it."""
        self.engine.metrics.request_errors.labels(code.name).inc()
        log_request(id=rid, **peer.log_fields(), reason="refused", code=code.name, message=message)

    def report_malformed(self, m: Malformed, peer: Peer) -> str:
        self.engine.metrics.request_errors.labels(grpc.StatusCode.INVALID_ARGUMENT.name).inc()
        self._malformed_log.warning(f"{m.describe()} (from {peer.describe()})")
        return m.describe()

    # ---- RPCs ---------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        peer = self.connections.of(context)
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.report_malformed(request, peer))
        r = Request(f"generate-{next(self._generate_ids)}", peer, asyncio.Queue())
        try:
            await self.start(r, request, context.time_remaining())
        except RequestRejected as e:
            self.record_refused(r.id, peer, e.code, e.message)
            if e.retry_after_s is not None:
                context.set_trailing_metadata((("retry-after-ms", str(int(e.retry_after_s * 1000))),))
            await context.abort(e.code, e.message)
        try:
            while not r.ended:
                _, ev = await r.out.get()
                try:
                    kind, body = r.response(ev)
                except Exception as e:
                    self.fail(r, "building the response", e)
                    continue
                if kind == "error":
                    await context.abort(STATUS_CODES[body.code], body.message)
                yield pb.GenerateResponse(**{kind: body})
        finally:
            if not r.ended:  # the client went away or the call was cancelled
                self.engine.cancel(r.seq)

    async def Session(self, request_iterator: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SessionResponse]:
        # aclosing: when gRPC closes this generator, the stream's requests and conversations end at once.
        async with contextlib.aclosing(SessionStream(self, context).responses(request_iterator)) as responses:
            async for response in responses:
                yield response

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        peer = self.connections.of(context)
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.report_malformed(request, peer))
        try:
            ids = await self.preparer.tokenize(request.text)
        except RequestRejected as e:
            self.record_refused("tokenize", peer, e.code, e.message)
            await context.abort(e.code, e.message)
        return pb.TokenizeResponse(ids=ids)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.report_malformed(request, self.connections.of(context)))
        return self.model_info

