"""The blocking client: Client.generate streams one request; Client.session multiplexes many on one stream."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgellm.client.channel import Connection, connection, sync_channel
from edgellm.client.errors import EdgeLLMError, status_code
from edgellm.client.messages import Chunk, Completion, Prompt, Result, make_request, session_reply
from edgellm.client.retry import RetryPolicy, session_start_delay
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc


def _time_left(end: float | None) -> float | None:
    return None if end is None else max(0.0, end - time.monotonic())


class Client:
    """A connection to one daemon, or to several with round_robin load balancing.

    address: None (the daemon's default Unix socket, checked for its owner first), 'unix:/path' or '/path',
    'host:port', any gRPC target ('ipv4:a:p,b:q', 'dns:///name:port'), or a list of 'ip:port'.
    tls: TLS with the system's roots, or `ca_cert`'s; client_cert + client_key: mutual TLS; token: sent as
    'authorization: Bearer <token>'; server_name: the name the server's certificate must carry, when it is not
    the address's. retry: what is retried, how often and after how long (RetryPolicy; NO_RETRIES disables).
    """

    def __init__(self, address: str | Sequence[str] | None = None, *, tls: bool = False, ca_cert: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None, token: str | None = None,
                 server_name: str | None = None, retry: RetryPolicy = RetryPolicy(),
                 load_balancing: str = "round_robin", options: Sequence[tuple[str, object]] = ()):
        self.connection: Connection = connection(address, tls=tls, ca_cert=ca_cert, client_cert=client_cert,
                                                 client_key=client_key, token=token, server_name=server_name,
                                                 load_balancing=load_balancing, options=options)
        self.retry = retry
        self.closed = False
        self.channel = sync_channel(self.connection)
        self.stub = pb_grpc.InferenceStub(self.channel)  # the generated stub, for what the helpers do not cover

    @property
    def address(self) -> str:
        return self.connection.address

    def close(self) -> None:
        self.closed = True
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=timeout, metadata=self.connection.metadata)
        except grpc.RpcError as e:
            raise EdgeLLMError.from_rpc(e) from None

    def model(self, timeout: float | None = 10.0) -> pb.ModelInfo:
        """GetModel: what the daemon serves."""
        return self._unary(self.stub.GetModel, pb.GetModelRequest(), timeout)

    def tokenize(self, text: str, timeout: float | None = 10.0) -> list[int]:
        return list(self._unary(self.stub.Tokenize, pb.TokenizeRequest(text=text), timeout).ids)

    def serving(self, timeout: float | None = 10.0) -> bool:
        """Whether the daemon says SERVING on grpc.health.v1 (False while it starts, drains or has failed)."""
        reply = self._unary(health_pb2_grpc.HealthStub(self.channel).Check, health_pb2.HealthCheckRequest(), timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def generate(self, prompt: Prompt, *, timeout: float | None = None, **options) -> "GenerateStream":
        """One request (Generate), its chunks read by iterating; see make_request for the options.
        timeout: seconds for the whole call, retries included (gRPC deadline)."""
        return GenerateStream(self, make_request(prompt, **options), timeout)

    def complete(self, prompt: Prompt, *, timeout: float | None = None, **options) -> Completion:
        """generate(), read to its end."""
        stream = self.generate(prompt, timeout=timeout, **options)
        chunks = list(stream)
        return Completion.of(chunks, stream.result)

    def session(self, *, timeout: float | None = None) -> "Session":
        """A Session stream: many requests and conversations at once on one daemon."""
        return Session(self, timeout)


class GenerateStream:
    """The chunks of one Generate request, retried (before its first token) by the client's RetryPolicy.
    Iterate it for Chunks; afterwards `.result` holds how it ended. Raises EdgeLLMError."""

    def __init__(self, client: Client, request: pb.GenerateRequest, timeout: float | None):
        self.request = request
        self.result: Result | None = None
        self.attempts = 0
        self._client = client
        self._end = None if timeout is None else time.monotonic() + timeout
        self._call = None
        self._cancelled = False

    def cancel(self) -> None:
        """End the request (from any thread): iteration then raises EdgeLLMError(CANCELLED)."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    def __iter__(self) -> Iterator[Chunk]:
        client, policy = self._client, self._client.retry
        while True:
            self.attempts += 1
            streamed = 0
            try:
                self._call = client.stub.Generate(self.request, timeout=_time_left(self._end),
                                                  metadata=client.connection.metadata)
                if self._cancelled:
                    self._call.cancel()
                for msg in self._call:
                    if msg.HasField("tokens"):
                        streamed += len(msg.tokens.token_ids)
                        yield Chunk.of(msg.tokens)
                    else:
                        self.result = Result.of(msg.finished, self.attempts)
                return
            except grpc.RpcError as e:
                error = EdgeLLMError.from_rpc(e, streamed)
            finally:
                if self._call is not None:
                    self._call.cancel()  # a no-op after the end; ends the call when the caller stops iterating
            left = _time_left(self._end)
            if not policy.should_retry(error, self.attempts, self._cancelled or client.closed):
                raise error
            wait = policy.delay(error, self.attempts)
            if left is not None and wait >= left:
                raise error
            time.sleep(wait)


class Session:
    """One bidirectional Session stream to one daemon, shared by many requests (one thread each, or several
    per thread). Requests: `generate()`; conversations (their turns keep their KV cache): `conversation()`.
    `close()` (or leaving a `with` block) waits for the requests still running, then ends the stream."""

    def __init__(self, client: Client, timeout: float | None):
        self._client = client
        self._out: queue.SimpleQueue[pb.SessionRequest | None] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._live: dict[str, SessionRequest] = {}
        self._conversations: dict[str, Conversation] = {}
        self._failed: EdgeLLMError | None = None  # why no more requests can start here
        self._call = client.stub.Session(iter(self._out.get, None), timeout=timeout,
                                         metadata=client.connection.metadata)
        self._reader = threading.Thread(target=self._read, name="edgellm-session", daemon=True)
        self._reader.start()

    def send(self, message: pb.SessionRequest) -> None:
        self._out.put(message)

    def generate(self, prompt: Prompt, *, conversation: "Conversation | None" = None, **options) -> "SessionRequest":
        """Start a request on this stream; iterate the returned SessionRequest for its chunks."""
        r = SessionRequest(self, f"r{next(self._ids)}", make_request(prompt, **options),
                           conversation.id if conversation else "")
        r.start()
        return r

    def conversation(self) -> "Conversation":
        """Open a conversation on this stream (pinned to this daemon; closed with it)."""
        c = Conversation(self, f"c{next(self._ids)}")
        with self._lock:
            self._conversations[c.id] = c
        self.send(pb.SessionRequest(open_conversation=pb.OpenConversation(id=c.id)))
        return c

    def _register(self, r: "SessionRequest") -> None:
        with self._lock:
            if self._failed:
                raise self._failed
            self._live[r.id] = r

    def _read(self) -> None:
        try:
            for msg in self._call:
                kind = msg.WhichOneof("kind")
                if kind == "refused":
                    self._refused(msg.refused)
                    continue
                with self._lock:
                    r = self._live.pop(msg.id, None) if kind != "tokens" else self._live.get(msg.id)
                if r is not None:
                    r._inbox.put(msg)
            error = EdgeLLMError(grpc.StatusCode.CANCELLED, "the session stream ended")
        except grpc.RpcError as e:
            error = EdgeLLMError.from_rpc(e)
        with self._lock:
            self._failed = self._failed or error
            live, self._live = list(self._live.values()), {}
        for r in live:
            r._inbox.put(error)

    def _refused(self, refused: pb.Refused) -> None:
        error = EdgeLLMError(status_code(refused.code), refused.message)
        with self._lock:
            if refused.kind == pb.SESSION_REQUEST_KIND_START:
                r = self._live.pop(refused.id, None)
                if r is not None:
                    r._inbox.put(error)
            elif refused.kind == pb.SESSION_REQUEST_KIND_OPEN_CONVERSATION and refused.id in self._conversations:
                self._conversations[refused.id].error = error
            # A refused cancel names a request that had already ended; a refused close, one already closed.

    def close(self, timeout: float | None = None) -> None:
        """Half-close: the requests still running finish, then the stream ends."""
        with self._lock:
            self._failed = self._failed or EdgeLLMError(grpc.StatusCode.FAILED_PRECONDITION, "this session is closed")
        self._out.put(None)
        self._reader.join(timeout)

    def cancel(self) -> None:
        """End the stream now: its requests are cancelled, its conversations closed."""
        self._call.cancel()
        self._reader.join()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, *rest: object) -> None:
        self.cancel() if exc_type else self.close()


