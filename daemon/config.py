"""The daemon's YAML configuration, validated at start with messages that name the offending key."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def default_unix_socket() -> str:
    """$XDG_RUNTIME_DIR/edgellm.sock, else a per-user folder under /tmp: shared by `serve` and `chat`."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "edgellm.sock")
    return f"/tmp/edgellm-{os.getuid()}/edgellm.sock"


@dataclass
class ListenConfig:
    unix: str | None = field(default_factory=default_unix_socket)  # Unix socket path; null disables it
    tcp: str | None = None  # "host:port", e.g. "127.0.0.1:50051"; null disables TCP


@dataclass
class EngineConfig:
    slots: int = 4  # requests holding KV cache at once; the cache is allocated for all of them at start
    threads: int = 0  # ONNX Runtime intra-op threads; 0: one per core
    prefill_chunk_tokens: int = 32  # most prompt tokens prefilled per step while others decode (their inter-token latency)
    max_queued: int = 64  # requests waiting for a slot; beyond this new ones get RESOURCE_EXHAUSTED


@dataclass
class GenerationConfig:
    default_max_new_tokens: int = 512  # when a request leaves max_new_tokens unset
    max_stop_sequences: int = 16
    max_stop_length: int = 256  # characters per stop sequence
    max_buffered_chunks: int = 1024  # undelivered chunks per stream before a slow reader's requests are cancelled


@dataclass
class LoggingConfig:
    level: str = "info"  # debug | info | warning | error


@dataclass
class Config:
    bundle: str | None = None  # path of the engine bundle; `serve --bundle` overrides it
    listen: ListenConfig = field(default_factory=ListenConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


_MINIMUMS = {"engine.slots": 1, "engine.threads": 0, "engine.prefill_chunk_tokens": 1, "engine.max_queued": 0,
             "generation.default_max_new_tokens": 1, "generation.max_stop_sequences": 0,
             "generation.max_stop_length": 1, "generation.max_buffered_chunks": 1}
_CHOICES = {"logging.level": ("debug", "info", "warning", "error")}


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}' (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in data.items():
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value if value is not None else {}, key + ".")
            continue
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if value is None and type(None) in allowed:
            values[name] = None
            continue
        base = next(t for t in allowed if t is not type(None))
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, base) or (base is int and isinstance(value, bool)):
            raise ConfigError(f"'{key}' must be {base.__name__}, got {value!r}")
        if key in _MINIMUMS and value < _MINIMUMS[key]:
            raise ConfigError(f"'{key}' must be at least {_MINIMUMS[key]}, got {value}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"'{key}' must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        values[name] = value
    return cls(**values)


def parse_config(data: Any) -> Config:
    """Validate a parsed YAML document (None means all defaults)."""
    cfg = _build(Config, data if data is not None else {}, "")
    if not cfg.listen.unix and not cfg.listen.tcp:
        raise ConfigError("'listen': at least one of 'listen.unix' and 'listen.tcp' must be set")
    return cfg


def load_config(path: str | os.PathLike | None) -> Config:
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return parse_config(data)
