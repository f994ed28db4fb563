"""The daemon's log: where it goes (stderr, i.e. journald under systemd, or a file reopened on SIGHUP),
the one structured line (logfmt) written at the end of every request, and lines that clients can trigger at
will, throttled."""

from __future__ import annotations

import logging
import sys
import time

from daemon.config import LoggingConfig

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
request_log = logging.getLogger("edgellm.requests")


def configure_logging(cfg: LoggingConfig, level: str | None = None) -> logging.Handler:
    """Send every edgellm log record to stderr or cfg.file, at `level` (else cfg.level)."""
    handler: logging.Handler = logging.FileHandler(cfg.file, encoding="utf-8") if cfg.file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.set_name("edgellm")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "edgellm"]:  # ours from an earlier call only
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel((level or cfg.level).upper())
    return handler


def reopen_log_files() -> None:
    """SIGHUP: reopen log files, so a rotated log is released and a fresh one started."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            with handler.lock:
                handler.close()  # the next record reopens the file at its path
                handler.stream = handler._open()


def _value(v: object) -> str:
    text = str(v)
    if text == "" or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def log_request(**fields: object) -> None:
    """One logfmt line: `request id=... peer=... priority=... prompt_tokens=... ... reason=...`."""
    if request_log.isEnabledFor(logging.INFO):
        request_log.info("request " + " ".join(f"{k}={_value(v)}" for k, v in fields.items()))


class ThrottledLog:
    """At most one warning per `every_s` seconds, counting the ones left out: clients cannot flood the log."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0):
        self.logger, self.every_s = logger, every_s
        self._next = 0.0
        self._left_out = 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._left_out += 1
            return
        if self._left_out:
            message += f" ({self._left_out} more like it since the last such line)"
        self._next, self._left_out = now + self.every_s, 0
        self.logger.warning(message)
