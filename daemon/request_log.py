"""The daemon's log: where it goes (stderr, i.e. journald under systemd, or a file reopened on SIGHUP),
and the one structured line (logfmt) written at the end of every request."""

from __future__ import annotations

import logging
import sys

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
