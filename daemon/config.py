"""The daemon's YAML configuration, validated at start with messages that name the offending key."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from edgellm.socket_trust import default_unix_socket


def cache_home() -> Path:
    """Where edgellm keeps what it builds and caches (the demo bundle, prefix-cache snapshots): $EDGELLM_CACHE,
    else $XDG_CACHE_HOME/edgellm, else ~/.cache/edgellm."""
    if os.environ.get("EDGELLM_CACHE"):
        return Path(os.environ["EDGELLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgellm"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def split_host_port(address: str, field_name: str) -> tuple[str, int]:
    """"host:port" ("[::1]:50051" for IPv6; port 0 picks a free one) -> (host, port), brackets removed."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"'{field_name}' must be host:port (e.g. \"127.0.0.1:50051\"), got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback_host(host: str) -> bool | None:
    """Whether a listener's host is loopback: known for "localhost" and IP literals, None for other names."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return None  # a name: judged on the address it is bound to (check_tcp_exposure at start)


def check_tcp_exposure(listen: ListenConfig, access: AccessConfig, address: str, key: str = "listen.tcp") -> str | None:
    """Protected mode for a TCP listener on `address` ("host:port"): raise ConfigError where it may not serve as
    configured; the warning to log where listen.allow_insecure_tcp lets it serve unprotected; else None.

    Loopback (127.0.0.0/8, ::1, localhost) is reachable from this machine only and is served as configured.
    Elsewhere the network can read and forge what travels, so TLS is needed, and anyone who reaches the
    port can call, so the client must prove itself: a bearer token or a client certificate."""
    host, _ = split_host_port(address, key)
    if is_loopback_host(host) is not False:  # a host name is judged again on the address bound at start
        return None
    tls, token, client_ca = access.tls_cert is not None, access.token_file is not None, access.tls_client_ca is not None
    if token and not tls:  # never allowed: the token would travel in clear, for anyone on the path to reuse
        raise ConfigError(f"{key}: {address} is not a loopback address and access.token_file is set without TLS: "
                          f"the token would travel in clear text; set access.tls_cert and access.tls_key "
                          f"(listen.allow_insecure_tcp does not lift this)")
    if tls and (token or client_ca):
        return None
    missing = ([] if tls else ["TLS (access.tls_cert and access.tls_key)"]) + \
        ([] if token or client_ca else ["client authentication (access.token_file or access.tls_client_ca)"])
    if listen.allow_insecure_tcp:
        return (f"{key}: {address} without {' and without '.join(missing)} (listen.allow_insecure_tcp: true): "
                f"whoever reaches the port can send requests" + ("" if tls else " and read them in clear text"))
    raise ConfigError(f"{key}: {address} is not a loopback address and has no {' and no '.join(missing)}: "
                      f"anyone who reaches the port could use the model" + ("" if tls else " and read the prompts") +
                      "; set those keys, listen on 127.0.0.1 instead, or set listen.allow_insecure_tcp: true "
                      "to serve it unprotected anyway")


@dataclass
class ListenConfig:
    unix: str | None = field(default_factory=default_unix_socket)  # Unix socket path; null disables it
    tcp: str | None = None  # "host:port", e.g. "127.0.0.1:50051"; null disables TCP
    unix_mode: str = "0660"  # octal file mode of the Unix socket the daemon creates
    unix_group: str | None = None  # group (name or id) of that socket; null: the daemon's group
    # TCP on an address other than loopback needs TLS plus a token or client certificates (docs/security.md);
    # true serves it without them anyway, with a warning at start. A token without TLS is refused regardless.
    allow_insecure_tcp: bool = False


@dataclass
class EngineConfig:
    slots: int = 4  # requests holding KV cache at once; the cache is allocated for all of them at start
    threads: int = 0  # ONNX Runtime intra-op threads; 0: one per allowed CPU
    pin_threads: bool = True  # CPU backend: the step's threads and the gRPC side's on fixed CPUs (daemon/thread_placement.py)
    # Most prompt tokens in one step while others decode (shared by the prompts being prefilled): the step's
    # time, so the decoding requests' inter-token latency, against time to first token (docs/scheduling.md).
    prefill_chunk_tokens: int = 16
    # Decode rows and prompt chunks in one forward pass (the weights read once); false: a prefill call, then a
    # decode call, one chunk of one prompt per step (docs/mixed-steps.md).
    mixed_steps: bool = True
    max_queued: int = 64  # requests waiting for a slot; beyond this new ones get RESOURCE_EXHAUSTED
    # Failed model calls (prefill or decode) in a row after which the engine gives up: health NOT_SERVING,
    # no more watchdog pings, and `edgellm serve` exits with status 1 so that systemd restarts it.
    max_consecutive_failures: int = 3


@dataclass
class GenerationConfig:
    default_max_new_tokens: int = 512  # when a request leaves max_new_tokens unset
    max_stop_sequences: int = 16
    max_stop_length: int = 256  # characters per stop sequence
    max_buffered_chunks: int = 1024  # undelivered chunks per stream before a slow reader's requests are cancelled
    # When a request leaves stream_interval_ms unset: 0 streams every token at once; "auto" batches tokens
    # where per-token messages would slow the step (see daemon/thread_placement.py) and streams each otherwise.
    stream_interval_ms: int | Literal["auto"] = "auto"


@dataclass
class LoggingConfig:
    level: str = "info"  # debug | info | warning | error
    file: str | None = None  # log file (reopened on SIGHUP); null: stderr (journald under systemd)
    format: str = "text"  # text: one line per record; json: one JSON object per line, for log shippers


@dataclass
class AccessConfig:
    allow_uids: list[int] | None = None  # Unix-socket peers allowed by user id (SO_PEERCRED); null: anyone
    allow_gids: list[int] | None = None  # ... or by primary or supplementary group id
    tls_cert: str | None = None  # PEM certificate chain for TCP; with tls_key, TCP speaks TLS only
    tls_key: str | None = None  # PEM private key
    tls_client_ca: str | None = None  # PEM CA bundle: TCP clients must present a certificate it signed (mTLS)
    token_file: str | None = None  # file holding a bearer token TCP clients must send ("authorization: Bearer ...")


@dataclass
class LimitsConfig:
    max_message_bytes: int = 16 * 1024 * 1024  # largest gRPC message received or sent
    max_prompt_tokens: int = 0  # longest prompt accepted; 0: the bundle's context length
    # Longest text or chat prompt (and Tokenize text) in UTF-8 bytes, refused before tokenizing; 0: derived, the
    # prompt tokens allowed x the bytes of the vocabulary's longest token (x4 where a normalizer may merge characters).
    max_prompt_bytes: int = 0
    max_requests_per_connection: int = 64  # requests running or queued at once from one client connection
    max_conversations_per_stream: int = 64  # conversations open at once on one Session stream (each keeps its history)
    # Client connections open at once, all listeners together; a connection beyond is closed at once. Each one
    # costs the daemon 3 file descriptors, so the daemon lowers this to fit its open-file limit (docs/limits.md).
    max_connections: int = 512
    handshake_timeout_s: float = 10.0  # a new connection's TLS handshake, then its HTTP/2 preface, each within this
    idle_timeout_s: float = 120.0  # a connection with no call in flight this long is closed (GOAWAY); clients reconnect
    max_streams_per_connection: int = 100  # calls open at once on one connection (HTTP/2 concurrent streams)
    # HTTP/2 pings closer together than this (with no data sent between) are strikes; the third gets GOAWAY.
    # Keepalive pings this far apart or more are fine, with or without a call in flight.
    min_ping_interval_s: float = 10.0


@dataclass
class ServiceConfig:
    drain_seconds: float = 30.0  # on SIGTERM: how long running requests may go on before they are cancelled
    metrics: str | None = None  # "host:port" of the Prometheus endpoint (/metrics); null disables it
    metrics_timeout_s: float = 10.0  # a metrics client sends its request, and takes the answer, each within this


@dataclass
class TrustConfig:
    # PEM Ed25519 public keys (paths). When any is set, the daemon serves only a bundle signed by one of them whose
    # files all match the manifest's checksums, checked before anything of it is loaded (docs/signed-bundles.md);
    # several keys let a fleet rotate them. Empty: signatures are not required (checksums are still checked).
    public_keys: list[str] = field(default_factory=list)


@dataclass
class OpenAIConfig:
    # "host:port" of the OpenAI-compatible HTTP listener (docs/openai-http.md); null: off. Same engine, limits,
    # token and TLS as the gRPC listeners; needs the `openai` extra (aiohttp).
    listen: str | None = None
    model_name: str | None = None  # the model id /v1/models lists and requests must name; null: the bundle's source name


@dataclass
class StructuredConfig:
    """Constrained decoding (response formats and tool calls; docs/structured-output.md)."""

    max_schema_bytes: int = 65536  # largest JSON schema, grammar, regex or tool list (UTF-8 bytes) a request may carry
    # A grammar that takes longer to compile is refused with INVALID_ARGUMENT (the compile runs off the event loop).
    compile_timeout_s: float = 5.0
    cache_size: int = 64  # compiled grammars kept, by their text (least recently used dropped first)


@dataclass
class PrefixCacheConfig:
    """Prompt blocks' K/V kept in host memory and reused by later prompts that start the same (docs/prefix-cache.md)."""

    enabled: bool = True
    share: float = 0.5  # host memory for blocks, as a share of the KV cache's bytes (GetModel.kv_cache_bytes)
    max_bytes: int = 0  # host memory for blocks in bytes; 0: `share` decides
    block_tokens: int = 64  # tokens per block: prompts are reused in whole blocks
    scope: str = "shared"  # shared: any request reuses any prompt | per_peer: only the same client's | off
    persist: bool = True  # write the blocks to disk and load them at start, so a restart keeps them
    dir: str | None = None  # the snapshot's folder (made 0700); null: $EDGELLM_CACHE/prefix-cache/<bundle id>
    max_disk_bytes: int = 0  # most bytes the snapshot takes (the most recent blocks first); 0: the memory bound
    save_interval_s: float = 60.0  # at most this often the snapshot is rewritten when new blocks came (and at stop)
    # Prompts prefilled into the cache before READY: each a text, or a chat (a list of {role, content} mappings).
    warm: list = field(default_factory=list)


@dataclass
class SpeculativeConfig:
    """Speculative decoding: drafted tokens checked by one model pass (docs/speculative.md)."""

    enabled: bool = True  # requests speculate unless they opt out (GenerateRequest.speculative: false)
    # A draft model's bundle (same tokenizer, e.g. a smaller or lower-precision build of the same model); null:
    # prompt lookup drafts (n-grams of the prompt and output so far, no extra model). `serve --draft` sets it.
    draft_bundle: str | None = None
    draft_threads: int = 1  # the draft model's ONNX Runtime threads
    max_draft_tokens: int = 8  # tokens drafted per verify pass (k): the pass scores k + 1 positions
    ngram_min: int = 2  # prompt lookup: the shortest n-gram matched (the longest is tried first)
    ngram_max: int = 4
    # Speculate only in steps that decode at most this many requests: each verify pass is its own model call,
    # so in a larger batch it reads the weights once more where a plain decode row would have shared the pass.
    max_batch: int = 1
    # A request decodes plainly while its verify passes have cost more than this share of its decode time.
    max_slowdown: float = 0.05


@dataclass
class Config:
    bundle: str | None = None  # path of the engine bundle; `serve --bundle` overrides it
    listen: ListenConfig = field(default_factory=ListenConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    prefix_cache: PrefixCacheConfig = field(default_factory=PrefixCacheConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)


_MINIMUMS = {"engine.slots": 1, "engine.threads": 0, "engine.prefill_chunk_tokens": 1, "engine.max_queued": 0,
             "engine.max_consecutive_failures": 1,
             "generation.default_max_new_tokens": 1, "generation.max_stop_sequences": 0,
             "generation.max_stop_length": 1, "generation.max_buffered_chunks": 1, "generation.stream_interval_ms": 0,
             "limits.max_message_bytes": 1024, "limits.max_prompt_tokens": 0, "limits.max_prompt_bytes": 0,
             "limits.max_requests_per_connection": 1, "limits.max_conversations_per_stream": 1,
             "limits.max_connections": 1, "limits.handshake_timeout_s": 0.1, "limits.idle_timeout_s": 0.1,
             "limits.max_streams_per_connection": 1, "limits.min_ping_interval_s": 0.0,
             "service.drain_seconds": 0.0, "service.metrics_timeout_s": 0.1,
             "structured.max_schema_bytes": 16, "structured.compile_timeout_s": 0.01, "structured.cache_size": 1,
             "prefix_cache.share": 0.0, "prefix_cache.max_bytes": 0, "prefix_cache.block_tokens": 8,
             "prefix_cache.max_disk_bytes": 0, "prefix_cache.save_interval_s": 1.0,
             "speculative.draft_threads": 1, "speculative.max_draft_tokens": 1, "speculative.ngram_min": 1,
             "speculative.ngram_max": 1, "speculative.max_batch": 1, "speculative.max_slowdown": 0.0}
MAX_STREAM_INTERVAL_MS = 1000  # longer and a stream stops looking like one
_MAXIMUMS = {"generation.stream_interval_ms": MAX_STREAM_INTERVAL_MS,
             # gRPC takes these as 32-bit milliseconds
             "limits.handshake_timeout_s": 86400.0, "limits.idle_timeout_s": 86400.0, "limits.min_ping_interval_s": 86400.0,
             "limits.max_streams_per_connection": 2**31 - 1,
             "structured.max_schema_bytes": 16 * 1024 * 1024, "structured.compile_timeout_s": 600.0,
             "prefix_cache.share": 4.0, "prefix_cache.block_tokens": 4096, "prefix_cache.save_interval_s": 86400.0,
             "speculative.max_draft_tokens": 32, "speculative.ngram_max": 16, "speculative.max_slowdown": 1.0}
_CHOICES = {"logging.level": ("debug", "info", "warning", "error"), "logging.format": ("text", "json"),
            "prefix_cache.scope": ("shared", "per_peer", "off")}


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
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        words = [w for t in allowed if typing.get_origin(t) is Literal for w in typing.get_args(t)]
        if (value is None and type(None) in allowed) or value in words:
            values[name] = value
            continue
        base = next(t for t in allowed if t is not type(None) and typing.get_origin(t) is not Literal)
        if typing.get_origin(base) is list:  # e.g. list[int]: a YAML list of that type
            item = typing.get_args(base)[0]
            if not isinstance(value, list) or any(not isinstance(v, item) or isinstance(v, bool) for v in value):
                raise ConfigError(f"'{key}' must be a list of {item.__name__}, got {value!r}")
            values[name] = value
            continue
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, base) or (base is int and isinstance(value, bool)):
            raise ConfigError(f"'{key}' must be {' or '.join([base.__name__, *map(repr, words)])}, got {value!r}")
        if key in _MINIMUMS and value < _MINIMUMS[key]:
            raise ConfigError(f"'{key}' must be at least {_MINIMUMS[key]}, got {value}")
        if key in _MAXIMUMS and value > _MAXIMUMS[key]:
            raise ConfigError(f"'{key}' must be at most {_MAXIMUMS[key]}, got {value}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"'{key}' must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        values[name] = value
    return cls(**values)


def parse_config(data: Any) -> Config:
    """Validate a parsed YAML document (None means all defaults)."""
    cfg = _build(Config, data if data is not None else {}, "")
    if not cfg.listen.unix and not cfg.listen.tcp:
        raise ConfigError("'listen': at least one of 'listen.unix' and 'listen.tcp' must be set")
    try:
        if not 0 <= int(cfg.listen.unix_mode, 8) <= 0o777:
            raise ValueError
    except ValueError:
        raise ConfigError(f"'listen.unix_mode' must be an octal file mode like \"0660\", got {cfg.listen.unix_mode!r}") from None
    if (cfg.access.tls_cert is None) != (cfg.access.tls_key is None):
        raise ConfigError("'access.tls_cert' and 'access.tls_key' go together: set both or neither")
    if cfg.access.tls_client_ca and not cfg.access.tls_cert:
        raise ConfigError("'access.tls_client_ca' (mutual TLS) needs 'access.tls_cert' and 'access.tls_key'")
    # A malformed address fails here, before a long model load, rather than when the listener binds.
    if cfg.listen.tcp:
        check_tcp_exposure(cfg.listen, cfg.access, cfg.listen.tcp)  # also parses the address
    if cfg.service.metrics:
        split_host_port(cfg.service.metrics, "service.metrics")
    if cfg.openai.listen:
        split_host_port(cfg.openai.listen, "openai.listen")
    if cfg.openai.model_name is not None and not cfg.openai.model_name.strip():
        raise ConfigError("'openai.model_name' must not be empty (null: the bundle's source name)")
    _check_warm_prompts(cfg.prefix_cache.warm)
    if cfg.speculative.ngram_min > cfg.speculative.ngram_max:
        raise ConfigError(f"'speculative.ngram_min' ({cfg.speculative.ngram_min}) must be at most "
                          f"'speculative.ngram_max' ({cfg.speculative.ngram_max})")
    return cfg


def _check_warm_prompts(warm: list) -> None:
    for i, prompt in enumerate(warm):
        if isinstance(prompt, str) and prompt:
            continue
        if isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values())
                for m in prompt):
            continue
        raise ConfigError(f"'prefix_cache.warm[{i}]' must be a non-empty text or a list of chat messages "
                          f"({{role: ..., content: ...}}), got {prompt!r}")


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
