"""The OpenAI-compatible HTTP door: /v1/chat/completions, /v1/completions (with server-sent events) and /v1/models.

One more listener on the daemon's event loop (aiohttp, the `openai` extra). A request is turned into the
GenerateRequest the gRPC API takes and goes through the same InferenceService.start as Generate: the same
validation, limits, queue bound, drain and request log; its engine events come back on its Request's queue and
become OpenAI's JSON. Access follows the gRPC TCP listener's rules: TLS (and mutual TLS) from `access`, the
bearer token of `access.token_file`. `response_format` and `tools` / `tool_choice` become the proto's
ResponseFormat and Tool / ToolChoice (the same grammar-constrained decoding); the engine's tool calls become
OpenAI's `tool_calls` (whole, or as streamed deltas) and finish_reason "tool_calls". Errors have OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with the HTTP status its clients map to exceptions
(docs/openai-http.md). A client that goes away (a closed connection, aiohttp cancels the handler) cancels its
engine request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

try:
    from aiohttp import web
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError("openai.listen needs aiohttp: install edgellm's `openai` extra (pip install 'edgellm[openai]')") from e

import grpc

from bundle_format.bundle import Bundle
from daemon.access import Peer, server_tls_context
from daemon.config import Config, check_tcp_exposure
from daemon.front import tcp_listener
from daemon.metrics import EngineMetrics
from daemon.request import Request
from daemon.request_prep import RequestRejected
from daemon.sampling import MAX_LOGPROBS
from daemon.server import InferenceService
from edgellm.v1 import edgellm_pb2 as pb

log = logging.getLogger("edgellm.openai")

CLOSE_GRACE_S = 5.0  # at stop, after the drain: how long handlers may take to send what they have left
JSON_IN_THREAD_BYTES = 64 * 1024  # request bodies larger than this are parsed off the event loop
INT32_MAX = 2**31 - 1

HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
               grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
               grpc.StatusCode.DEADLINE_EXCEEDED: 504}
GRPC_CODES = {status: code for code, status in HTTP_STATUS.items()}
STATUS_OF_CODE = {c.value[0]: c for c in grpc.StatusCode}  # RequestError.code -> grpc.StatusCode
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
               503: "service_unavailable_error"}
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
# An engine request that ended otherwise (cancelled at the end of a drain, failed) is an error for the client.
FAILED_STATUS = {pb.FINISH_REASON_CANCELLED: grpc.StatusCode.UNAVAILABLE,
                 pb.FINISH_REASON_DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED}


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after_s = retry_after_s
        self.counted = False  # in the metrics already (the service counts what it refuses, the engine what ends)

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> "ApiError":
        """The error the service or the engine answered with (and counted)."""
        e = cls(HTTP_STATUS.get(code, 500), message, code.name.lower(), retry_after_s=retry_after_s)
        e.counted = True
        return e

    def grpc_code(self) -> grpc.StatusCode:
        """The gRPC status the same refusal has on the gRPC API: edgellm_request_errors' label."""
        return GRPC_CODES.get(self.status, grpc.StatusCode.INVALID_ARGUMENT if self.status < 500 else grpc.StatusCode.INTERNAL)

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return web.json_response(self.body(), status=self.status, headers=headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_value", param)


def check_exposure(sock: socket.socket, config: Config) -> None:
    """Protected mode, the gRPC TCP listener's rule (daemon/config.py check_tcp_exposure) for this listener's bound
    address: raises ConfigError (a ValueError) naming the way out; logs the warning where allow_insecure_tcp lets it serve."""
    host, port = sock.getsockname()[:2]
    warning = check_tcp_exposure(config.listen, config.access, f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                                 "openai.listen")
    if warning:
        log.warning("%s", warning)


def http_listener(address: str) -> socket.socket:
    """Bind and listen on openai.listen's "host:port" (port 0 picks a free one), non-blocking for aiohttp."""
    sock = tcp_listener(address, "openai.listen")
    sock.setblocking(False)
    return sock


# ---- the request body -> a GenerateRequest ------------------------------------------------------------
@dataclass
class Options:
    """What shapes the answer rather than the generation."""

    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logprobs: int | None = None  # alternatives per token to report (chat: top_logprobs); None: no logprobs


def _value(body: dict, name: str, kind: type | tuple[type, ...], what: str, within: str = "") -> Any:
    """body[name] (None when absent or null), refused unless it is of `kind` (bool never counts as a number);
    within: where body is in the request ("tools[0].function."), for the message."""
    value = body.get(name)
    if value is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise bad_request(f"'{within}{name}' must be {what}, got {json.dumps(value)[:80]}",
                          within.split(".")[0].split("[")[0] or name)
    return value


def _int(body: dict, name: str, low: int, high: int = INT32_MAX) -> int | None:
    value = _value(body, name, int, "an integer")
    if value is not None and not low <= value <= high:
        raise bad_request(f"'{name}' must be in [{low}, {high}], got {value}", name)
    return value


def _float(body: dict, name: str) -> float | None:
    value = _value(body, name, (int, float), "a number")
    return None if value is None else float(value)


def _unsupported(body: dict, name: str, default: Any = None, why: str = "is not supported by this server") -> None:
    """Refuse a parameter this server does not implement unless it has its no-op value."""
    value = body.get(name)
    if value is not None and value != default and not (default is None and value in ({}, [], "")):
        raise bad_request(f"'{name}' {why}", name)


def _message_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"'{where}' must be a string or a list of text parts", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(f"'{where}[{j}]': only text parts are supported, got {kind!r}", where)
        texts.append(part["text"])
    return "".join(texts)


def _prompt(req: pb.GenerateRequest, prompt: Any) -> None:
    """/v1/completions' prompt: a string or token ids, alone or as a list of one."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.text = prompt
        return
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        if not all(0 <= i <= INT32_MAX for i in prompt):
            raise bad_request("token ids in 'prompt' must be non-negative integers", "prompt")
        req.token_ids.ids.extend(prompt)
        return
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request(f"one prompt per request: 'prompt' holds {len(prompt)} prompts", "prompt")
    raise bad_request("'prompt' must be a string, a list of token ids, or a list of one of these", "prompt")


def _chat(req: pb.GenerateRequest, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of messages", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"'messages[{i}]' must be an object with a string 'role'", "messages")
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for the system role
        msg = req.chat.messages.add(role=role, content=_message_text(m.get("content"), f"messages[{i}].content"))
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad_request(f"'messages[{i}].tool_call_id' is required: the id of the call this is the result of",
                                  "messages")
            msg.tool_call_id = call_id
        if m.get("tool_calls"):
            if role != "assistant":
                raise bad_request(f"'messages[{i}].tool_calls': only assistant messages make tool calls", "messages")
            _message_calls(msg, m["tool_calls"], f"messages[{i}].tool_calls")


def _message_calls(msg: pb.ChatMessage, calls: Any, where: str) -> None:
    """An assistant message's tool_calls, [{"id", "type": "function", "function": {"name", "arguments"}}]."""
    if not isinstance(calls, list):
        raise bad_request(f"'{where}' must be a list of tool calls", "messages")
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(f, dict) and isinstance(c.get("id"), str) and isinstance(f.get("name"), str)
                and c.get("type", "function") == "function"):
            raise bad_request(f"'{where}[{j}]' must be {{\"id\", \"type\": \"function\", \"function\": "
                              f"{{\"name\", \"arguments\"}}}}", "messages")
        args = f.get("arguments")
        if isinstance(args, dict):  # lenient: an object where OpenAI sends its JSON text
            args = json.dumps(args, ensure_ascii=False)
        elif args is None:
            args = "{}"
        elif not isinstance(args, str):
            raise bad_request(f"'{where}[{j}].function.arguments' must be a JSON object as a string", "messages")
        msg.tool_calls.add(id=c["id"], name=f["name"], arguments=args)


