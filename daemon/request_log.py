"""The daemon's log: where it goes (stderr, i.e. journald under systemd, or a file reopened on SIGHUP), in
which format (text lines, or JSON objects for log shippers), the one structured line (logfmt) written at the
end of every request, and lines that clients can trigger at will, throttled.

Logged values can come from clients (ids, addresses, certificate subjects, error messages): every control
character in them is escaped, so that no client can start a line of its own or hide one from a terminal. No
prompt or generated text is logged, at any level (docs/security.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from datetime import datetime, timezone

from daemon.config import LoggingConfig

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
request_log = logging.getLogger("edgellm.requests")

# C0, DEL and C1 controls, the Unicode line and paragraph separators (some viewers break lines at them), and the
# bidirectional overrides and isolates (they reorder what a terminal shows).
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    c = match.group()
    return _SHORT_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_controls(text: str) -> str:
    """`text` with each control character (CONTROL_CHARS) written as an escape: \\n, \\t, \\x1b, \\u2028."""
    return CONTROL_CHARS.sub(_escape, text)


class TextFormatter(logging.Formatter):
    """FORMAT, one line per record: the message's control characters escaped, a traceback's lines indented
    (a line that starts in the first column is always the start of a record)."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {escape_controls(record.getMessage())}"
        extra = [self.formatException(record.exc_info)] if record.exc_info else []
        extra += [self.formatStack(record.stack_info)] if record.stack_info else []
        for text in extra:
            line += "".join("\n    " + escape_controls(part) for part in text.split("\n"))
        return line


# Within a JSON string (the only place json.dumps puts them) these may be written as \u escapes (four hex digits).
_JSON_UNSAFE = re.compile(r"[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message; `request` holds a request-log line's
    fields; `exception` a traceback. json.dumps escapes C0; DEL, C1 and the Unicode separators are escaped here."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "request_fields", None)
        if fields:
            entry["request"] = {k: v if v is None or isinstance(v, (bool, int, float)) else str(v) for k, v in fields.items()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(entry, ensure_ascii=False))


class PrivateFileHandler(logging.FileHandler):
    """A log file the daemon creates is 0600 (a file already there keeps its mode): the request lines say who
    used the model and when, which other users of the machine need not read."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def configure_logging(cfg: LoggingConfig, level: str | None = None) -> logging.Handler:
    """Send every edgellm log record to stderr or cfg.file, at `level` (else cfg.level), in cfg.format."""
    handler: logging.Handler = PrivateFileHandler(cfg.file, encoding="utf-8") if cfg.file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if cfg.format == "json" else TextFormatter())
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


def logfmt_value(v: object) -> str:
    """A logfmt value: quoted where it holds a space, quote, "=", backslash or control character, which are escaped."""
    text = str(v)
    if text == "" or any(c in text for c in ' "=\\') or CONTROL_CHARS.search(text):
        return '"' + escape_controls(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'
    return text


def log_request(**fields: object) -> None:
    """One logfmt line: `request id=... peer=... priority=... prompt_tokens=... ... reason=...` (in the JSON
    format, the fields also as the object `request`)."""
    if request_log.isEnabledFor(logging.INFO):
        request_log.info("request " + " ".join(f"{k}={logfmt_value(v)}" for k, v in fields.items()),
                         extra={"request_fields": fields})


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
