"""The asyncio client: the same calls as edgellm.client.sync's, awaited (grpc.aio underneath)."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgellm.client.channel import Connection, aio_channel, connection
from edgellm.client.errors import EdgeLLMError, status_code
from edgellm.client.messages import Chunk, Completion, Prompt, Result, make_request, session_reply
from edgellm.client.retry import RetryPolicy, session_start_delay
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc


def _time_left(end: float | None) -> float | None:
    return None if end is None else max(0.0, end - time.monotonic())


class AsyncClient:
    """Client's asyncio twin (same arguments); create it inside the event loop that uses it."""

    def __init__(self, address: str | Sequence[str] | None = None, *, tls: bool = False, ca_cert: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None, token: str | None = None,
                 server_name: str | None = None, retry: RetryPolicy = RetryPolicy(),
                 load_balancing: str = "round_robin", options: Sequence[tuple[str, object]] = ()):
        self.connection: Connection = connection(address, tls=tls, ca_cert=ca_cert, client_cert=client_cert,
                                                 client_key=client_key, token=token, server_name=server_name,
                                                 load_balancing=load_balancing, options=options)
        self.retry = retry
        self.closed = False
        self.channel = aio_channel(self.connection)
        self.stub = pb_grpc.InferenceStub(self.channel)

    @property
    def address(self) -> str:
        return self.connection.address

    async def close(self) -> None:
        self.closed = True
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=timeout, metadata=self.connection.metadata)
        except grpc.RpcError as e:
            raise EdgeLLMError.from_rpc(e) from None

    async def model(self, timeout: float | None = 10.0) -> pb.ModelInfo:
        return await self._unary(self.stub.GetModel, pb.GetModelRequest(), timeout)

    async def tokenize(self, text: str, timeout: float | None = 10.0) -> list[int]:
        return list((await self._unary(self.stub.Tokenize, pb.TokenizeRequest(text=text), timeout)).ids)

    async def serving(self, timeout: float | None = 10.0) -> bool:
        reply = await self._unary(health_pb2_grpc.HealthStub(self.channel).Check, health_pb2.HealthCheckRequest(),
                                  timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def generate(self, prompt: Prompt, *, timeout: float | None = None, **options) -> "AsyncGenerateStream":
        """One request: `async for chunk in client.generate(...)`; `.result` afterwards."""
        return AsyncGenerateStream(self, make_request(prompt, **options), timeout)

    async def complete(self, prompt: Prompt, *, timeout: float | None = None, **options) -> Completion:
        stream = self.generate(prompt, timeout=timeout, **options)
        chunks = [chunk async for chunk in stream]
        return Completion.of(chunks, stream.result)

    def session(self, *, timeout: float | None = None) -> "AsyncSession":
        """`async with client.session() as s:` many requests and conversations on one stream."""
        return AsyncSession(self, timeout)


class AsyncGenerateStream:
    """GenerateStream's asyncio twin."""

    def __init__(self, client: AsyncClient, request: pb.GenerateRequest, timeout: float | None):
        self.request = request
        self.result: Result | None = None
        self.attempts = 0
        self._client = client
        self._end = None if timeout is None else time.monotonic() + timeout
        self._call = None
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        client, policy = self._client, self._client.retry
        while True:
            self.attempts += 1
            streamed = 0
            try:
                self._call = client.stub.Generate(self.request, timeout=_time_left(self._end),
                                                  metadata=client.connection.metadata)
                if self._cancelled:
                    self._call.cancel()
                async for msg in self._call:
                    if msg.HasField("tokens"):
                        streamed += len(msg.tokens.token_ids)
                        yield Chunk.of(msg.tokens)
                    else:
                        self.result = Result.of(msg.finished, self.attempts)
                return
            except grpc.RpcError as e:
                error = EdgeLLMError.from_rpc(e, streamed)
            except asyncio.CancelledError:
                if self._cancelled:  # grpc.aio reports a call cancelled by this client so
                    raise EdgeLLMError(grpc.StatusCode.CANCELLED, "cancelled by the client", None, streamed) from None
                raise
            finally:
                if self._call is not None:
                    self._call.cancel()
            left = _time_left(self._end)
            if not policy.should_retry(error, self.attempts, self._cancelled or client.closed):
                raise error
            wait = policy.delay(error, self.attempts)
            if left is not None and wait >= left:
                raise error
            await asyncio.sleep(wait)


class AsyncSession:
    """Session's asyncio twin: `await s.generate(...)` starts a request, `await s.conversation()` opens one."""

    def __init__(self, client: AsyncClient, timeout: float | None):
        self._client = client
        self._out: asyncio.Queue[pb.SessionRequest | None] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._live: dict[str, AsyncSessionRequest] = {}
        self._conversations: dict[str, AsyncConversation] = {}
        self._failed: EdgeLLMError | None = None
        self._call = client.stub.Session(self._requests(), timeout=timeout, metadata=client.connection.metadata)
        self._reader = asyncio.ensure_future(self._read())

    async def _requests(self) -> AsyncIterator[pb.SessionRequest]:
        while (msg := await self._out.get()) is not None:
            yield msg

    def send(self, message: pb.SessionRequest) -> None:
        self._out.put_nowait(message)

    async def generate(self, prompt: Prompt, *, conversation: "AsyncConversation | None" = None,
                       **options) -> "AsyncSessionRequest":
        r = AsyncSessionRequest(self, f"r{next(self._ids)}", make_request(prompt, **options),
                                conversation.id if conversation else "")
        r.start()
        return r

    async def conversation(self) -> "AsyncConversation":
        c = AsyncConversation(self, f"c{next(self._ids)}")
        self._conversations[c.id] = c
        self.send(pb.SessionRequest(open_conversation=pb.OpenConversation(id=c.id)))
        return c

    def _register(self, r: "AsyncSessionRequest") -> None:
        if self._failed:
            raise self._failed
        self._live[r.id] = r

    async def _read(self) -> None:
        try:
            async for msg in self._call:
                kind = msg.WhichOneof("kind")
                if kind == "refused":
                    self._refused(msg.refused)
                    continue
                r = self._live.pop(msg.id, None) if kind != "tokens" else self._live.get(msg.id)
                if r is not None:
                    r._inbox.put_nowait(msg)
            error = EdgeLLMError(grpc.StatusCode.CANCELLED, "the session stream ended")
        except grpc.RpcError as e:
            error = EdgeLLMError.from_rpc(e)
        except asyncio.CancelledError:
            error = EdgeLLMError(grpc.StatusCode.CANCELLED, "the session was cancelled")
        self._failed = self._failed or error
        live, self._live = list(self._live.values()), {}
        for r in live:
            r._inbox.put_nowait(error)

    def _refused(self, refused: pb.Refused) -> None:
        error = EdgeLLMError(status_code(refused.code), refused.message)
        if refused.kind == pb.SESSION_REQUEST_KIND_START:
            r = self._live.pop(refused.id, None)
            if r is not None:
                r._inbox.put_nowait(error)
        elif refused.kind == pb.SESSION_REQUEST_KIND_OPEN_CONVERSATION and refused.id in self._conversations:
            self._conversations[refused.id].error = error

    async def close(self) -> None:
        """Half-close: the requests still running finish, then the stream ends."""
        self._failed = self._failed or EdgeLLMError(grpc.StatusCode.FAILED_PRECONDITION, "this session is closed")
        self.send(None)
        await self._reader

    async def cancel(self) -> None:
        self._call.cancel()
        await self._reader

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, exc_type, *rest: object) -> None:
        await (self.cancel() if exc_type else self.close())