def _response_format(req: pb.GenerateRequest, fmt: Any) -> None:
    """OpenAI's response_format as the proto's: text (unconstrained), json_object, json_schema."""
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        req.response_format.json_object = True
        return
    if kind != "json_schema":
        raise bad_request("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                          "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\"}}", "response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("'response_format.json_schema' must be an object with 'name' and 'schema'", "response_format")
    _value(spec, "name", str, "a string", "response_format.json_schema.")
    _value(spec, "strict", bool, "a boolean", "response_format.json_schema.")  # strict or not: the output always matches
    schema = spec.get("schema")
    if schema is None:  # OpenAI's schema is optional: then any JSON object
        req.response_format.json_object = True
    elif isinstance(schema, (dict, bool)):
        req.response_format.json_schema = json.dumps(schema, ensure_ascii=False)
    else:
        raise bad_request("'response_format.json_schema.schema' must be a JSON schema (an object)", "response_format")


TOOL_CHOICE_MODES = {"auto": pb.TOOL_CHOICE_MODE_AUTO, "none": pb.TOOL_CHOICE_MODE_NONE,
                     "required": pb.TOOL_CHOICE_MODE_REQUIRED}


def _tools(req: pb.GenerateRequest, body: dict) -> None:
    """tools, tool_choice and parallel_tool_calls as the proto's tools and tool_choice."""
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad_request("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    for i, t in enumerate(tools or ()):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or t.get("type", "function") != "function":
            raise bad_request(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\", "
                              f"\"description\", \"parameters\"}}}}", "tools")
        where = f"tools[{i}].function."
        name = _value(f, "name", str, "a string", where)
        if name is None:
            raise bad_request(f"'{where}name' is required", "tools")
        description = _value(f, "description", str, "a string", where) or ""
        parameters = _value(f, "parameters", dict, "a JSON schema (an object)", where)
        req.tools.add(name=name, description=description,
                      parameters_json_schema="" if parameters is None else json.dumps(parameters, ensure_ascii=False))
    choice = body.get("tool_choice")
    if isinstance(choice, str) and choice in TOOL_CHOICE_MODES:
        req.tool_choice.mode = TOOL_CHOICE_MODES[choice]
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        req.tool_choice.function = choice["function"]["name"]
    elif choice is not None:
        raise bad_request("'tool_choice' must be \"auto\", \"none\", \"required\" or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    # A reply may hold several calls unless one named function must be called: that cannot be narrowed to one.
    if _value(body, "parallel_tool_calls", bool, "a boolean") is False and req.tools \
            and req.tool_choice.WhichOneof("choice") != "function" and req.tool_choice.mode != pb.TOOL_CHOICE_MODE_NONE:
        raise bad_request("'parallel_tool_calls': false is supported only with a tool_choice that names a function",
                          "parallel_tool_calls")


def generate_request(body: Any, chat: bool) -> tuple[pb.GenerateRequest, Options]:
    """An OpenAI request body as the GenerateRequest the engine path takes; ApiError (400) naming what is wrong."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if body.get("n") not in (None, 1):
        raise bad_request("'n' must be 1: this server answers with one choice per request", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        _unsupported(body, name, 0, "is not supported by this server (use repetition_penalty); leave it 0")
    for name in ("logit_bias", "suffix"):
        _unsupported(body, name)
    for name in ("functions", "function_call"):  # OpenAI's deprecated form of tools
        _unsupported(body, name, why="is not supported by this server (use 'tools' and 'tool_choice')")
    req = pb.GenerateRequest()
    _response_format(req, body.get("response_format"))
    opts = Options(stream=bool(_value(body, "stream", bool, "a boolean")))
    stream_options = _value(body, "stream_options", dict, "an object") or {}
    opts.include_usage = bool(_value(stream_options, "include_usage", bool, "a boolean"))
    if chat:
        _chat(req, body.get("messages"))
        _tools(req, body)
        max_tokens = _int(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", 1)
        top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
        if _value(body, "logprobs", bool, "a boolean"):
            opts.logprobs = top or 0
        elif top is not None:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        if "prompt" not in body:
            raise bad_request("'prompt' is required", "prompt")
        _prompt(req, body["prompt"])
        max_tokens = _int(body, "max_tokens", 1)
        opts.logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
        _unsupported(body, "echo", False)
        _unsupported(body, "tools", why="needs a chat: use /v1/chat/completions")
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise bad_request("'tool_choice' needs tools, and tools a chat: use /v1/chat/completions", "tool_choice")
        _unsupported(body, "best_of", 1)
    if max_tokens is not None:
        req.max_new_tokens = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        req.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        req.stop.extend(stop)
    elif stop is not None:
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    # OpenAI's defaults (temperature 1, top_p 1) where the gRPC API's unset values would mean greedy.
    temperature = _float(body, "temperature")
    req.sampling.temperature = 1.0 if temperature is None else temperature
    req.sampling.top_p = _float(body, "top_p") or 0.0  # 0: unset, i.e. 1
    seed = _int(body, "seed", 0, 2**64 - 1)
    if seed is not None:
        req.sampling.seed = seed
    if opts.logprobs is not None:
        req.sampling.logprobs = max(opts.logprobs, 1)  # the engine reports the chosen token's with its alternatives
    # Beyond OpenAI's parameters, the names other OpenAI-compatible servers use for the engine's own.
    req.sampling.top_k = _int(body, "top_k", 0) or 0
    req.sampling.min_p = _float(body, "min_p") or 0.0
    req.sampling.repetition_penalty = _float(body, "repetition_penalty") or 0.0
    req.ignore_eos = bool(_value(body, "ignore_eos", bool, "a boolean"))
    return req, opts


def _subject(cert: dict) -> str:
    return ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)


# ---- the door -------------------------------------------------------------------------------------------
class _Refused(asyncio.Protocol):
    """The protocol of a connection beyond the bound: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()


class OpenAIDoor:
    """The HTTP listener: started with the daemon, closed at its stop; drain refuses new work first."""

    def __init__(self, config: Config, service: InferenceService, bundle: Bundle, token: str | None,
                 metrics: EngineMetrics, max_connections: int) -> None:
        self.config = config
        self.service = service
        self.token = token
        self.metrics = metrics
        self.max_connections = max_connections
        self.model = config.openai.model_name or bundle.manifest.get("source", {}).get("name") or bundle.path.name
        self.tokenizer = service.preparer.tokenizer
        self.require_client_cert = bool(config.access.tls_client_ca)
        self.address = ""
        self.created = int(time.time())
        self._server: asyncio.AbstractServer | None = None
        app = web.Application(middlewares=[self._errors_and_access], client_max_size=config.limits.max_message_bytes)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model_by_id)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        # handler_cancellation: a client that goes away cancels its handler, and so its engine request.
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                                     keepalive_timeout=config.limits.idle_timeout_s, shutdown_timeout=CLOSE_GRACE_S)

    async def start(self) -> None:
        cfg = self.config
        tls = server_tls_context(cfg.access)  # a context of its own: this listener speaks HTTP/1.1, not h2
        if tls is not None:
            tls.set_alpn_protocols(["http/1.1"])
        sock = http_listener(cfg.openai.listen)
        try:
            check_exposure(sock, cfg)
            await self._runner.setup()
            self._server = await asyncio.get_running_loop().create_server(
                self._protocol, sock=sock, ssl=tls, ssl_handshake_timeout=cfg.limits.handshake_timeout_s if tls else None)
        except BaseException:
            sock.close()
            raise
        host, port = sock.getsockname()[:2]
        self.address = f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"

    def stop_accepting(self) -> None:
        """The drain's first step: no new connections (requests on open ones get 503 from the service)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """After the drain: let handlers send what they have left (up to CLOSE_GRACE_S), close every connection."""
        self.stop_accepting()
        await self._runner.cleanup()

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        if len(server.connections) >= self.max_connections:
            self.metrics.connections_refused.inc()
            return _Refused()
        return server()

    # ---- access and errors ------------------------------------------------------------------------------
    def _refusal(self, request: web.Request) -> ApiError | None:
        if self.require_client_cert:
            transport = request.transport
            if not (transport and transport.get_extra_info("peercert")):
                return ApiError(401, "a client certificate is required (mutual TLS)", "client_certificate_required")
        if self.token is not None:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                return ApiError(401, "missing bearer token (header 'Authorization: Bearer <token>')", "missing_api_key")
            if not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                return ApiError(401, "wrong bearer token", "invalid_api_key")
        return None

    @web.middleware
    async def _errors_and_access(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            if refused := self._refusal(request):
                raise refused
            return await handler(request)
        except ApiError as e:
            error = e
        except web.HTTPException as e:  # aiohttp's own: unknown path (404), method (405), body too large (413)
            if e.status < 400:
                raise
            error = ApiError(e.status, e.text or e.reason, e.reason.lower().replace(" ", "_"))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:
            log.error("%s %s failed", request.method, request.path, exc_info=e)
            error = ApiError(500, f"handling the request failed: {type(e).__name__}: {e}", "internal")
        if not error.counted:
            self.metrics.request_errors.labels(error.grpc_code().name).inc()
        return error.response()

    # ---- endpoints --------------------------------------------------------------------------------------
    def _model_entry(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "edgellm"}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_entry()]})

    async def model_by_id(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return web.json_response(self._model_entry())

    def _check_model(self, name: Any) -> None:
        if not isinstance(name, str):
            raise bad_request("'model' is required: the id /v1/models lists", "model")
        if name != self.model:
            raise ApiError(404, f"the model {name!r} does not exist here; this server serves {self.model!r}",
                           "model_not_found", "model")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await self._json(request)
        req, opts = generate_request(body, chat)
        self._check_model(body.get("model"))
        transport = request.transport
        host, port = (transport.get_extra_info("peername") or ("?", 0))[:2] if transport else ("?", 0)
        cert = transport.get_extra_info("peercert") if transport else None
        peer = Peer("tcp", address=f"{host}:{port}", tls=request.secure, client_cert=_subject(cert) if cert else None)
        r = Request(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", peer, asyncio.Queue())
        try:
            await self.service.start(r, req, None)
        except RequestRejected as e:
            self.service.record_refused(r.id, peer, e.code, e.message)
            raise ApiError.from_grpc(e.code, e.message, e.retry_after_s) from None
        answer = Answer(self, r, chat, opts)
        try:
            if opts.stream:
                return await answer.stream(request)
            return web.json_response(await answer.whole())
        finally:
            if not r.ended:  # the client went away (the handler was cancelled), or the answer failed
                self.service.engine.cancel(r.seq)

    async def _json(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            if len(raw) > JSON_IN_THREAD_BYTES:
                return await asyncio.get_running_loop().run_in_executor(None, json.loads, raw)
            return json.loads(raw)
        except ValueError as e:  # also a body that is not UTF-8
            raise bad_request(f"the request body is not valid JSON: {e}") from None


class Answer:
    """One request's engine events as OpenAI's completion object, or its chunks as server-sent events."""

    def __init__(self, door: OpenAIDoor, r: Request, chat: bool, opts: Options):
        self.door, self.r, self.chat, self.opts = door, r, chat, opts
        self.head = {"id": r.id, "object": "chat.completion" if chat else "text_completion",
                     "created": int(time.time()), "model": door.model}
        self.offset = 0  # completions' logprobs: the text offset of the next token
        self.calls = 0  # tool calls sent so far: the next one's index in a stream

    def _finish_reason(self, finished: pb.Finished) -> str:
        """stop or length; "tool_calls" for a reply of calls that ended on its own (not cut short)."""
        if self.calls and finished.reason == pb.FINISH_REASON_STOP:
            return "tool_calls"
        return FINISH_REASONS[finished.reason]

    def _tool_calls(self, calls: Any) -> list[dict[str, Any]]:
        """Calls in OpenAI's shape, numbered on from the calls before them (a stream's delta index)."""
        out = [{"index": self.calls + i, "id": c.id, "type": "function",
                "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(calls)]
        self.calls += len(out)
        return out

    async def _events(self) -> AsyncIterator[tuple[str, Any]]:
        """("tokens", TokenChunk) ... then ("finished", Finished) or ("error", RequestError), as Generate gets them."""
        r = self.r
        while not r.ended:
            _, ev = await r.out.get()
            try:
                yield r.response(ev)
            except Exception as e:
                self.door.service.fail(r, "building the response", e)

    @staticmethod
    def _failure(kind: str, body: Any) -> ApiError | None:
        """The error a request's end stands for, if it did not end with stop or length."""
        if kind == "error":
            return ApiError.from_grpc(STATUS_OF_CODE.get(body.code, grpc.StatusCode.INTERNAL), body.message)
        if body.reason not in FINISH_REASONS:
            return ApiError.from_grpc(FAILED_STATUS.get(body.reason, grpc.StatusCode.INTERNAL),
                                      body.message or "the request ended early")
        return None

    def _usage(self, finished: pb.Finished) -> dict[str, Any]:
        u = finished.usage
        usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                 "total_tokens": u.prompt_tokens + u.completion_tokens}
        if u.cached_prompt_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": u.cached_prompt_tokens}
        return usage

    def _token(self, token_id: int) -> str:
        return self.door.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, chunk: pb.TokenChunk) -> Any:
        """A chunk's logprobs in the endpoint's format: chat's {"content": [...]}, completions' parallel lists."""
        n = self.opts.logprobs
        if self.chat:
            def entry(token_id: int, logprob: float) -> dict[str, Any]:
                text = self._token(token_id)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
            return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t.token_id, t.logprob) for t in lp.top[:n]]}
                                for lp in chunk.logprobs]}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in chunk.logprobs:
            text = self._token(lp.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({self._token(t.token_id): t.logprob for t in lp.top[:n]})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def _merge_logprobs(self, into: Any, more: Any) -> Any:
        if into is None:
            return more
        for key, values in more.items():
            into[key].extend(values)
        return into

    async def whole(self) -> dict[str, Any]:
        """Wait for the end; the completion object."""
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        logprobs = None
        async for kind, body in self._events():
            if kind == "tokens":
                texts.append(body.text)
                if body.tool_calls:
                    calls += self._tool_calls(body.tool_calls)
                if self.opts.logprobs is not None:
                    logprobs = self._merge_logprobs(logprobs, self._logprobs(body))
            elif failure := self._failure(kind, body):
                raise failure
            else:
                finished = body
        text = "".join(texts)
        if self.opts.logprobs is not None and logprobs is None:
            logprobs = self._logprobs(pb.TokenChunk())
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            # A reply of calls has no content (null, as OpenAI's); one cut short keeps its unfinished markup as text.
            choice["message"] = {"role": "assistant", "content": text if text or not calls else None}
            if calls:
                choice["message"]["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs
        choice["finish_reason"] = self._finish_reason(finished)
        return {**self.head, "choices": [choice], "usage": self._usage(finished)}

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: "data: <chunk>\\n\\n" per token chunk, the finish, the usage if asked, "data: [DONE]".

        The headers go out with the first chunk, so a request refused before its first token (e.g. queued when a
        drain begins) still gets an HTTP error status. A client that takes nothing for limits.idle_timeout_s is cut off."""
        head = {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion"}
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": None}
        chunk = {**head, "choices": [choice]}
        response: web.StreamResponse | None = None
        first = True
        idle_s = self.door.config.limits.idle_timeout_s
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as stall:  # armed only while a write waits for the client
                async for kind, body in self._events():
                    if kind == "tokens" and self.chat and not (body.text or body.tool_calls or self.opts.logprobs is not None):
                        continue  # nothing to say (a tool call's markup so far, text held back): no empty deltas
                    failure = self._failure(kind, body) if kind != "tokens" else None
                    if response is None:
                        if failure:
                            raise failure  # nothing sent yet: an HTTP error status
                        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                               "Cache-Control": "no-cache"})
                        stall.reschedule(loop.time() + idle_s)
                        await response.prepare(request)
                    if failure:  # tokens went out already: the error as the last event (OpenAI's clients raise it)
                        events = [failure.body()]
                    elif kind == "tokens":
                        if self.chat:
                            delta = {"role": "assistant"} if first else {}
                            if body.text:
                                delta["content"] = body.text
                            if body.tool_calls:
                                delta["tool_calls"] = self._tool_calls(body.tool_calls)
                            choice["delta"] = delta
                        else:
                            choice["text"] = body.text
                        first = False
                        choice["logprobs"] = self._logprobs(body) if self.opts.logprobs is not None else None
                        events = [chunk]
                    else:
                        if self.chat:
                            choice["delta"] = {"role": "assistant", "content": ""} if first else {}
                        else:
                            choice["text"] = ""
                        choice["logprobs"] = None
                        choice["finish_reason"] = self._finish_reason(body)
                        events = [chunk]
                        if self.opts.include_usage:
                            events.append({**head, "choices": [], "usage": self._usage(body)})
                    data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
                    if kind == "finished" and not failure:
                        data += b"data: [DONE]\n\n"
                    stall.reschedule(loop.time() + idle_s)
                    await response.write(data)
                    stall.reschedule(None)
            await response.write_eof()
        except TimeoutError:
            if response is None:
                raise
            log.info("request %s: cut off a client that read nothing for %gs (limits.idle_timeout_s)", self.r.id, idle_s)
            if request.transport:
                request.transport.abort()
        except ConnectionError:  # the client went away mid-write; _complete cancels the engine request
            if response is None:
                raise
        return response
