"""The front door: the daemon's public listening sockets, and a relay from each client to the gRPC server.

grpc.aio can neither adopt an already-listening socket (systemd socket activation) nor tell a
handler who is at the other end of a Unix socket, nor refuse a TLS client without a certificate
with a gRPC status. So the gRPC server listens only on a private socket (a 0700 folder), and this
module owns the public sockets: it accepts each client (on a socket it bound, or one inherited from
systemd), reads its identity (SO_PEERCRED on Unix; address and verified certificate on TCP, where it
also terminates TLS), and relays the bytes to the gRPC server from a socket bound to a fresh name
that gRPC then reports as the call's peer (`access.Connections`). It runs on its own thread and
event loop so relaying never competes with the gRPC handlers' loop.
"""

from __future__ import annotations

import asyncio
import grp
import itertools
import logging
import os
import socket
import ssl
import struct
import threading

from daemon.access import Connections, Peer
from daemon.config import split_host_port

log = logging.getLogger("edgellm.front")

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
RELAY_CHUNK = 64 * 1024
RELAY_GRACE_S = 5.0  # at stop: how long relays may take to deliver what the stopped gRPC server wrote last


def unix_listener(path: str, mode: str, group: str | None) -> socket.socket:
    """Bind and listen on a Unix socket with the configured mode and group (the folder exists already)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, int(mode, 8))
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"listen.unix_group: no group named {group!r}") from None
        os.chown(path, -1, gid)
    sock.listen(128)
    return sock


def tcp_listener(address: str) -> socket.socket:
    """Bind and listen on "host:port" ("[::1]:50051" for IPv6; port 0 picks a free one)."""
    host, port = split_host_port(address, "listen.tcp")  # again here: `serve --tcp` skips parse_config
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(128)
    return sock


def address_of(sock: socket.socket) -> str:
    """How clients reach a listening socket: "unix:/path" or "host:port"."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    host = f"[{name[0]}]" if sock.family == socket.AF_INET6 else name[0]
    return f"{host}:{name[1]}"


def unix_peer(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
        groups = struct.unpack(f"{len(raw) // 4}I", raw)
    except OSError:  # an older kernel, or more than 256 groups: the primary gid still counts
        groups = ()
    return Peer("unix", uid=uid, gid=gid, pid=pid, groups=tuple(groups))


def _subject(cert: dict) -> str:
    return ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)


class FrontDoor:
    """Accepts clients on the public sockets and relays each one to the gRPC server's private socket."""

    def __init__(self, grpc_path: str, relay_dir: str, connections: Connections, tls: ssl.SSLContext | None):
        self.grpc_path = grpc_path
        self.relay_dir = relay_dir
        self.connections = connections
        self.tls = tls
        self.listeners: list[socket.socket] = []
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_error)
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgellm-front", daemon=True)
        self._servers: list[asyncio.AbstractServer] = []
        self._relays: set[asyncio.Task] = set()
        self._names = itertools.count()

    def add(self, sock: socket.socket) -> None:
        self.listeners.append(sock)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    async def _listen(self) -> None:
        for sock in self.listeners:
            sock.setblocking(False)
            if sock.family == socket.AF_UNIX:
                server = await asyncio.start_unix_server(self._accepted, sock=sock)
            else:
                server = await asyncio.start_server(self._accepted, sock=sock, ssl=self.tls,
                                                    ssl_handshake_timeout=10 if self.tls else None)
            self._servers.append(server)

    def stop(self) -> None:
        """Stop accepting, let the relays forward what the (stopped) gRPC server wrote last, end the thread."""
        async def close() -> None:
            for server in self._servers:
                server.close()
            # Each relay ends once the gRPC server has closed its side and the bytes before that are delivered.
            _, late = await asyncio.wait(self._relays, timeout=RELAY_GRACE_S) if self._relays else ((), ())
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(RELAY_GRACE_S + 10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # A client that fails the TLS handshake or resets its connection is its own problem, not an error here.
        log.debug("connection: %s", context.get("message"), exc_info=context.get("exception"))

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._relays.add(task)
        sock = writer.get_extra_info("socket")
        if sock.family == socket.AF_UNIX:
            peer = unix_peer(sock)
        else:
            host, port = writer.get_extra_info("peername")[:2]
            tls = writer.get_extra_info("ssl_object")
            cert = tls.getpeercert() if tls is not None else None
            peer = Peer("tcp", address=f"{host}:{port}", tls=tls is not None, client_cert=_subject(cert) if cert else None)
        relay_path = os.path.join(self.relay_dir, f"c{next(self._names)}")
        inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The bound name is what gRPC reports as this connection's peer; the file itself is not needed.
            inner.bind(relay_path)
            os.unlink(relay_path)
            inner.setblocking(False)
            self.connections.add(relay_path, peer)
            await self._loop.sock_connect(inner, self.grpc_path)
            inner_reader, inner_writer = await asyncio.open_unix_connection(sock=inner)
            await asyncio.gather(_pipe(reader, inner_writer), _pipe(inner_reader, writer))
        except OSError as e:
            log.warning("cannot relay %s to the gRPC server: %s", peer.describe(), e)
        finally:
            self.connections.remove(relay_path)
            writer.close()
            inner.close()
            self._relays.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, waiting for the far side to take each chunk (backpressure), then close it."""
    try:
        while data := await reader.read(RELAY_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        writer.close()