class SessionRequest:
    """One request on a Session: iterate for Chunks; `.result` afterwards; `cancel()` from any thread.
    A start refused with RESOURCE_EXHAUSTED is sent again by the client's RetryPolicy; other errors raise."""

    def __init__(self, session: Session, rid: str, request: pb.GenerateRequest, conversation_id: str):
        self.id = rid
        self.result: Result | None = None
        self.attempts = 0
        self._session = session
        self._start = pb.SessionRequest(start=pb.StartRequest(id=rid, request=request, conversation_id=conversation_id))
        self._inbox: queue.SimpleQueue[pb.SessionResponse | EdgeLLMError] = queue.SimpleQueue()

    def start(self) -> None:
        self.attempts += 1
        self._session._register(self)
        self._session.send(self._start)

    def cancel(self) -> None:
        self._session.send(pb.SessionRequest(cancel=pb.CancelRequest(id=self.id)))

    def __iter__(self) -> Iterator[Chunk]:
        policy = self._session._client.retry
        while True:
            msg = self._inbox.get()
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
                time.sleep(delay)
                self.start()

    def complete(self) -> Completion:
        chunks = list(self)
        return Completion.of(chunks, self.result)


class Conversation:
    """A conversation on a Session: each `generate()` is its next turn, holding only the new messages (or text
    or tokens); the daemon keeps the history and its KV cache. One turn at a time."""

    def __init__(self, session: Session, cid: str):
        self.id = cid
        self.error: EdgeLLMError | None = None  # set when the daemon refused to open it
        self._session = session

    def generate(self, prompt: Prompt, **options) -> SessionRequest:
        if self.error:
            raise self.error
        return self._session.generate(prompt, conversation=self, **options)

    def close(self) -> None:
        with self._session._lock:
            self._session._conversations.pop(self.id, None)
        self._session.send(pb.SessionRequest(close_conversation=pb.CloseConversation(id=self.id)))

    def __enter__(self) -> "Conversation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
