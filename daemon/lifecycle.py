"""The daemon's lifecycle: load, warm up, start the engine, the gRPC server and the front door, tell
systemd, serve until SIGTERM, drain and stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import ssl
import stat
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bundle_format.bundle import Bundle, verify_bundle
from bundle_format.decode_buckets import decode_buckets
from daemon.access import AccessGuard, Connections, read_token, server_tls_context
from daemon.backend import Backend
from daemon.config import Config, ConfigError, LimitsConfig, check_tcp_exposure, split_host_port
from daemon.engine import Engine, EngineFailed
from daemon.front import (FrontDoor, address_of, connection_bound, make_relay_dir, raise_open_file_limit,
                          remove_stale_relay_dirs, tcp_listener, unix_listener)
from daemon.metrics import EngineMetrics, MetricsEndpoint
from daemon.prefix_cache import PrefixCache, SnapshotWriter, create_prefix_cache, warm_prompts
from daemon.request_log import reopen_log_files
from daemon.speculative import Drafter, load_draft_model
from daemon.server import InferenceService, add_inference_service
from daemon.systemd import Notifier, listen_sockets
from daemon.thread_placement import (ThreadPlacement, allowed_cpus, auto_stream_interval_ms, default_placement,
                                     pin_current_thread)
from daemon.tokenizer import Tokenizer
from edgellm import __version__
from edgellm.socket_trust import UntrustedSocket, make_private_folder, socket_folder
from edgellm.v1 import edgellm_pb2 as pb

log = logging.getLogger("edgellm.daemon")


def model_info(bundle: Bundle, backend_name: str, slots: int, kv_cache_bytes: int, cuda_graphs: str = "") -> pb.ModelInfo:
    """What GetModel reports, but the default stream interval: the service adds the one it applies."""
    m = bundle.model
    return pb.ModelInfo(
        architecture=m["architecture"], hf_architecture=m["hf_architecture"],
        source=bundle.manifest.get("source", {}).get("name", ""), precision=bundle.manifest["precision"],
        backend=backend_name, context_length=bundle.context_length, slots=slots, bundle_id=bundle.bundle_id,
        vocab_size=m["vocab_size"], num_layers=m["num_layers"], kv_cache_bytes=kv_cache_bytes, cuda_graphs=cuda_graphs,
        edgellm_version=__version__, weight_bytes_per_token=bundle.manifest["graph"].get("weight_bytes_per_token", 0))


def default_stream_interval_ms(setting: int | str, backend: Backend) -> int:
    """generation.stream_interval_ms with "auto" resolved for this backend's threads and this process's CPUs."""
    if setting != "auto":
        return setting
    return auto_stream_interval_ms(backend.threads, len(allowed_cpus()))


def grpc_server_options(limits: LimitsConfig) -> list[tuple[str, int]]:
    """The gRPC server's side of the connection limits (docs/limits.md); the front door holds the rest."""
    def ms(seconds: float) -> int:
        return round(seconds * 1000)

    return [("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
            # Counted from the relay's connect: a client that never sends the HTTP/2 preface and settings is closed.
            ("grpc.server_handshake_timeout_ms", ms(limits.handshake_timeout_s)),
            # GOAWAY, then the connection closes; the relay then closes the client's own connection.
            ("grpc.max_connection_idle_ms", ms(limits.idle_timeout_s)),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(limits.min_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", 2),  # the third ping too soon gets GOAWAY (ENHANCE_YOUR_CALM)
            ("grpc.keepalive_permit_without_calls", 1)]  # idle connections are closed by idle_timeout_s anyway


def prepare_socket_folder(path: str) -> None:
    """Create the socket's folder (0700), or check that the one there is ours and private (edgellm/socket_trust.py).

    Raises UntrustedSocket with what to do: a folder another user owns or can write lets them replace the
    socket, and the clients that trust the default address would send their prompts to the impostor."""
    folder = socket_folder(path)
    try:
        make_private_folder(folder)
    except UntrustedSocket as e:
        raise UntrustedSocket(f"listen.unix: refusing to listen on {path}: {e}") from None


def prepare_unix_socket(path: str) -> None:
    """Make or check the socket's folder (prepare_socket_folder) and clear a stale socket file left by a crash."""
    prepare_socket_folder(path)
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not stat.S_ISSOCK(p.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket; refusing to replace it")
        if _answers(path):  # replacing it would silently take the socket from a running daemon
            raise OSError(f"listen.unix: cannot listen on {path}: another process (a running edgellm?) serves on it")
        p.unlink()


def _answers(path: str) -> bool:
    """Whether something accepts connections on the Unix socket `path` (a crashed daemon's file refuses them)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:  # a full backlog (timeout), or not ours to connect to: someone is there
            pass
        return True


class Daemon:
    """The running service: engine thread, gRPC server and front door, started and stopped together.

    The gRPC server listens on a private socket only; the public sockets (bound here, or inherited
    from systemd) belong to the front door, which checks who connects (see daemon/front.py).
    """

    def __init__(self, config: Config, bundle: Bundle, tokenizer: Tokenizer, backend: Backend,
                 notifier: Notifier | None = None, inherited: list[socket.socket] | None = None,
                 placement: ThreadPlacement | None = None, token: str | None = None,
                 tls: ssl.SSLContext | None = None, prefix_cache: PrefixCache | None = None,
                 drafter: Drafter | None = None) -> None:
        """`token` and `tls` as run_daemon read them before the model load; left out, they are read from config.
        `prefix_cache` as run_daemon loaded and warmed it; left out, one in memory only, as configured."""
        if token is None and config.access.token_file:
            token = read_token(config.access.token_file)
        self.config = config
        self.token = token
        self.tls = tls if tls is not None else server_tls_context(config.access)
        self.placement = placement
        self.bundle = bundle
        self.tokenizer = tokenizer
        self.backend = backend
        self.notifier = notifier or Notifier({})
        self.inherited = inherited or []
        if prefix_cache is None:
            prefix_cache = create_prefix_cache(config.prefix_cache, bundle.bundle_id, bundle.kv_cache,
                                               backend.kv_cache_bytes, persist=False)
        self.prefix_cache = prefix_cache
        self.drafter = drafter  # speculative.draft_bundle's draft model, loaded by run_daemon; None: prompt lookup
        self._snapshots = (SnapshotWriter(prefix_cache, config.prefix_cache.save_interval_s)
                           if prefix_cache is not None and prefix_cache.snapshot_path is not None else None)
        self.engine: Engine | None = None
        self.service: InferenceService | None = None
        self.server: grpc.aio.Server | None = None
        self.front: FrontDoor | None = None
        self.openai = None  # daemon.openai_http.OpenAIDoor when openai.listen is set
        # The asyncio servicer: the threaded one's Watch blocks a thread that keeps the process from exiting.
        self.health = health.aio.HealthServicer()
        self.metrics = EngineMetrics()
        self.metrics_server = None
        self.metrics_address: str | None = None
        self.addresses: list[str] = []
        self._own_unix_socket: str | None = None
        self._relay_dir: str | None = None
        self._stopped = False
        # Set when the engine gives up (engine.max_consecutive_failures; why: engine.failed): run_daemon exits 1.
        self.engine_failed = asyncio.Event()

    async def start(self) -> None:
        cfg = self.config
        watchdog = self.notifier.watchdog_s
        loop = asyncio.get_running_loop()
        self.engine = Engine(self.backend, self.tokenizer, self.bundle.context_length,
                             prefill_chunk_tokens=cfg.engine.prefill_chunk_tokens,
                             mixed_steps=cfg.engine.mixed_steps, max_queued=cfg.engine.max_queued,
                             loop=loop, metrics=self.metrics,
                             heartbeat=self.notifier.progress if watchdog else None,
                             heartbeat_s=watchdog / 4 if watchdog else None,
                             cpu=self.placement.engine_cpu if self.placement else None,
                             max_consecutive_failures=cfg.engine.max_consecutive_failures,
                             # The engine thread reports giving up; the rest happens on this loop.
                             on_failure=lambda reason: asyncio.run_coroutine_threadsafe(self._engine_gave_up(reason), loop),
                             prefix_cache=self.prefix_cache, speculative=cfg.speculative, drafter=self.drafter)
        if self.placement:  # this thread's affinity passes to the threads started below (gRPC's, the front door's)
            pin_current_thread(self.placement.service_cpu)
        connections = Connections()
        self.engine.start()
        stream_interval_ms = default_stream_interval_ms(cfg.generation.stream_interval_ms, self.backend)
        info = model_info(self.bundle, self.backend.name, self.backend.slots, self.backend.kv_cache_bytes,
                          self.backend.cuda_graphs)
        self.service = InferenceService(self.engine, self.tokenizer, self.bundle, cfg.generation, info, cfg.limits,
                                        connections, stream_interval_ms, cfg.structured)
        self.service.prefix_scope = cfg.prefix_cache.scope
        if self._snapshots:
            self._snapshots.start()
        guard = AccessGuard(cfg.access, connections, self.token,
                            on_refused=lambda code: self.metrics.request_errors.labels(code.name).inc())
        self.server = grpc.aio.server(interceptors=[guard], options=grpc_server_options(cfg.limits))
        add_inference_service(self.service, self.server)  # malformed requests: INVALID_ARGUMENT, not UNKNOWN
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (pb.DESCRIPTOR.services_by_name["Inference"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        await self._set_serving(False)  # NOT_SERVING until everything below is up
        remove_stale_relay_dirs()
        self._relay_dir = make_relay_dir()  # 0700: only this user reaches the gRPC socket
        grpc_path = os.path.join(self._relay_dir, "grpc.sock")
        self.server.add_insecure_port(f"unix:{grpc_path}")
        self.front = FrontDoor(grpc_path, self._relay_dir, connections, self.tls,
                               max_connections=connection_bound(cfg.limits.max_connections),
                               handshake_timeout_s=cfg.limits.handshake_timeout_s,
                               idle_timeout_s=cfg.limits.idle_timeout_s,
                               on_refused=self.metrics.connections_refused.inc)
        self.metrics.bind_connections(lambda: self.front.open_connections)
        if cfg.service.metrics:
            self.metrics_server = MetricsEndpoint(self.metrics.registry, cfg.service.metrics, cfg.service.metrics_timeout_s)
            self.front.serve_metrics(self.metrics_server)
        for sock in self._listeners():
            self.front.add(sock)
        self.addresses = [address_of(sock) for sock in self.front.listeners]
        await self.server.start()
        self.front.start()
        if cfg.openai.listen:
            from daemon.openai_http import OpenAIDoor  # the `openai` extra (aiohttp)
            door = OpenAIDoor(cfg, self.service, self.bundle, self.token, self.metrics, self.front.max_connections)
            await door.start()
            self.openai = door
            log.info("OpenAI-compatible HTTP API on %s/v1", self.openai.address)
        if self.metrics_server:
            host, _ = split_host_port(cfg.service.metrics, "service.metrics")
            self.metrics_address = f"{f'[{host}]' if ':' in host else host}:{self.metrics_server.port}"
        await self._set_serving(True)
        log.info("serving %s (%s, %s) on %s%s", self.bundle.path, info.architecture, info.backend, ", ".join(self.addresses),
                 f"; metrics on http://{self.metrics_address}/metrics" if self.metrics_address else "")
        log.info("streaming: %s by default (generation.stream_interval_ms: %s)",
                 f"tokens batched {stream_interval_ms} ms apart after the first" if stream_interval_ms else "every token at once",
                 cfg.generation.stream_interval_ms)

    def _listeners(self) -> list[socket.socket]:
        """Sockets inherited from systemd replace the configured ones of the same kind (Unix, TCP)."""
        cfg = self.config
        listeners = list(self.inherited)
        for sock in listeners:
            log.info("listening socket from systemd: %s", address_of(sock))
        if cfg.listen.unix and not any(s.family == socket.AF_UNIX for s in self.inherited):
            prepare_unix_socket(cfg.listen.unix)
            listeners.append(unix_listener(cfg.listen.unix, cfg.listen.unix_mode, cfg.listen.unix_group))
            self._own_unix_socket = cfg.listen.unix
        if cfg.listen.tcp and not any(s.family != socket.AF_UNIX for s in self.inherited):
            listeners.append(tcp_listener(cfg.listen.tcp))
        try:  # protected mode, on the addresses bound (a host name is known to be loopback or not only now)
            warnings = [check_tcp_exposure(cfg.listen, cfg.access, address_of(s))
                        for s in listeners if s.family != socket.AF_UNIX]
        except ConfigError:
            for sock in listeners[len(self.inherited):]:
                sock.close()
            raise
        for warning in filter(None, warnings):
            log.warning("%s", warning)
        return listeners

    async def _engine_gave_up(self, reason: str) -> None:
        """The engine failed too often (it has ended every request): stop serving, for run_daemon to exit."""
        log.error("the engine keeps failing; exiting so that the service manager restarts the daemon: %s", reason)
        if self.service:
            self.service.draining = True  # new requests: UNAVAILABLE
        self.notifier.status(f"engine failed: {reason}")
        await self._set_serving(False)
        self.engine_failed.set()

    async def drain(self, grace: float) -> None:
        """Refuse new requests (UNAVAILABLE), let running ones go on for up to `grace` seconds, then cancel the rest.

        Queued requests that have not started (no slot, no token) end at once with UNAVAILABLE: they can retry
        elsewhere now rather than wait out the drain period."""
        service = self.service
        if service is None or service.draining:
            return
        service.draining = True
        await self._set_serving(False)
        if self.openai:
            self.openai.stop_accepting()
        # Queued requests that have not started end now with UNAVAILABLE, free to retry elsewhere.
        self.engine.refuse_queued("the server is shutting down before this request started; retry on another instance")
        # Those in a slot: service.live also counts the queued ones refused above, until the engine's next step.
        running = len(self.engine.running)
        log.info("draining: %d requests running, up to %gs", running, grace)
        self.notifier.stopping(f"draining: {running} requests running, up to {grace:g}s")
        try:
            await asyncio.wait_for(service.all_done.wait(), grace)
        except TimeoutError:
            message = f"the server is shutting down: the request did not finish within the drain period ({grace:g}s)"
            log.info("cancelling %d requests after the drain period", len(service.live))
            for seq in list(service.live):
                self.engine.cancel(seq, message)
            try:  # the engine ends them at its next step
                await asyncio.wait_for(service.all_done.wait(), 30)
            except TimeoutError:
                log.error("%d requests did not end after cancellation", len(service.live))

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", "edgellm.v1.Inference"):
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        """Drain (up to `grace` seconds), then close the server, the front door and the engine."""
        if self._stopped:
            return
        self._stopped = True
        await self.drain(grace)
        # Side by side: the relays deliver what the stopping gRPC server writes last (streams already ended send
        # their last messages; idle ones are closed), and the front door's stop cuts off, after its grace, a
        # client that reads nothing, whose pending writes would otherwise hold up gRPC's stop.
        await asyncio.gather(*([self.server.stop(1.0)] if self.server else []),
                             *([self.openai.close()] if self.openai else []),
                             *([asyncio.get_running_loop().run_in_executor(None, self.front.stop)] if self.front else []))
        if self.engine:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)
        if self._snapshots:  # after the engine: its last blocks are in the last snapshot
            await asyncio.get_running_loop().run_in_executor(None, self._snapshots.stop)
        if self._own_unix_socket:
            Path(self._own_unix_socket).unlink(missing_ok=True)
        if self._relay_dir:
            shutil.rmtree(self._relay_dir, ignore_errors=True)


def check_listeners(config: Config, inherited: list[socket.socket]) -> None:
    """What can be refused before the model loads: an untrusted socket folder, an unprotected exposed TCP listener."""
    if config.listen.unix and not any(s.family == socket.AF_UNIX for s in inherited):
        prepare_socket_folder(config.listen.unix)
    tcp = [address_of(s) for s in inherited if s.family != socket.AF_UNIX] or \
        ([config.listen.tcp] if config.listen.tcp else [])
    for address in tcp:
        check_tcp_exposure(config.listen, config.access, address)  # the warning, if any, is logged at start


def warm_up(backend: Backend, slots: int) -> None:
    """Run each step shape once so ONNX Runtime's first-run allocations happen before READY."""
    backend.prefill(0, [0], 0)
    for rows in decode_buckets(slots):
        backend.decode([rows - 1], [0], [0])  # the highest slot picks the batch of `rows`


def trusted_keys(paths: list[str]) -> dict:
    """trust.public_keys read (key id -> key); ValueError naming the setting and the file when one is unusable."""
    from bundle_format.signature import KeyFileError, load_trusted_keys

    try:
        return load_trusted_keys(paths)
    except KeyFileError as e:
        raise KeyFileError(f"trust.public_keys: {e}") from None


def verify_signed_bundle(bundle: Bundle, trusted: dict) -> None:
    """The bundle is signed by a trusted key and its files match (bundle_format/signature.py); BundleError if not."""
    from bundle_format.signature import verify_trusted_bundle

    check = verify_trusted_bundle(bundle, trusted)
    log.info("bundle %s: signed by trusted key %s%s; every file matches its checksum", bundle.path,
             check.signature.key_id, f" ({check.signature.signer})" if check.signature.signer else "")


def prepare_prefix_cache(config: Config, bundle: Bundle, backend: Backend, tokenizer: Tokenizer,
                         notifier: Notifier | None = None) -> PrefixCache | None:
    """The prefix cache, its snapshot loaded and its warm prompts prefilled (before READY), each cost logged."""
    cache = create_prefix_cache(config.prefix_cache, bundle.bundle_id, bundle.kv_cache, backend.kv_cache_bytes)
    if cache is None:
        return None
    if notifier:
        notifier.status("loading the prefix cache")
    cache.load()
    if config.prefix_cache.warm:
        if notifier:
            notifier.status("warming the prefix cache")
        started = time.monotonic()
        prompts, tokens = warm_prompts(cache, backend, tokenizer, config.prefix_cache.warm, bundle.context_length)
        log.info("prefix cache: %d warm prompts, %d tokens prefilled in %.2fs", prompts, tokens,
                 time.monotonic() - started)
    return cache


async def run_daemon(config: Config, bundle: Bundle) -> None:
    """Load everything, serve until SIGINT/SIGTERM, then drain and stop cleanly.

    Under systemd: STATUS= lines while loading, READY=1 once the model is loaded and warmed up and the
    sockets serve, WATCHDOG=1 from the engine loop, STOPPING=1 when draining; SIGHUP reopens log files.
    """
    from daemon.backends import create_backend

    notifier = Notifier()
    raise_open_file_limit()  # before the model's files and the clients' connections take descriptors
    inherited = listen_sockets()
    check_listeners(config, inherited)  # before a long model load; Daemon.start checks the bound sockets again
    # Read here, not in Daemon.start: a bad path fails before a long model load.
    token = read_token(config.access.token_file) if config.access.token_file else None
    if config.openai.listen:
        try:  # here, before a long model load
            import aiohttp  # noqa: F401
        except ImportError:
            raise ValueError("openai.listen needs aiohttp: install edgellm's `openai` extra "
                             "(pip install 'edgellm[openai]')") from None
    tls = server_tls_context(config.access)
    trusted = trusted_keys(config.trust.public_keys) if config.trust.public_keys else None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reopen_log_files)
    if trusted is None:
        notifier.status(f"loading {bundle.path}")
        # Checksums are verified while the model loads and awaited before serving: a changed byte is still refused.
        verified = loop.run_in_executor(None, verify_bundle, bundle)
    else:
        # A signed bundle is checked whole before any of it is loaded: unverified bytes never reach the parsers.
        notifier.status(f"verifying {bundle.path}")
        await loop.run_in_executor(None, verify_signed_bundle, bundle, trusted)
        notifier.status(f"loading {bundle.path}")
        verified = asyncio.gather()  # nothing left to wait for
    # The tokenizer loads (in Rust, without the GIL) while ONNX Runtime loads the model.
    tokenizer_loading = loop.run_in_executor(
        None, lambda: Tokenizer.from_dir(bundle.path, extra_eos_ids=bundle.model.get("eos_token_ids") or ()))
    pin = config.engine.pin_threads and bundle.manifest.get("target", "cpu") == "cpu"
    placement = default_placement(config.engine.threads) if pin else None
    try:
        backend = create_backend(bundle, config, placement)
        drafter = None
        if config.speculative.enabled and config.speculative.draft_bundle:
            drafter = load_draft_model(config.speculative.draft_bundle, bundle, backend.slots,
                                       config.speculative.draft_threads,
                                       (lambda b: verify_signed_bundle(b, trusted)) if trusted is not None else None)
        tokenizer = await tokenizer_loading
    except Exception:
        await asyncio.gather(tokenizer_loading, return_exceptions=True)  # its own failure, if any, is not the news
        await verified  # a changed file explains a failed load best: BundleError names it
        raise
    # The load ran on this loop's thread, so a SIGTERM/SIGINT that came meanwhile is seen only now: one pass of
    # the loop runs its queued stop.set (awaiting a finished future does not), then it skips the warm-up and
    # serving, and READY is never reported.
    await asyncio.sleep(0)
    if not stop.is_set():
        notifier.status("warming up")
        await loop.run_in_executor(None, warm_up, backend, config.engine.slots)
    prefix_cache = None
    if not stop.is_set():
        prefix_cache = await loop.run_in_executor(None, prepare_prefix_cache, config, bundle, backend, tokenizer,
                                                  notifier)
    await verified
    if stop.is_set():
        log.info("stop requested while loading: exiting without serving")
        notifier.close()
        return
    daemon = Daemon(config, bundle, tokenizer, backend, notifier, inherited, placement, token, tls, prefix_cache,
                    drafter)
    try:
        await daemon.start()
        notifier.ready(f"serving {bundle.model['architecture']} ({backend.name}, {backend.slots} slots) on "
                       f"{', '.join(daemon.addresses)}")
        print(f"edgellm: ready on {', '.join(daemon.addresses)}", flush=True)
        # Serve until a signal, or until the engine gives up.
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(daemon.engine_failed.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if not daemon.engine_failed.is_set():
            log.info("stopping")
            await daemon.drain(config.service.drain_seconds)
            notifier.status("stopping")
    finally:
        await daemon.stop(0)
        notifier.close()
    if daemon.engine_failed.is_set():  # `edgellm serve` exits 1: systemd's Restart=on-failure starts it again
        raise EngineFailed(f"the engine keeps failing: {daemon.engine.failed}")
