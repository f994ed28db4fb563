"""Where and how a client connects: the gRPC target, TLS credentials, the bearer token, channel options."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from edgellm.socket_trust import check_socket_owner, default_unix_socket


def grpc_target(address: str) -> str:
    """'unix:/path', '/path' (a Unix socket) or 'host:port' -> a gRPC target string (others pass through)."""
    if address.startswith("unix:"):
        return address
    if address.startswith("/") or address.startswith("."):
        return f"unix:{address}"
    return address


def _ip_literal(host_port: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    host = host_port.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host_port!r}: a list of addresses takes IP literals (host:port); for a name with "
                         f"several addresses use one 'dns:///name:port' target") from None


def list_target(addresses: Sequence[str]) -> str:
    """Several daemons' 'ip:port' as one static gRPC target ('ipv4:a,b' / 'ipv6:[a]:p,...'), for round_robin."""
    versions = {_ip_literal(a).version for a in addresses}
    if len(versions) != 1:
        raise ValueError("a list of addresses must be all IPv4 or all IPv6")
    return f"ipv{versions.pop()}:" + ",".join(addresses)


@dataclass
class Connection:
    """What every call of a client needs: the target, its credentials (None: plaintext), options, metadata."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: list[tuple[str, object]] = field(default_factory=list)
    metadata: tuple[tuple[str, str], ...] = ()
    address: str = ""  # as the user gave it (for messages)


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror}") from None


def connection(address: str | Sequence[str] | None = None, *, tls: bool = False, ca_cert: str | None = None,
               client_cert: str | None = None, client_key: str | None = None, token: str | None = None,
               server_name: str | None = None, load_balancing: str = "round_robin",
               options: Sequence[tuple[str, object]] = ()) -> Connection:
    """Resolve the client options into a Connection (see Client for what they mean).

    The default address is the daemon's default Unix socket, checked first: a socket another user could have
    put there gets UntrustedSocket (edgellm.socket_trust), before anything is sent to it."""
    if address is None:
        path = default_unix_socket()
        check_socket_owner(path)
        target, shown = f"unix:{path}", path
    elif isinstance(address, str):
        target, shown = grpc_target(address), address
    else:
        if not address:
            raise ValueError("an empty list of addresses")
        target, shown = list_target(list(address)), ",".join(address)
    if (client_cert is None) != (client_key is None):
        raise ValueError("mutual TLS needs both client_cert and client_key")
    credentials = None
    if tls or ca_cert or client_cert:
        if target.startswith("unix:"):
            raise ValueError("TLS is for TCP addresses; a Unix socket is checked by the kernel's peer credentials")
        credentials = grpc.ssl_channel_credentials(root_certificates=_read(ca_cert, "ca_cert"),
                                                   private_key=_read(client_key, "client_key"),
                                                   certificate_chain=_read(client_cert, "client_cert"))
    opts: list[tuple[str, object]] = [("grpc.lb_policy_name", load_balancing)]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    opts += list(options)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return Connection(target, credentials, opts, metadata, shown)


def sync_channel(c: Connection) -> grpc.Channel:
    if c.credentials is None:
        return grpc.insecure_channel(c.target, options=c.options)
    return grpc.secure_channel(c.target, c.credentials, options=c.options)


def aio_channel(c: Connection) -> grpc.aio.Channel:
    if c.credentials is None:
        return grpc.aio.insecure_channel(c.target, options=c.options)
    return grpc.aio.secure_channel(c.target, c.credentials, options=c.options)
