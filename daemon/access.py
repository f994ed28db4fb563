"""Who may call: the identity of each client connection, and the checks every RPC passes first.

The front door (`daemon/front.py`) accepts every client connection itself, so it knows the peer for
certain: the kernel's SO_PEERCRED/SO_PEERGROUPS on a Unix socket, the address and the verified
client certificate on TCP. It records a `Peer` per connection under the name of the relay socket
it opens to the gRPC server, which gRPC reports as `context.peer()`; `AccessGuard` maps the call
back to that `Peer` and refuses it with a gRPC status before any handler runs:
UNAUTHENTICATED (TCP: no client certificate under mutual TLS, a missing or wrong bearer token),
PERMISSION_DENIED (Unix: a uid/gid outside the allow-list).
"""

from __future__ import annotations

import hmac
import inspect
import os
import ssl
import stat
from dataclasses import dataclass, field
from typing import Callable

import grpc

from daemon.config import AccessConfig

Refusal = tuple[grpc.StatusCode, str]


@dataclass(eq=False)
class Peer:
    """One client connection as the front door saw it."""

    transport: str  # "unix" or "tcp"
    address: str = ""  # tcp: "host:port"
    uid: int | None = None  # unix: from SO_PEERCRED
    gid: int | None = None
    pid: int | None = None
    groups: tuple[int, ...] = ()  # unix: supplementary groups (SO_PEERGROUPS)
    tls: bool = False
    client_cert: str | None = None  # tcp + mTLS: the verified certificate's subject
    live: int = 0  # requests of this connection running or queued (owned by the event loop)

    def log_fields(self) -> dict[str, object]:
        """Who this is, as request-log fields: peer=unix uid= gid= pid=, or peer=tcp:host:port / tls:host:port client_cert=."""
        if self.transport == "unix":
            return {"peer": "unix", "uid": self.uid, "gid": self.gid, "pid": self.pid}
        fields: dict[str, object] = {"peer": f"{'tls' if self.tls else self.transport}:{self.address}"}
        if self.client_cert:
            fields["client_cert"] = self.client_cert
        return fields

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.log_fields().items())


@dataclass
class Connections:
    """Live client connections by the relay socket name gRPC reports as their peer ("unix:<path>")."""

    peers: dict[str, Peer] = field(default_factory=dict)

    def add(self, relay_path: str, peer: Peer) -> None:
        self.peers["unix:" + relay_path] = peer

    def remove(self, relay_path: str) -> None:
        self.peers.pop("unix:" + relay_path, None)

    def of(self, context: grpc.aio.ServicerContext) -> Peer:
        """The call's connection; one the front door did not register is a fresh Peer("unknown"), fresh so that
        unrelated callers never share its per-connection request count."""
        return self.peers.get(context.peer()) or Peer("unknown")


def read_token(path: str) -> str:
    """The bearer token from its file (whitespace trimmed); refuses an empty or world-readable file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"access.token_file: cannot read {path}: {e.strerror}") from None
    if st.st_mode & stat.S_IRWXO:
        raise ValueError(f"access.token_file {path} is readable by everyone (mode {stat.S_IMODE(st.st_mode):04o}); "
                         "make it 0600 or 0640")
    with open(path) as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"access.token_file {path} is empty")
    return token


def server_tls_context(cfg: AccessConfig) -> ssl.SSLContext | None:
    """TLS for TCP clients (HTTP/2 via ALPN), or None when no certificate is configured.

    With a client CA, a client certificate is requested and, when sent, must chain to that CA
    (CERT_OPTIONAL): a client that sends none completes the handshake and each call is refused with
    UNAUTHENTICATED, which says more than the handshake failure a required certificate would give.
    """
    if not cfg.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"access.tls_cert/tls_key: cannot load {cfg.tls_cert} and {cfg.tls_key}: {e}") from None
    ctx.set_alpn_protocols(["h2"])
    if cfg.tls_client_ca:
        try:
            ctx.load_verify_locations(cafile=cfg.tls_client_ca)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"access.tls_client_ca: cannot load {cfg.tls_client_ca}: {e}") from None
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class AccessGuard(grpc.aio.ServerInterceptor):
    """Checks the connection (and the token) of every call before its handler runs."""

    def __init__(self, cfg: AccessConfig, connections: Connections, token: str | None,
                 on_refused: Callable[[grpc.StatusCode], None] = lambda code: None):
        self.allow_uids = frozenset(cfg.allow_uids) if cfg.allow_uids is not None else None
        self.allow_gids = frozenset(cfg.allow_gids) if cfg.allow_gids is not None else None
        self.require_client_cert = bool(cfg.tls_client_ca)
        self.connections = connections
        self.token = token
        self.on_refused = on_refused

    def refusal(self, peer: Peer, metadata: dict[str, str]) -> Refusal | None:
        if peer.transport == "unknown":  # the relay always registers first: this is not a front-door connection
            return grpc.StatusCode.PERMISSION_DENIED, "unknown connection"
        if peer.transport == "unix":
            if self.allow_uids is None and self.allow_gids is None:
                return None
            if peer.uid in (self.allow_uids or ()) or not (self.allow_gids or frozenset()).isdisjoint({peer.gid, *peer.groups}):
                return None
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"uid {peer.uid} (gid {peer.gid}) is not allowed to use this socket (access.allow_uids/allow_gids)")
        if self.require_client_cert and not peer.client_cert:
            return grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required (mutual TLS)"
        if self.token is not None:
            sent = metadata.get("authorization", "")
            scheme, _, value = sent.partition(" ")
            if scheme.lower() != "bearer" or not value:
                return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token (metadata 'authorization: Bearer <token>')"
            if not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                return grpc.StatusCode.UNAUTHENTICATED, "wrong bearer token"
        return None

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}

        def check(context) -> Refusal | None:
            refused = self.refusal(self.connections.of(context), metadata)
            if refused:
                self.on_refused(refused[0])
            return refused

        return _guarded(handler, check)


_FACTORIES = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
              (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
_BEHAVIORS = {(False, False): "unary_unary", (False, True): "unary_stream",
              (True, False): "stream_unary", (True, True): "stream_stream"}


def _guarded(handler: grpc.RpcMethodHandler, check: Callable) -> grpc.RpcMethodHandler:
    """The same handler with `check` run first; keeps its kind (async or sync, streaming or not)."""
    kind = (handler.request_streaming, handler.response_streaming)
    behavior = getattr(handler, _BEHAVIORS[kind])
    if inspect.isasyncgenfunction(behavior):
        async def guarded(request, context):
            if refused := check(context):
                await context.abort(*refused)
            async for item in behavior(request, context):
                yield item
    elif inspect.iscoroutinefunction(behavior):
        async def guarded(request, context):
            if refused := check(context):
                await context.abort(*refused)
            return await behavior(request, context)
    elif inspect.isgeneratorfunction(behavior):
        def guarded(request, context):
            if refused := check(context):
                context.abort(*refused)
            yield from behavior(request, context)
    else:
        def guarded(request, context):
            if refused := check(context):
                context.abort(*refused)
            return behavior(request, context)
    return _FACTORIES[kind](guarded, request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
