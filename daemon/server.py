"""The gRPC server: turns API messages into engine `Sequence`s and engine events into stream messages.

Handlers run on the asyncio loop and never block it: tokenization and chat rendering go to a small
thread pool (text prompts bounded in bytes first), generation to the engine thread. Per-request problems
become a gRPC status (Generate) or a RequestError message for that request id (Session); a Session
message the server does not act on gets a `refused` message; the stream itself goes on. Whatever fails
while one request is handled ends that request with a message naming what failed, never the stream.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf.duration_pb2 import Duration

from bundle_format.bundle import Bundle
from daemon.access import Connections, Peer
from daemon.config import MAX_STREAM_INTERVAL_MS, GenerationConfig, LimitsConfig
from daemon.request_log import log_request
from daemon.sampling import SamplingParams
from daemon.scheduler import (Conversation, Engine, FinishEvent, FinishReason, Priority, QueueFullError, Sequence,
                              TokenEvent)
from daemon.tokenizer import Tokenizer
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc

log = logging.getLogger("edgellm.server")

SERVICE_NAME = "edgellm.v1.Inference"
MAX_REQUEST_ID_BYTES = 128
# protobuf's Duration range, +-10,000 years.
MAX_DURATION_SECONDS = 315_576_000_000
# Normalizers (NFC, NFKC) can merge up to 4 bytes of input into one byte ("\U0001d400" -> "A" under NFKC).
NORMALIZER_SLACK = 4
_STATUS_CODES = {c.value[0]: c for c in grpc.StatusCode}  # RequestError.code -> the status Generate ends with
_PRIORITIES = {pb.PRIORITY_UNSPECIFIED: Priority.NORMAL, pb.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
               pb.PRIORITY_NORMAL: Priority.NORMAL, pb.PRIORITY_BACKGROUND: Priority.BACKGROUND}
_FINISH_REASONS = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
                   FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED, FinishReason.DEADLINE: pb.FINISH_REASON_DEADLINE,
                   FinishReason.ERROR: pb.FINISH_REASON_ERROR}


@dataclass
class RequestRejected(Exception):
    """A request refused before it reached the engine."""

    code: grpc.StatusCode
    message: str
    retry_after_s: float | None = None


@dataclass
class ConversationState:
    """What the server keeps of a conversation: the engine's cache handle plus the history to render."""

    conversation: Conversation
    kind: str | None = None  # "chat" or "raw" (text / token ids), fixed by the first turn
    messages: list[tuple[str, str]] | None = None  # chat: every message so far, replies included
    history_ids: list[int] | None = None  # raw: every token so far, prompt and output
    running: str | None = None  # the request id of the turn in progress


@dataclass
class Failure:
    """An event of a running request: the server failed handling it (the request ends with `message`)."""

    message: str


@dataclass(eq=False)
class Request:
    """One request from its start until the client has been told how it ended."""

    id: str
    peer: Peer
    out: asyncio.Queue  # the RPC's queue: (Request, TokenEvent | FinishEvent | Failure) pairs
    seq: Sequence | None = None  # set once the engine has it
    conversation: ConversationState | None = None
    reply_text: list[str] = field(default_factory=list)  # conversation turns: what was streamed
    reply_ids: list[int] = field(default_factory=list)
    earlier_messages: list[tuple[str, str]] | None = None  # a chat turn: the conversation's messages before it
    streamed: bool = False  # tokens went out: a failure now ends it with FINISH_REASON_ERROR, not an error status
    failed: bool = False  # a Failure is on its way to the client; later events only settle the engine's side
    ended: bool = False  # the client has its last message (or is about to)
    settled: bool = False  # the engine is done with it and it is off the live counts


@dataclass
class Malformed:
    """A request message that did not parse, handed to the handler in place of the message."""

    type_name: str
    error: str

    def describe(self) -> str:
        return f"malformed {self.type_name}: {self.error}"


@dataclass
class StreamFailure:
    """The Session stream itself fails with this status."""

    code: grpc.StatusCode
    message: str


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


class ThrottledLog:
    """At most one warning per `every_s` seconds, counting the ones left out: clients cannot flood the log."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0):
        self.logger, self.every_s = logger, every_s
        self._next = 0.0
        self._left_out = 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._left_out += 1
            return
        if self._left_out:
            message += f" ({self._left_out} more like it since the last such line)"
        self._next, self._left_out = now + self.every_s, 0
        self.logger.warning(message)


def internal(what: str, e: BaseException) -> RequestRejected:
    """A failure of the server's own while starting a request, logged, as the INTERNAL status the client gets."""
    log.error("%s failed", what, exc_info=e)
    return RequestRejected(grpc.StatusCode.INTERNAL, f"{what} failed: {type(e).__name__}: {e}")


def utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def prompt_byte_limit(tokenizer: Tokenizer, max_tokens: int, normalizes: bool) -> int:
    """Bytes beyond which a text cannot tokenize into max_tokens tokens or fewer: max_tokens times the most
    bytes of text one token stands for, times the most a normalizer (if any) can shrink text before it is split."""
    def token_bytes(i: int) -> int:
        # Two upper bounds: the token's string (byte-level and SentencePiece strings are as long as the bytes they
        # stand for, or longer), and its decoded text plus the one leading space a decoder may strip.
        string = tokenizer.id_to_token(i) or ""
        text = tokenizer.decode([i], skip_special_tokens=False)
        return min(utf8_length(string), utf8_length(text) + 1)

    longest = max(map(token_bytes, range(tokenizer.vocab_size)), default=1)
    return max_tokens * max(longest, 1) * (NORMALIZER_SLACK if normalizes else 1)


def has_normalizer(tokenizer_json: Path) -> bool:
    """Whether tokenizer.json normalizes text before splitting it (unknown: assume it does)."""
    try:
        return json.loads(tokenizer_json.read_text(encoding="utf-8")).get("normalizer") is not None
    except (OSError, ValueError, AttributeError):
        return True


def duration_seconds(d: Duration, name: str) -> float:
    """A Duration's seconds, or INVALID_ARGUMENT when it is outside protobuf's rules for the type."""
    same_sign = d.seconds == 0 or d.nanos == 0 or (d.seconds > 0) == (d.nanos > 0)
    if not (abs(d.seconds) <= MAX_DURATION_SECONDS and abs(d.nanos) <= 999_999_999 and same_sign):
        raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{name} is not a valid Duration (seconds={d.seconds}, nanos={d.nanos}): |seconds| "
                              f"must be at most {MAX_DURATION_SECONDS}, |nanos| below 1e9, both of the same sign")
    return d.seconds + d.nanos / 1e9


def _shutting_down() -> RequestRejected:
    return RequestRejected(grpc.StatusCode.UNAVAILABLE,
                           "the server is shutting down and takes no new requests; retry on another instance")


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def sampling_from_proto(p: pb.SamplingParams) -> SamplingParams:
    """Map the API's message to SamplingParams; proto3 zeros mean 'unset' where zero is not valid."""
    params = SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p if p.top_p != 0 else 1.0,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty != 0 else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        logprobs=p.logprobs,
    )
    params.validate()
    return params


def token_message(ev: TokenEvent) -> pb.TokenChunk:
    chunk = pb.TokenChunk(token_ids=ev.token_ids, text=ev.text)
    for token, logprob, top in ev.logprobs or ():
        chunk.logprobs.append(pb.TokenLogprob(token_id=token, logprob=logprob,
                                              top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top]))
    return chunk


