"""The gRPC server: turns API messages into engine `Sequence`s and engine events into stream messages.

Handlers run on the asyncio loop and never block it: tokenization and chat rendering go to a small
thread pool, generation to the engine thread. Per-request problems become a gRPC status (Generate)
or a RequestError message for that request id (Session); the stream itself goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
from google.protobuf.duration_pb2 import Duration

from daemon.access import Connections, Peer
from daemon.bundle import Bundle
from daemon.config import MAX_STREAM_INTERVAL_MS, GenerationConfig, LimitsConfig
from daemon.request_log import log_request
from daemon.sampling import SamplingParams
from daemon.scheduler import (Conversation, Engine, FinishEvent, FinishReason, Priority, QueueFullError, Sequence,
                              TokenEvent)
from daemon.tokenizer import Tokenizer
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc

MAX_REQUEST_ID_BYTES = 128
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

    # ---- request preparation ----------------------------------------------------------------------
    def _prompt_ids(self, req: pb.GenerateRequest, conv: ConversationState | None = None) -> list[int]:
        """The request's prompt as token ids (for a conversation turn: its whole history). Runs in the pool."""
        kind = req.WhichOneof("prompt")
        if conv is not None and conv.kind is not None and (kind == "chat") != (conv.kind == "chat"):
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"conversation {conv.conversation.id!r} takes {'chat' if conv.kind == 'chat' else 'text or token-id'} turns")
        if kind == "text":
            if not req.text:
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
            if conv is not None and conv.history_ids:
                ids = self.tokenizer.encode(req.text)
                if self.tokenizer.add_bos_token and ids[:1] == [self.tokenizer.bos_token_id]:
                    ids = ids[1:]  # a continuation: the BOS is at the start of the history already
                return conv.history_ids + ids
            return self.tokenizer.encode(req.text)
        if kind == "chat":
            if not req.chat.messages:
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "the chat has no messages")
            earlier = conv.messages if conv is not None and conv.messages else []
            try:
                text = self.tokenizer.render_chat([*earlier, *((m.role, m.content) for m in req.chat.messages)])
            except ValueError as e:
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            return self.tokenizer.encode(text)
        if kind == "token_ids":
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
            seconds = req.deadline.ToNanoseconds() / 1e9
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

    def _submit(self, seq: Sequence, events: asyncio.Queue, tag: str | None, peer: Peer, rid: str = "") -> None:
        """Queue seq in the engine, its events going to `events` (tagged with the request id on a Session).

        A client that reads too slowly lets its undelivered chunks pile up here, never in the engine:
        past the bound the request is cancelled with a message saying so.
        """
        if self.draining:
            raise _shutting_down()
        if peer.live >= self.limits.max_requests_per_connection:
            raise RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, f"this connection already has {peer.live} requests running or queued (limits.max_requests_per_connection)", 1.0)
        limit = self.generation.max_buffered_chunks

        def sink(ev: TokenEvent | FinishEvent) -> None:
            events.put_nowait(ev if tag is None else (tag, ev))
            if isinstance(ev, FinishEvent):
                peer.live -= 1
                self.live.discard(seq)
                if not self.live:
                    self.all_done.set()
                log_request(id=rid, **peer.log_fields(), priority=seq.priority.name.lower(),
                            prompt_tokens=ev.prompt_tokens, cached_tokens=ev.cached_prompt_tokens,
                            completion_tokens=ev.completion_tokens, queue_ms=round(ev.queue_s * 1e3, 1),
                            ttft_ms=round(ev.ttft_s * 1e3, 1), duration_ms=round(ev.total_s * 1e3, 1),
                            reason=ev.reason.value, **({"message": ev.message} if ev.message else {}))
            elif events.qsize() > limit and not seq.cancel_requested:
                self.engine.cancel(seq, f"the client did not read its stream: {limit} chunks were waiting")

        seq.sink = sink
        try:
            self.engine.submit(seq)
        except QueueFullError as e:
            raise RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry in {e.retry_after_s:.1f}s",
                                  e.retry_after_s) from None
        peer.live += 1
        self.live.add(seq)
        self.all_done.clear()

    def _refused(self, rid: str, peer: Peer, code: grpc.StatusCode, message: str) -> None:
        """Count and log a request that ended before the engine saw it."""
        self.engine.metrics.request_errors.labels(code.name).inc()
        log_request(id=rid, **peer.log_fields(), reason="refused", code=code.name, message=message)

    # ---- RPCs ---------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        events: asyncio.Queue = asyncio.Queue()
        peer = self.connections.of(context)
        rid = f"generate-{next(self._generate_ids)}"
        try:
            seq = await self._prepare(request, context.time_remaining())
            self._submit(seq, events, None, peer, rid)
        except RequestRejected as e:
            self._refused(rid, peer, e.code, e.message)
            if e.retry_after_s is not None:
                context.set_trailing_metadata((("retry-after-ms", str(int(e.retry_after_s * 1000))),))
            await context.abort(e.code, e.message)
        done = False
        try:
            while not done:
                ev = await events.get()
                if isinstance(ev, TokenEvent):
                    yield pb.GenerateResponse(tokens=token_message(ev))
                else:
                    done = True
                    if ev.reason is FinishReason.UNAVAILABLE:  # ended unstarted by the drain: retry elsewhere
                        await context.abort(grpc.StatusCode.UNAVAILABLE, ev.message)
                    yield pb.GenerateResponse(finished=finished_message(ev))
        finally:
            if not done:  # the client went away or the call was cancelled
                self.engine.cancel(seq)

    async def Session(self, request_iterator: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SessionResponse]:
        out: asyncio.Queue = asyncio.Queue()
        live: dict[str, Sequence | None] = {}  # None while the request is being prepared
        turns: dict[str, ConversationState] = {}  # request id -> the conversation it is a turn of
        conversations: dict[str, ConversationState] = {}
        replies: dict[str, list[str]] = {}  # text streamed so far, for conversation turns
        end_of_input = object()
        peer = self.connections.of(context)

        def reject(rid: str, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
            self._refused(rid, peer, code, message)
            err = pb.RequestError(code=code.value[0], message=message)
            if retry_after_s is not None:
                err.retry_after.CopyFrom(_duration(retry_after_s))
            out.put_nowait(pb.SessionResponse(id=rid, error=err))

        async def start(msg: pb.StartRequest) -> None:
            rid = msg.id
            if not rid or len(rid.encode()) > MAX_REQUEST_ID_BYTES:
                return reject(rid, grpc.StatusCode.INVALID_ARGUMENT, f"request id must be 1..{MAX_REQUEST_ID_BYTES} bytes")
            if rid in live:
                return reject(rid, grpc.StatusCode.INVALID_ARGUMENT, f"duplicate request id {rid!r}: a request with this id is still running on this stream")
            conv = None
            if msg.conversation_id:
                conv = conversations.get(msg.conversation_id)
                if conv is None:
                    return reject(rid, grpc.StatusCode.NOT_FOUND, f"no open conversation {msg.conversation_id!r} on this stream")
                if conv.running is not None:
                    return reject(rid, grpc.StatusCode.FAILED_PRECONDITION, f"conversation {msg.conversation_id!r} is still answering request {conv.running!r}")
                conv.running = rid
            live[rid] = None
            try:
                seq = await self._prepare(msg.request, context.time_remaining(), conv)
                self._submit(seq, out, rid, peer, rid)
                live[rid] = seq
                if conv is not None:
                    turns[rid] = conv
                    replies[rid] = []
                    if conv.kind is None:
                        conv.kind = "chat" if msg.request.WhichOneof("prompt") == "chat" else "raw"
                    if conv.kind == "chat":
                        conv.messages = [*(conv.messages or []), *((m.role, m.content) for m in msg.request.chat.messages)]
            except RequestRejected as e:
                del live[rid]
                if conv is not None:
                    conv.running = None
                reject(rid, e.code, e.message, e.retry_after_s)

        def conversation_turn_done(rid: str, ev: FinishEvent) -> None:
            conv = turns.pop(rid)
            conv.running = None
            text = "".join(replies.pop(rid))
            if conv.kind == "chat":
                conv.messages.append(("assistant", text))
            else:
                conv.history_ids = [*live[rid].prompt_ids, *ev.output_ids]

        def open_conversation(cid: str) -> None:
            if not cid or len(cid.encode()) > MAX_REQUEST_ID_BYTES:
                return reject(cid, grpc.StatusCode.INVALID_ARGUMENT, f"conversation id must be 1..{MAX_REQUEST_ID_BYTES} bytes")
            if cid in conversations:
                return reject(cid, grpc.StatusCode.ALREADY_EXISTS, f"conversation {cid!r} is already open on this stream")
            conversations[cid] = ConversationState(Conversation(cid))

        def close_conversation(cid: str) -> None:
            conv = conversations.pop(cid, None)
            if conv is None:
                return reject(cid, grpc.StatusCode.NOT_FOUND, f"no open conversation {cid!r} on this stream")
            self.engine.close(conv.conversation)

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    kind = msg.WhichOneof("kind")
                    if kind == "start":
                        await start(msg.start)
                    elif kind == "cancel":
                        seq = live.get(msg.cancel.id)
                        if seq is None:
                            reject(msg.cancel.id, grpc.StatusCode.NOT_FOUND, f"no running request with id {msg.cancel.id!r} on this stream")
                        else:
                            self.engine.cancel(seq)
                    elif kind == "open_conversation":
                        open_conversation(msg.open_conversation.id)
                    elif kind == "close_conversation":
                        close_conversation(msg.close_conversation.id)
                    else:
                        reject("", grpc.StatusCode.INVALID_ARGUMENT, "empty SessionRequest: set one of its fields")
            finally:
                out.put_nowait(end_of_input)

        reader = asyncio.create_task(read())
        input_done = False
        try:
            while not (input_done and not live):
                item = await out.get()
                if item is end_of_input:
                    input_done = True
                elif isinstance(item, pb.SessionResponse):
                    yield item
                else:
                    rid, ev = item
                    if isinstance(ev, TokenEvent):
                        if rid in replies:
                            replies[rid].append(ev.text)
                        yield pb.SessionResponse(id=rid, tokens=token_message(ev))
                    else:
                        if rid in turns:
                            conversation_turn_done(rid, ev)
                        live.pop(rid, None)
                        if ev.reason is FinishReason.UNAVAILABLE:  # ended unstarted by the drain: retry elsewhere
                            yield pb.SessionResponse(id=rid, error=pb.RequestError(
                                code=grpc.StatusCode.UNAVAILABLE.value[0], message=ev.message))
                        else:
                            yield pb.SessionResponse(id=rid, finished=finished_message(ev))
        finally:
            reader.cancel()
            for seq in live.values():  # the client went away: nobody reads these any more
                if seq is not None:
                    self.engine.cancel(seq)
            for conv in conversations.values():  # conversations end with their stream
                self.engine.close(conv.conversation)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        ids = await asyncio.get_running_loop().run_in_executor(self._pool, self.tokenizer.encode, request.text)
        return pb.TokenizeResponse(ids=ids)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return self.model_info
