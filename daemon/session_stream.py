"""One Session stream: its requests, its conversations, and every message it sends, in the order the client is owed.

The contract (docs/api-errors.md, "The Session message contract"): each started request ends with exactly one
`finished` or `error` carrying its id; a client message the server does not act on gets a `refused` and ends nothing;
whatever fails while one message or request is handled ends that message or request alone. The stream itself fails
only on a malformed message or when reading the client's messages fails.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, AsyncIterator

import grpc

from daemon.conversation import Conversation
from daemon.request import Failure, Malformed, Request, duration
from daemon.request_prep import RequestRejected, chat_message, internal
from daemon.sequence import FinishEvent, TokenEvent
from daemon.tool_calls import template_call
from edgellm.v1 import edgellm_pb2 as pb

if TYPE_CHECKING:
    from daemon.server import InferenceService

log = logging.getLogger("edgellm.server")

MAX_ID_BYTES = 128  # request and conversation ids


class _EndOfInput:
    """Queued when the client has closed its side of the stream (or gone away)."""


class StreamFailure:
    """Queued when the stream itself must fail with this status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code, self.message = code, message


class SessionStream:
    """A Session RPC from its first client message until its last response.

    All of it runs on the event loop. One queue, `out`, carries what the client is owed in order: the engine's
    events for this stream's requests (as (Request, event) pairs), the responses to client messages (`refused`,
    a start's `error`), the end of the input, a failure of the stream. Every request of the stream shares it, so
    the slow-reader bound (InferenceService._hand_off, generation.max_buffered_chunks) counts the whole stream.
    """

    def __init__(self, service: InferenceService, context: grpc.aio.ServicerContext):
        self.service = service
        self.engine = service.engine
        self.context = context
        self.peer = service.connections.of(context)
        self.out: asyncio.Queue = asyncio.Queue()
        self.requests: dict[str, Request] = {}  # by id: started and not yet ended for the client (seq None while preparing)
        self.conversations: dict[str, Conversation] = {}  # open ones, by id
        # Set while `out` holds at most generation.max_buffered_chunks: a client that sends without reading what it
        # is owed (refusals pile up) is read no further until it catches up, so its backlog stays bounded.
        self._room = asyncio.Event()
        self._room.set()

    async def responses(self, request_iterator: AsyncIterator[pb.SessionRequest]) -> AsyncIterator[pb.SessionResponse]:
        """The stream's responses, until the input has ended and so has every request started on it."""
        reader = asyncio.create_task(self._read(request_iterator))
        input_done = False
        try:
            while not (input_done and not self.requests):
                item = await self.out.get()
                if self.out.qsize() <= self.service.generation.max_buffered_chunks:
                    self._room.set()
                if isinstance(item, _EndOfInput):
                    input_done = True
                elif isinstance(item, StreamFailure):
                    await self.context.abort(item.code, item.message)
                elif isinstance(item, pb.SessionResponse):
                    yield item
                elif (response := self._event_response(*item)) is not None:
                    yield response
        finally:
            reader.cancel()
            self._close()

    def _event_response(self, r: Request, ev: TokenEvent | FinishEvent | Failure) -> pb.SessionResponse | None:
        """The message for one of a request's events (None: nothing goes out for it)."""
        if r.ended:  # its end went out already: what the engine still sends goes nowhere
            return None
        try:
            kind, body = r.response(ev)
            if kind == "tokens" and r.conversation is not None:
                r.conversation.record_reply(ev.text, ev.token_ids, [template_call(c) for c in ev.tool_calls])
        except Exception as e:
            self.service.fail(r, "building the response", e)
            return None
        if r.ended:
            del self.requests[r.id]
            if r.conversation is not None:
                # On a FinishEvent the engine is done with the request: its outputs are what the cache holds.
                r.conversation.end_turn(answered=kind != "error", prompt_ids=r.seq.prompt_ids,
                                        output_ids=r.seq.output_ids if isinstance(ev, FinishEvent) else None)
        return pb.SessionResponse(id=r.id, **{kind: body})

    def _close(self) -> None:
        """The stream is over (or the client went away): its requests are cancelled, its conversations closed."""
        for r in self.requests.values():  # nobody reads these any more
            if r.seq is not None:
                self.engine.cancel(r.seq)
        for conv in self.conversations.values():  # conversations end with their stream
            self.engine.close(conv)

    # ---- the client's messages ----------------------------------------------------------------------
    async def _read(self, request_iterator: AsyncIterator[pb.SessionRequest]) -> None:
        """Handle the client's messages one at a time. Every way this ends reaches `out`: the end of the input,
        or the stream's failure."""
        try:
            async for msg in request_iterator:
                if self.out.qsize() > self.service.generation.max_buffered_chunks:
                    self._room.clear()
                    await self._room.wait()
                if isinstance(msg, Malformed):  # nothing after it can be trusted to mean what it says
                    self.out.put_nowait(StreamFailure(grpc.StatusCode.INVALID_ARGUMENT, self.service.report_malformed(msg, self.peer)))
                    return
                try:
                    await self._handle(msg)
                except Exception as e:  # handling one message failed: refuse it, read on
                    kind = msg.WhichOneof("kind")
                    e = internal(f"handling a {kind or 'empty'} message", e)
                    # SessionRequestKind's values are the field numbers of SessionRequest.kind.
                    self._refuse(msg.DESCRIPTOR.fields_by_name[kind].number if kind else pb.SESSION_REQUEST_KIND_UNSPECIFIED,
                                 getattr(msg, kind).id if kind else "", e.code, e.message)
            self.out.put_nowait(_EndOfInput())
        except Exception as e:
            if self.context.cancelled() or self.context.done():  # the client went away: nobody to tell
                self.out.put_nowait(_EndOfInput())
                return
            log.error("reading a Session stream failed", exc_info=e)
            self.out.put_nowait(StreamFailure(grpc.StatusCode.INTERNAL, f"reading the request stream failed: {type(e).__name__}: {e}"))

    async def _handle(self, msg: pb.SessionRequest) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "start":
            await self._start(msg.start)
        elif kind == "cancel":
            self._cancel(msg.cancel.id)
        elif kind == "open_conversation":
            self._open_conversation(msg.open_conversation.id)
        elif kind == "close_conversation":
            self._close_conversation(msg.close_conversation.id)
        else:
            self._refuse(pb.SESSION_REQUEST_KIND_UNSPECIFIED, "", grpc.StatusCode.INVALID_ARGUMENT, "empty SessionRequest: set one of its fields")

    def _refuse(self, kind: int, rid: str, code: grpc.StatusCode, message: str) -> None:
        self.service.record_refused(rid, self.peer, code, message)
        self.out.put_nowait(pb.SessionResponse(refused=pb.Refused(kind=kind, id=rid, code=code.value[0], message=message)))

    async def _start(self, msg: pb.StartRequest) -> None:
        rid = msg.id
        if not rid or len(rid.encode()) > MAX_ID_BYTES:
            return self._refuse(pb.SESSION_REQUEST_KIND_START, rid, grpc.StatusCode.INVALID_ARGUMENT, f"request id must be 1..{MAX_ID_BYTES} bytes")
        if rid in self.requests:
            return self._refuse(pb.SESSION_REQUEST_KIND_START, rid, grpc.StatusCode.ALREADY_EXISTS, f"duplicate request id {rid!r}: a request with this id is still running on this stream (it goes on)")
        r = self.requests[rid] = Request(rid, self.peer, self.out)
        try:
            if msg.conversation_id:
                r.conversation = self._begin_turn(rid, msg)
            await self.service.start(r, msg.request, self.context.time_remaining(), r.conversation)
            if r.conversation is not None:  # an assignment only: nothing here can fail once the engine has the request
                r.conversation.turn_queued("chat" if msg.request.WhichOneof("prompt") == "chat" else "raw")
        except Exception as e:
            e = e if isinstance(e, RequestRejected) else internal("starting the request", e)
            r.ended = True  # whatever the engine may still send for it goes nowhere
            if r.seq is not None:
                self.engine.cancel(r.seq)
            del self.requests[rid]
            if r.conversation is not None:
                r.conversation.abandon_turn(rid)
            self.service.record_refused(rid, self.peer, e.code, e.message)
            err = pb.RequestError(code=e.code.value[0], message=e.message)
            if e.retry_after_s is not None:
                err.retry_after.CopyFrom(duration(e.retry_after_s))
            self.out.put_nowait(pb.SessionResponse(id=rid, error=err))

    def _begin_turn(self, rid: str, msg: pb.StartRequest) -> Conversation:
        """The conversation a start names, reserved for its turn; RequestRejected when it cannot take one now."""
        conv = self.conversations.get(msg.conversation_id)
        if conv is None:
            raise RequestRejected(grpc.StatusCode.NOT_FOUND, f"no open conversation {msg.conversation_id!r} on this stream")
        if conv.turn is not None:
            raise RequestRejected(grpc.StatusCode.FAILED_PRECONDITION, f"conversation {msg.conversation_id!r} is still answering request {conv.turn.request_id!r}")
        conv.begin_turn(rid, [chat_message(m) for m in msg.request.chat.messages])
        return conv

    def _cancel(self, rid: str) -> None:
        r = self.requests.get(rid)
        if r is None or r.seq is None:
            return self._refuse(pb.SESSION_REQUEST_KIND_CANCEL, rid, grpc.StatusCode.NOT_FOUND, f"no running request with id {rid!r} on this stream")
        self.engine.cancel(r.seq)

    def _open_conversation(self, cid: str) -> None:
        if not cid or len(cid.encode()) > MAX_ID_BYTES:
            return self._refuse(pb.SESSION_REQUEST_KIND_OPEN_CONVERSATION, cid, grpc.StatusCode.INVALID_ARGUMENT, f"conversation id must be 1..{MAX_ID_BYTES} bytes")
        if cid in self.conversations:
            return self._refuse(pb.SESSION_REQUEST_KIND_OPEN_CONVERSATION, cid, grpc.StatusCode.ALREADY_EXISTS, f"conversation {cid!r} is already open on this stream")
        limit = self.service.limits.max_conversations_per_stream
        if len(self.conversations) >= limit:
            return self._refuse(pb.SESSION_REQUEST_KIND_OPEN_CONVERSATION, cid, grpc.StatusCode.RESOURCE_EXHAUSTED, f"this stream already has {limit} open conversations (limits.max_conversations_per_stream); close one first")
        self.conversations[cid] = Conversation(cid)

    def _close_conversation(self, cid: str) -> None:
        conv = self.conversations.pop(cid, None)
        if conv is None:
            return self._refuse(pb.SESSION_REQUEST_KIND_CLOSE_CONVERSATION, cid, grpc.StatusCode.NOT_FOUND, f"no open conversation {cid!r} on this stream")
        self.engine.close(conv)