def finished_message(ev: FinishEvent) -> pb.Finished:
    return pb.Finished(
        reason=_FINISH_REASONS[ev.reason], stop_sequence=ev.stop_sequence, message=ev.message,
        usage=pb.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                       cached_prompt_tokens=ev.cached_prompt_tokens),
        reprefilled=ev.reprefilled, preemptions=ev.preemptions,
        timings=pb.Timings(queue=_duration(ev.queue_s), time_to_first_token=_duration(ev.ttft_s),
                           total=_duration(ev.total_s)))


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, engine: Engine, tokenizer: Tokenizer, bundle: Bundle, generation: GenerationConfig,
                 model_info: pb.ModelInfo, limits: LimitsConfig | None = None, connections: Connections | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.bundle = bundle
        self.generation = generation
        self.model_info = model_info
        self.limits = limits or LimitsConfig()
        self.connections = connections or Connections()
        self.draining = False  # set on SIGTERM: new requests are refused with UNAVAILABLE
        self.live: set[Sequence] = set()  # submitted and not finished (event loop only)
        self.all_done = asyncio.Event()  # set while `live` is empty
        self.all_done.set()
        self._generate_ids = itertools.count(1)
        # Tokenizing a long prompt or rendering a template takes milliseconds: never on the event loop.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgellm-tokenize")
        self.prompt_token_limit = min(engine.context_length - 1, self.limits.max_prompt_tokens or engine.context_length)
        # A longer text cannot fit: refused before the tokenizer spends time and memory on it.
        self.max_prompt_bytes = self.limits.max_prompt_bytes or prompt_byte_limit(
            tokenizer, self.prompt_token_limit, has_normalizer(bundle.path / "tokenizer.json"))
        self._malformed_log = ThrottledLog(log)

    # ---- request preparation ----------------------------------------------------------------------
    def _check_size(self, nbytes: int, what: str) -> None:
        if nbytes > self.max_prompt_bytes:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"{what} has {nbytes} bytes; this server accepts at most {self.max_prompt_bytes} "
                                  f"(a longer text cannot fit the context; limits.max_prompt_bytes)")

    def _encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except Exception as e:
            raise internal("tokenizing the prompt", e) from e

    def _encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        """The chat rendered by the model's template and tokenized; message contents can forge no control token."""
        try:
            return self.tokenizer.encode_chat(messages)
        except ValueError as e:  # the client's messages: an unknown role, what the template refuses
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except Exception as e:
            raise internal("rendering and tokenizing the chat", e) from e

    def _prompt_ids(self, req: pb.GenerateRequest, conv: ConversationState | None = None) -> list[int]:
        """The request's prompt as token ids (for a conversation turn: its whole history). Runs in the pool."""
        kind = req.WhichOneof("prompt")
        if conv is not None and conv.kind is not None and (kind == "chat") != (conv.kind == "chat"):
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"conversation {conv.conversation.id!r} takes {'chat' if conv.kind == 'chat' else 'text or token-id'} turns")
        if kind == "text":
            if not req.text:
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
            self._check_size(utf8_length(req.text), "the prompt")
            if conv is not None and conv.history_ids:
                ids = self._encode(req.text)
                if self.tokenizer.add_bos_token and ids[:1] == [self.tokenizer.bos_token_id]:
                    ids = ids[1:]  # a continuation: the BOS is at the start of the history already
                return conv.history_ids + ids
            return self._encode(req.text)
        if kind == "chat":
            if not req.chat.messages:
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "the chat has no messages")
            # A chat template marks every message with at least one token; rendering a million empty messages
            # would hold the GIL for a second.
            if len(req.chat.messages) > self.prompt_token_limit:
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"the chat has {len(req.chat.messages)} messages; a prompt of at most {self.prompt_token_limit} tokens cannot hold them")
            # The template writes each message's content into the prompt: content this long cannot fit either.
            self._check_size(sum(utf8_length(m.content) for m in req.chat.messages), "the chat's content")
            earlier = conv.messages if conv is not None and conv.messages else []
            return self._encode_chat([*earlier, *((m.role, m.content) for m in req.chat.messages)])
        if kind == "token_ids":
            ctx = self.engine.context_length
            if len(req.token_ids.ids) >= ctx:  # before looking at each id: millions of them would hold the GIL
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"the prompt has {len(req.token_ids.ids)} tokens; the context holds {ctx} (prompt plus at least one new token)")
            ids = list(req.token_ids.ids)
            vocab = self.tokenizer.vocab_size
            bad = next((i for i in ids if not 0 <= i < vocab), None)
            if bad is not None:
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
            if not ids:
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
            return (conv.history_ids or []) + ids if conv is not None else ids
        raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "the request has no prompt (set text, chat or token_ids)")

    async def _prepare(self, req: pb.GenerateRequest, call_time_left: float | None,
                       conv: ConversationState | None = None) -> Sequence:
        """Validate a request and build its Sequence; raises RequestRejected with the reason."""
        if self.draining:  # early, to spare the tokenizer pool; _submit checks again, after the await below
            raise _shutting_down()
        arrival = time.monotonic()
        try:
            sampling = sampling_from_proto(req.sampling)
        except ValueError as e:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if req.HasField("max_new_tokens") and req.max_new_tokens <= 0:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"max_new_tokens must be > 0, got {req.max_new_tokens}")
        gen = self.generation
        if len(req.stop) > gen.max_stop_sequences:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"at most {gen.max_stop_sequences} stop sequences, got {len(req.stop)}")
        for s in req.stop:
            if not s or len(s) > gen.max_stop_length:
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"stop sequences must be 1..{gen.max_stop_length} characters, got {s!r}")
        deadline = None
        if req.HasField("deadline"):
            seconds = duration_seconds(req.deadline, "deadline")
            if seconds <= 0:
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"deadline must be positive, got {seconds}s")
            deadline = arrival + seconds
        if call_time_left is not None:
            deadline = min(deadline or float("inf"), arrival + call_time_left)
        if req.priority not in _PRIORITIES:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"unknown priority {req.priority}")
        interval_ms = req.stream_interval_ms if req.HasField("stream_interval_ms") else self.model_info.stream_interval_ms
        if interval_ms > MAX_STREAM_INTERVAL_MS:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"stream_interval_ms must be at most {MAX_STREAM_INTERVAL_MS}, got {interval_ms}")
        ids = await asyncio.get_running_loop().run_in_executor(self._pool, self._prompt_ids, req, conv)
        ctx = self.engine.context_length
        if self.limits.max_prompt_tokens and len(ids) > self.limits.max_prompt_tokens:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"the prompt has {len(ids)} tokens; this server accepts at most {self.limits.max_prompt_tokens} (limits.max_prompt_tokens)")
        if len(ids) >= ctx:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"the prompt has {len(ids)} tokens; the context holds {ctx} (prompt plus at least one new token)")
        if req.HasField("max_new_tokens"):
            max_new = req.max_new_tokens
            if len(ids) + max_new > ctx:
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new}) exceeds the context of {ctx} tokens")
        else:
            max_new = min(gen.default_max_new_tokens, ctx - len(ids))
        return Sequence(ids, sampling, max_new, tuple(req.stop), req.ignore_eos, deadline, arrival=arrival,
                        priority=_PRIORITIES[req.priority], conversation=conv.conversation if conv else None,
                        stream_interval=interval_ms / 1000)

    async def _start(self, request: Request, req: pb.GenerateRequest, call_time_left: float | None,
                     conv: ConversationState | None = None) -> None:
        """Prepare and submit one request; raises RequestRejected (INTERNAL for a failure of the server's own)."""
        try:
            seq = await self._prepare(req, call_time_left, conv)
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
            raise _shutting_down()
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
            # Called with other requests' events in one batch (scheduler._deliver): it must never raise.
            try:
                if isinstance(ev, FinishEvent):
                    self._settle(request)  # first: the live counts never wait on anything that can fail
                if not request.failed:
                    self._hand_off(request, ev)
                if isinstance(ev, FinishEvent):
                    self._log_finished(request, ev)
            except Exception as e:
                self._fail(request, "handing the engine's output to the stream", e)
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

    def _fail(self, request: Request, what: str, e: Exception) -> None:
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

    def _reply(self, request: Request, ev: TokenEvent | FinishEvent | Failure) -> tuple[str, Any]:
        """What the client gets for one event: ("tokens" | "finished" | "error", message); updates request's state."""
        if isinstance(ev, TokenEvent):
            chunk = token_message(ev)
            request.streamed = True
            if request.conversation is not None:
                request.reply_text.append(ev.text)
                request.reply_ids += ev.token_ids
            return "tokens", chunk
        if isinstance(ev, FinishEvent) and ev.reason is FinishReason.UNAVAILABLE:  # unstarted at a drain: retry elsewhere
            reply = "error", pb.RequestError(code=grpc.StatusCode.UNAVAILABLE.value[0], message=ev.message)
        elif isinstance(ev, FinishEvent):
            reply = "finished", finished_message(ev)
        elif request.streamed:
            reply = "finished", pb.Finished(reason=pb.FINISH_REASON_ERROR, message=ev.message)
        else:
            reply = "error", pb.RequestError(code=grpc.StatusCode.INTERNAL.value[0], message=ev.message)
        request.ended = True
        return reply

    def _refused(self, rid: str, peer: Peer, code: grpc.StatusCode, message: str) -> None:
        """Count and log a request (or message) that ended before the engine saw it."""
        self.engine.metrics.request_errors.labels(code.name).inc()
        log_request(id=rid, **peer.log_fields(), reason="refused", code=code.name, message=message)

    def _malformed(self, m: Malformed, peer: Peer) -> str:
        self.engine.metrics.request_errors.labels(grpc.StatusCode.INVALID_ARGUMENT.name).inc()
        self._malformed_log.warning(f"{m.describe()} (from {peer.describe()})")
        return m.describe()

    # ---- RPCs ---------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        peer = self.connections.of(context)
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self._malformed(request, peer))
        r = Request(f"generate-{next(self._generate_ids)}", peer, asyncio.Queue())
        try:
            await self._start(r, request, context.time_remaining())
        except RequestRejected as e:
            self._refused(r.id, peer, e.code, e.message)
            if e.retry_after_s is not None:
                context.set_trailing_metadata((("retry-after-ms", str(int(e.retry_after_s * 1000))),))
            await context.abort(e.code, e.message)
        try:
            while not r.ended:
                _, ev = await r.out.get()
                try:
                    kind, body = self._reply(r, ev)
                except Exception as e:
                    self._fail(r, "building the response", e)
                    continue
                if kind == "error":
                    await context.abort(_STATUS_CODES[body.code], body.message)
                yield pb.GenerateResponse(**{kind: body})
        finally:
            if not r.ended:  # the client went away or the call was cancelled
                self.engine.cancel(r.seq)

    async def Session(self, request_iterator: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SessionResponse]:
        out: asyncio.Queue = asyncio.Queue()
        live: dict[str, Request] = {}  # by id: started and not yet ended for the client (seq None while preparing)
        conversations: dict[str, ConversationState] = {}
        end_of_input = object()
        peer = self.connections.of(context)

        def refuse(kind: int, rid: str, code: grpc.StatusCode, message: str) -> None:
            self._refused(rid, peer, code, message)
            out.put_nowait(pb.SessionResponse(refused=pb.Refused(kind=kind, id=rid, code=code.value[0], message=message)))

        async def start(msg: pb.StartRequest) -> None:
            rid = msg.id
            if not rid or len(rid.encode()) > MAX_REQUEST_ID_BYTES:
                return refuse(pb.SESSION_REQUEST_KIND_START, rid, grpc.StatusCode.INVALID_ARGUMENT, f"request id must be 1..{MAX_REQUEST_ID_BYTES} bytes")
            if rid in live:
                return refuse(pb.SESSION_REQUEST_KIND_START, rid, grpc.StatusCode.ALREADY_EXISTS, f"duplicate request id {rid!r}: a request with this id is still running on this stream (it goes on)")
            r = live[rid] = Request(rid, peer, out)
            conv = None
            try:
                if msg.conversation_id:
                    conv = conversations.get(msg.conversation_id)
                    if conv is None:
                        raise RequestRejected(grpc.StatusCode.NOT_FOUND, f"no open conversation {msg.conversation_id!r} on this stream")
                    if conv.running is not None:
                        raise RequestRejected(grpc.StatusCode.FAILED_PRECONDITION, f"conversation {msg.conversation_id!r} is still answering request {conv.running!r}")
                    conv.running = rid
                    kind = "chat" if msg.request.WhichOneof("prompt") == "chat" else "raw"
                    messages = [*(conv.messages or []), *((m.role, m.content) for m in msg.request.chat.messages)]
                await self._start(r, msg.request, context.time_remaining(), conv)
                if conv is not None:  # assignments only: nothing here can fail once the engine has the request
                    r.conversation, r.earlier_messages = conv, conv.messages
                    conv.kind = conv.kind or kind
                    if conv.kind == "chat":
                        conv.messages = messages
            except Exception as e:
                e = e if isinstance(e, RequestRejected) else internal("starting the request", e)
                r.ended = True  # whatever the engine may still send for it goes nowhere
                if r.seq is not None:
                    self.engine.cancel(r.seq)
                del live[rid]
                if conv is not None and conv.running == rid:
                    conv.running = None
                self._refused(rid, peer, e.code, e.message)
                err = pb.RequestError(code=e.code.value[0], message=e.message)
                if e.retry_after_s is not None:
                    err.retry_after.CopyFrom(_duration(e.retry_after_s))
                out.put_nowait(pb.SessionResponse(id=rid, error=err))

        def turn_done(r: Request, ev: FinishEvent | Failure, answered: bool) -> None:
            conv = r.conversation
            conv.running = None
            if not answered:  # failed or refused at a drain before any token: the turn did not happen
                if conv.kind == "chat":
                    conv.messages = r.earlier_messages
            elif conv.kind == "chat":
                conv.messages.append(("assistant", "".join(r.reply_text)))
            else:
                conv.history_ids = [*r.seq.prompt_ids, *(ev.output_ids if isinstance(ev, FinishEvent) else r.reply_ids)]

        def cancel(rid: str) -> None:
            r = live.get(rid)
            if r is None or r.seq is None:
                return refuse(pb.SESSION_REQUEST_KIND_CANCEL, rid, grpc.StatusCode.NOT_FOUND, f"no running request with id {rid!r} on this stream")
            self.engine.cancel(r.seq)

        def open_conversation(cid: str) -> None:
            if not cid or len(cid.encode()) > MAX_REQUEST_ID_BYTES:
                return refuse(pb.SESSION_REQUEST_KIND_OPEN_CONVERSATION, cid, grpc.StatusCode.INVALID_ARGUMENT, f"conversation id must be 1..{MAX_REQUEST_ID_BYTES} bytes")
            if cid in conversations:
                return refuse(pb.SESSION_REQUEST_KIND_OPEN_CONVERSATION, cid, grpc.StatusCode.ALREADY_EXISTS, f"conversation {cid!r} is already open on this stream")
            conversations[cid] = ConversationState(Conversation(cid))

        def close_conversation(cid: str) -> None:
            conv = conversations.pop(cid, None)
            if conv is None:
                return refuse(pb.SESSION_REQUEST_KIND_CLOSE_CONVERSATION, cid, grpc.StatusCode.NOT_FOUND, f"no open conversation {cid!r} on this stream")
            self.engine.close(conv.conversation)

        async def handle(msg: pb.SessionRequest) -> None:
            kind = msg.WhichOneof("kind")
            if kind == "start":
                await start(msg.start)
            elif kind == "cancel":
                cancel(msg.cancel.id)
            elif kind == "open_conversation":
                open_conversation(msg.open_conversation.id)
            elif kind == "close_conversation":
                close_conversation(msg.close_conversation.id)
            else:
                refuse(pb.SESSION_REQUEST_KIND_UNSPECIFIED, "", grpc.StatusCode.INVALID_ARGUMENT, "empty SessionRequest: set one of its fields")

        async def read() -> None:
            # Every way this ends reaches the loop below: the end of input, or the stream's failure.
            try:
                async for msg in request_iterator:
                    if isinstance(msg, Malformed):  # nothing after it can be trusted to mean what it says
                        out.put_nowait(StreamFailure(grpc.StatusCode.INVALID_ARGUMENT, self._malformed(msg, peer)))
                        return
                    try:
                        await handle(msg)
                    except Exception as e:  # handling one message failed: refuse it, read on
                        kind = msg.WhichOneof("kind")
                        e = internal(f"handling a {kind or 'empty'} message", e)
                        # SessionRequestKind's values are the field numbers of SessionRequest.kind.
                        refuse(msg.DESCRIPTOR.fields_by_name[kind].number if kind else pb.SESSION_REQUEST_KIND_UNSPECIFIED,
                               getattr(msg, kind).id if kind else "", e.code, e.message)
                out.put_nowait(end_of_input)
            except Exception as e:
                if context.cancelled() or context.done():  # the client went away: nobody to tell
                    out.put_nowait(end_of_input)
                    return
                log.error("reading a Session stream failed", exc_info=e)
                out.put_nowait(StreamFailure(grpc.StatusCode.INTERNAL, f"reading the request stream failed: {type(e).__name__}: {e}"))

        reader = asyncio.create_task(read())
        input_done = False
        try:
            while not (input_done and not live):
                item = await out.get()
                if item is end_of_input:
                    input_done = True
                elif isinstance(item, StreamFailure):
                    await context.abort(item.code, item.message)
                elif isinstance(item, pb.SessionResponse):
                    yield item
                else:
                    r, ev = item
                    if r.ended:
                        continue
                    try:
                        kind, body = self._reply(r, ev)
                    except Exception as e:
                        self._fail(r, "building the response", e)
                        continue
                    if r.ended:
                        del live[r.id]
                        if r.conversation is not None:
                            turn_done(r, ev, answered=kind != "error")
                    yield pb.SessionResponse(id=r.id, **{kind: body})
        finally:
            reader.cancel()
            for r in live.values():  # the client went away: nobody reads these any more
                if r.seq is not None:
                    self.engine.cancel(r.seq)
            for conv in conversations.values():  # conversations end with their stream
                self.engine.close(conv.conversation)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        peer = self.connections.of(context)
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self._malformed(request, peer))
        try:
            self._check_size(utf8_length(request.text), "the text")
            ids = await asyncio.get_running_loop().run_in_executor(self._pool, self._encode, request.text)
        except RequestRejected as e:
            self._refused("tokenize", peer, e.code, e.message)
            await context.abort(e.code, e.message)
        return pb.TokenizeResponse(ids=ids)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self._malformed(request, self.connections.of(context)))
        return self.model_info
