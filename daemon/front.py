"""The front door: the daemon's public listening sockets, and a relay from each client to the gRPC server.

grpc.aio can neither adopt an already-listening socket (systemd socket activation) nor tell a
handler who is at the other end of a Unix socket, nor refuse a TLS client without a certificate
with a gRPC status. So the gRPC server listens only on a private socket (a 0700 folder), and this
module owns the public sockets: it accepts each client (on a socket it bound, or one inherited from
systemd), reads its identity (SO_PEERCRED on Unix; address and verified certificate on TCP, where it
also terminates TLS), and relays the bytes to the gRPC server from a socket bound to a fresh name
that gRPC then reports as the call's peer (`access.Connections`). It runs on its own thread and
event loop so relaying never competes with the gRPC handlers' loop.

Each relayed client costs 3 file descriptors (its socket, the relay's socket to the gRPC server, and the
gRPC server's end of that), so the front door bounds the connections open at once below the open-file
limit and closes any beyond at once (docs/limits.md). The Prometheus endpoint, when configured, is
served on the same loop (`daemon.metrics.MetricsEndpoint`).
"""

from __future__ import annotations

import asyncio
import errno
import grp
import itertools
import logging
import os
import resource
import shutil
import socket
import ssl
import stat
import struct
import tempfile
import threading
from pathlib import Path
from typing import Callable

from daemon.access import Connections, Peer
from daemon.config import split_host_port
from daemon.metrics import METRICS_MAX_CONNECTIONS, MetricsEndpoint
from daemon.request_log import ThrottledLog

log = logging.getLogger("edgellm.front")

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
RELAY_CHUNK = 64 * 1024
RELAY_GRACE_S = 5.0  # at stop: how long relays may take to deliver what the stopped gRPC server wrote last
RELAY_DIR_PREFIX = "edgellm-relay-"  # + "<pid>-<random>": a folder whose daemon is gone can be told apart
FDS_PER_CONNECTION = 3  # the client's socket, the relay's socket to the gRPC server, the gRPC server's end of it
# asyncio accepts up to this many connections in one go (the listen backlog it sets) before any is counted
# against the bound, and closed if beyond it.
ACCEPT_BATCH = 100
# Descriptors kept for everything but client connections: the daemon's own (listeners, the model's files,
# gRPC's and ONNX Runtime's internals, logs, a GPU's device nodes), a batch of connections accepted but not
# yet counted, and the metrics endpoint's connections and its own accept batch (docs/limits.md).
FD_RESERVE = 96 + ACCEPT_BATCH + 2 * METRICS_MAX_CONNECTIONS


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (say what it is) and return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("open files: cannot raise the soft limit %d to the hard limit %d: %s", soft, hard, e)
            return soft
        log.info("open files: soft limit raised from %d to the hard limit, %d", soft, hard)
        return hard
    log.info("open files: soft limit %s (hard limit %s)", _limit(soft), _limit(hard))
    return soft


def _limit(n: int) -> str:
    return "unlimited" if n == resource.RLIM_INFINITY else str(n)