class AsyncSessionRequest:
    """SessionRequest's asyncio twin: `async for chunk in r`."""

    def __init__(self, session: AsyncSession, rid: str, request: pb.GenerateRequest, conversation_id: str):
        self.id = rid
        self.result: Result | None = None
        self.attempts = 0
        self._session = session
        self._start = pb.SessionRequest(start=pb.StartRequest(id=rid, request=request, conversation_id=conversation_id))
        self._inbox: asyncio.Queue[pb.SessionResponse | EdgeLLMError] = asyncio.Queue()

    def start(self) -> None:
        self.attempts += 1
        self._session._register(self)
        self._session.send(self._start)

    def cancel(self) -> None:
        self._session.send(pb.SessionRequest(cancel=pb.CancelRequest(id=self.id)))

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        policy = self._session._client.retry
        while True:
            msg = await self._inbox.get()
            if isinstance(msg, EdgeLLMError):
                raise msg
            reply = session_reply(msg, self.attempts)
            if isinstance(reply, Chunk):
                yield reply
            elif isinstance(reply, Result):
                self.result = reply
                return
            else:
                delay = session_start_delay(policy, reply, self.attempts)
                if delay is None:
                    raise reply
                await asyncio.sleep(delay)
                self.start()

    async def complete(self) -> Completion:
        chunks = [chunk async for chunk in self]
        return Completion.of(chunks, self.result)


class AsyncConversation:
    """Conversation's asyncio twin."""

    def __init__(self, session: AsyncSession, cid: str):
        self.id = cid
        self.error: EdgeLLMError | None = None
        self._session = session

    async def generate(self, prompt: Prompt, **options) -> AsyncSessionRequest:
        if self.error:
            raise self.error
        return await self._session.generate(prompt, conversation=self, **options)

    def close(self) -> None:
        self._session._conversations.pop(self.id, None)
        self._session.send(pb.SessionRequest(close_conversation=pb.CloseConversation(id=self.id)))

    async def __aenter__(self) -> "AsyncConversation":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
