"""The two systemd protocols the daemon speaks, written out by hand (no libsystemd binding).

sd_notify: datagrams of "KEY=value" lines to the socket named by $NOTIFY_SOCKET (READY=1,
STATUS=..., WATCHDOG=1, STOPPING=1). Socket activation: listening sockets handed over as file
descriptors 3, 4, ... with $LISTEN_FDS (their count) and $LISTEN_PID (the process they are for).
Both are no-ops outside systemd, so the same daemon runs from a terminal unchanged.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger("edgellm.systemd")

LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages; rate-limits watchdog pings to a quarter of the watchdog interval."""

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        if self.address and self.address.startswith("@"):  # an abstract socket name
            self.address = "\0" + self.address[1:]
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # sd_watchdog_enabled(): WATCHDOG_USEC, for us unless WATCHDOG_PID names another process.
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._last_ping = 0.0
        self._lock = threading.Lock()  # called from the engine thread and the event loop

    def send(self, *lines: str) -> bool:
        """Send one datagram of KEY=value lines; False (never an exception) when it cannot be sent."""
        if self._sock is None:
            return False
        try:
            with self._lock:
                self._sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self.address)
            return True
        except OSError as e:  # systemd gone or its queue full: the service goes on
            log.debug("sd_notify failed: %s", e)
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def progress(self) -> None:
        """The engine loop made progress (a step, or an idle wake-up): ping the watchdog, at most 4× per interval."""
        if self.watchdog_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_s / 4:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_sockets(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets systemd passed to this process (socket activation), in order; [] when none.

    Unsets LISTEN_* so children do not take them, and refuses anything that is not a listening stream
    socket (a misconfigured .socket unit) with a ValueError naming the descriptor.
    """
    env = os.environ if environ is None else environ
    count, pid = env.get("LISTEN_FDS", ""), env.get("LISTEN_PID", "")
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if not count or pid != str(os.getpid()):
        return []
    if not count.isdigit():
        raise ValueError(f"LISTEN_FDS must be a number, got {count!r}")
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise ValueError(f"LISTEN_FDS: descriptor {fd} is not a socket ({e.strerror})") from None
        os.set_inheritable(fd, False)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"LISTEN_FDS: descriptor {fd} is not a listening stream socket "
                             "(the .socket unit needs ListenStream=)")
        if sock.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"LISTEN_FDS: descriptor {fd} has unsupported address family {sock.family!r}")
        sockets.append(sock)
    return sockets