def connection_bound(max_connections: int, open_file_limit: int | None = None) -> int:
    """limits.max_connections, lowered (with a log line) where the open-file limit could not hold that many."""
    if open_file_limit is None:
        open_file_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if open_file_limit == resource.RLIM_INFINITY:
        return max_connections
    fits = max(1, (open_file_limit - FD_RESERVE) // FDS_PER_CONNECTION)
    if fits < max_connections:
        log.warning("limits.max_connections: %d lowered to %d to fit the open-file limit (%d: %d per connection, "
                    "%d kept for the rest)", max_connections, fits, open_file_limit, FDS_PER_CONNECTION, FD_RESERVE)
        return fits
    return max_connections


def make_relay_dir() -> str:
    """A private (0700) folder for the gRPC server's socket and the relays' names, marked with this process's id."""
    return tempfile.mkdtemp(prefix=f"{RELAY_DIR_PREFIX}{os.getpid()}-")


def remove_stale_relay_dirs(folder: str | None = None) -> list[str]:
    """Remove the relay folders of this user's daemons that were killed before they could (SIGKILL)."""
    removed = []
    for path in Path(folder or tempfile.gettempdir()).glob(RELAY_DIR_PREFIX + "*"):
        pid = path.name[len(RELAY_DIR_PREFIX):].split("-", 1)[0]
        try:
            st = path.lstat()
        except OSError:
            continue
        if not pid.isdigit() or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by daemon process %s, which is gone", path, pid)
        removed.append(str(path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process now has this id
        pass
    return True


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


def tcp_listener(address: str, key: str = "listen.tcp") -> socket.socket:
    """Bind and listen on "host:port" ("[::1]:50051" for IPv6; port 0 picks a free one); errors name `key`."""
    host, port = split_host_port(address, key)  # again here: `serve --tcp` skips parse_config
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"{key}: cannot listen on {address}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(f"{key}: cannot listen on {address}: {e.strerror or e}") from None
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

    def __init__(self, grpc_path: str, relay_dir: str, connections: Connections, tls: ssl.SSLContext | None,
                 max_connections: int = 512, handshake_timeout_s: float = 10.0, idle_timeout_s: float = 120.0,
                 on_refused: Callable[[], None] | None = None):
        """`max_connections`: the bound (see connection_bound); `on_refused` is called for each connection closed at
        it; `idle_timeout_s`: how long a client may leave what is sent to it unread."""
        self.grpc_path = grpc_path
        self.relay_dir = relay_dir
        self.connections = connections
        self.tls = tls
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.on_refused = on_refused
        self.open_connections = 0  # in the TLS handshake or relayed; read by a gauge from other threads
        self.metrics: MetricsEndpoint | None = None
        self.listeners: list[socket.socket] = []
        self._refused_log = ThrottledLog(log)  # a client can open connections at will: not a line for each
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_error)
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgellm-front", daemon=True)
        self._servers: list[asyncio.AbstractServer] = []
        self._relays: set[asyncio.Task] = set()
        self._names = itertools.count()

    def add(self, sock: socket.socket) -> None:
        self.listeners.append(sock)

    def serve_metrics(self, endpoint: MetricsEndpoint) -> None:
        """Serve `endpoint` on this loop from start() to stop()."""
        self.metrics = endpoint

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    async def _listen(self) -> None:
        for sock in self.listeners:
            sock.setblocking(False)
            if sock.family == socket.AF_UNIX:
                server = await asyncio.start_unix_server(self._accepted, sock=sock, backlog=ACCEPT_BATCH)
            else:
                # TLS starts in _accepted, once the connection counts against the bound.
                server = await asyncio.start_server(self._accepted, sock=sock, backlog=ACCEPT_BATCH)
            self._servers.append(server)
        if self.metrics:
            await self.metrics.start()

    def stop(self) -> None:
        """Stop accepting, let the relays forward what the (stopped) gRPC server wrote last, end the thread."""
        async def close() -> None:
            for server in self._servers:
                server.close()
            if self.metrics:
                await self.metrics.close()
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
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):  # accept() is paused a second
            log.warning("out of file descriptors: %s (see limits.max_connections in docs/limits.md)", error)
            return
        # A client that fails the TLS handshake or resets its connection is its own problem, not an error here.
        log.debug("connection: %s", context.get("message"), exc_info=error)

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Close a connection beyond the bound at once: it costs one descriptor for no longer than this."""
        writer.transport.abort()
        if self.on_refused:
            self.on_refused()
        self._refused_log.warning(f"a connection refused: {self.open_connections} open is the bound "
                                  "(limits.max_connections)")

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self.max_connections:
            self._refuse(writer)
            return
        self.open_connections += 1
        task = asyncio.current_task()
        self._relays.add(task)
        try:
            sock = writer.get_extra_info("socket")
            if sock.family == socket.AF_UNIX:
                peer = unix_peer(sock)
            else:
                host, port = writer.get_extra_info("peername")[:2]
                cert = None
                if self.tls:
                    await writer.start_tls(self.tls, ssl_handshake_timeout=self.handshake_timeout_s)
                    cert = writer.get_extra_info("ssl_object").getpeercert()
                peer = Peer("tcp", address=f"{host}:{port}", tls=self.tls is not None,
                            client_cert=_subject(cert) if cert else None)
            await self._relay(reader, writer, peer)
        except asyncio.CancelledError:  # the front door stops: what the client has not taken is dropped
            writer.transport.abort()
            raise
        except OSError as e:  # a failed or timed-out TLS handshake (ssl.SSLError, ConnectionAbortedError), a reset
            log.debug("connection closed before it was relayed: %s", e)
        finally:
            self.open_connections -= 1
            writer.close()
            self._relays.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer) -> None:
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
            await asyncio.gather(_pipe(reader, inner_writer), _pipe(inner_reader, writer, self.idle_timeout_s))
        except OSError as e:
            log.warning("cannot relay %s to the gRPC server: %s", peer.describe(), e)
        finally:
            self.connections.remove(relay_path)
            inner.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stall_timeout_s: float | None = None) -> None:
    """Copy until EOF, waiting for the far side to take each chunk (backpressure), then close it.

    A far side that takes nothing for `stall_timeout_s` while data waits for it is cut off: a client that
    stops reading would otherwise hold its connection (and a call the gRPC server cannot finish) forever."""
    try:
        while data := await reader.read(RELAY_CHUNK):
            if writer.transport.is_closing():  # the far side is gone
                break
            writer.write(data)
            if writer.transport.get_write_buffer_size():  # only then can drain() wait: no timer per chunk otherwise
                async with asyncio.timeout(stall_timeout_s):
                    await writer.drain()
    except TimeoutError:
        log.info("relay: cut off a client that read nothing for %gs (limits.idle_timeout_s)", stall_timeout_s)
        writer.transport.abort()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        writer.close()
