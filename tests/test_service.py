"""Running as a service: unit files, sd_notify and socket activation, draining, TLS, access control,
limits, metrics and the request log, against real daemons (in-process and as `edgellm serve`)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import DaemonThread, generate, wait_until
from daemon.systemd import Notifier
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
FR = pb.FinishReason
DRAIN_MESSAGE = "drain period"


def health_status(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


# ---- unit files --------------------------------------------------------------------------------------
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed (.ci/run installs Debian's systemd)")


@needs_systemd_analyze
def test_unit_files_verify(tmp_path):
    # verify checks that ExecStart exists: point it at this checkout's `edgellm`.
    edgellm = Path(sys.executable).with_name("edgellm")
    for unit in ("edgellm.service", "edgellm.socket"):
        text = (ROOT / "systemd" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/opt/edgellm/.venv/bin/edgellm", str(edgellm)))
    assert "ExecStart=" + str(edgellm) in (tmp_path / "edgellm.service").read_text()
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "edgellm.socket"), str(tmp_path / "edgellm.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


@needs_systemd_analyze
def test_unit_security_exposure_is_what_the_docs_say():
    stated = re.search(r"exposure level of\s+([0-9.]+)", (ROOT / "docs" / "operations.md").read_text())
    assert stated, "docs/operations.md states the exposure score of edgellm.service"
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(ROOT / "systemd" / "edgellm.service")],
                       capture_output=True, text=True, timeout=60)
    measured = re.search(r"Overall exposure level for edgellm.service: ([0-9.]+)", r.stdout)
    assert measured, r.stdout + r.stderr
    assert float(measured.group(1)) <= float(stated.group(1))


def test_service_unit_has_the_required_settings():
    text = (ROOT / "systemd" / "edgellm.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n",
                 "ProtectSystem=strict", "PrivateTmp=yes", "DevicePolicy=closed", "User=edgellm"):
        assert line in text, line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert re.search(r"^RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6$", text, re.M)
    assert re.search(r"^ListenStream=/run/edgellm/edgellm.sock$", (ROOT / "systemd" / "edgellm.socket").read_text(), re.M)


# ---- the watchdog follows the engine loop ---------------------------------------------------------------
def test_watchdog_pings_come_from_engine_progress_and_stop_while_a_step_hangs(tiny_bundle, tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"})
    assert notifier.watchdog_s == 0.2  # pings at most every 0.05 s
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock")}}).start()
    hang = {}
    real_decode = d.daemon.backend.decode

    def decode(*args):
        if not hang:  # the first decode step hangs for a second
            hang["start"] = time.monotonic()
            threading.Event().wait(1.0)
            hang["end"] = time.monotonic()
        return real_decode(*args)

    # Each ping's time is taken when the engine thread sends it, not when the receiver gets to read it.
    sent: list[float] = []
    muted = threading.Event()
    real_send = notifier.send

    def send(*lines: str) -> bool:
        if muted.is_set():
            return False
        if lines == ("WATCHDOG=1",):
            sent.append(time.monotonic())
        return real_send(*lines)

    notifier.send = send
    received: list[bytes] = []
    stop = threading.Event()

    def receive():
        notify.settimeout(0.05)
        while not stop.is_set():
            try:
                received.append(notify.recv(100))
            except TimeoutError:
                continue

    receiver = threading.Thread(target=receive)
    receiver.start()
    try:
        engine = d.engine
        engine.heartbeat, engine.heartbeat_s = notifier.progress, 0.05
        engine._wake()  # the idle wait picks up the period
        assert wait_until(lambda: len(sent) >= 3)  # idle: the engine thread wakes up on its own and pings
        d.daemon.backend.decode = decode
        ids, _, finished = generate(d.stub(), text="hi", max_new_tokens=3, ignore_eos=True)
        assert finished.reason == FR.FINISH_REASON_LENGTH
        assert wait_until(lambda: sent and sent[-1] > hang["end"])  # pings resume after the step
        muted.set()
        # Every ping counted here did reach the notify socket, as a WATCHDOG=1 datagram.
        assert wait_until(lambda: len(received) == len(sent))
        assert set(received) == {b"WATCHDOG=1"}
        during = [t for t in sent if hang["start"] <= t <= hang["end"]]
        assert during == [], f"{len(during)} pings while the engine step hung"
        assert any(t < hang["start"] for t in sent)
    finally:
        stop.set()
        receiver.join(10)
        d.stop()
        notifier.close()
        notify.close()


def test_stop_during_the_model_load_exits_without_serving(tiny_bundle, tmp_path, monkeypatch, caplog):
    """A SIGTERM that lands while the model loads ends the daemon once the load returns: no warm-up, no socket."""
    import daemon.backends
    from bundle_format.bundle import load_bundle
    from daemon.config import parse_config
    from daemon.lifecycle import run_daemon

    real_create = daemon.backends.create_backend

    def create_then_get_stopped(*args, **kwargs):
        backend = real_create(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # caught by run_daemon's handler, as systemd's stop would be
        return backend

    monkeypatch.setattr(daemon.backends, "create_backend", create_then_get_stopped)
    sock = tmp_path / "never.sock"
    config = parse_config({"listen": {"unix": str(sock)}, "engine": {"pin_threads": False}})
    with caplog.at_level("INFO", logger="edgellm.daemon"):
        asyncio.run(asyncio.wait_for(run_daemon(config, load_bundle(tiny_bundle)), 60))
    assert "stop requested while loading" in caplog.text
    assert not sock.exists()


# ---- systemd end to end: notify protocol, socket activation, SIGHUP, SIGTERM ------------------------------
def _recv_until(sock: socket.socket, wanted: str, seen: list[str], timeout: float = 90) -> str:
    """Read notify datagrams (recording them) until one contains the line `wanted`."""
    sock.settimeout(timeout)
    while True:
        msg = sock.recv(4096).decode()
        seen.append(msg)
        if wanted in msg.split("\n"):
            return msg


SHIM = ("import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"  # exec keeps the pid, as systemd's fork+exec does
        "os.execv(sys.executable, [sys.executable, '-m', 'edgellm', *sys.argv[3:]])\n")


def test_socket_activation_notify_sighup_and_sigterm(tiny_bundle, tmp_path):
    unix_path = str(tmp_path / "activated.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    unix.listen(16)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    log_file = tmp_path / "edgellm.log"
    config = tmp_path / "edgellm.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"unix": str(tmp_path / "configured.sock"), "tcp": "127.0.0.1:1"},  # replaced by the inherited ones
        "logging": {"file": str(log_file)}, "service": {"drain_seconds": 0.5}}))
    # A client that connects before the daemon runs waits in the socket's queue and is answered later.
    early = {}
    early_thread = threading.Thread(target=lambda: early.setdefault(
        "r", generate(pb_grpc.InferenceStub(grpc.insecure_channel(f"unix:{unix_path}")), text="early", max_new_tokens=4, ignore_eos=True)))
    early_thread.start()
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "LISTEN_FDS": "2", "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen([sys.executable, "-c", SHIM, str(unix.fileno()), str(tcp.fileno()),
                             "serve", "--bundle", str(tiny_bundle), "--config", str(config)],
                            pass_fds=(unix.fileno(), tcp.fileno()), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: list[str] = []
    try:
        ready = _recv_until(notify, "READY=1", seen)
        assert f"MAINPID={proc.pid}" in ready
        assert any(line.startswith("STATUS=serving") and unix_path in line for line in ready.split("\n"))
        assert any(m.startswith("STATUS=loading") for m in seen[:-1])  # progress shown while starting
        early_thread.join(60)
        assert early["r"][2].reason == FR.FINISH_REASON_LENGTH and len(early["r"][0]) == 4
        assert not (tmp_path / "configured.sock").exists()
        tcp_stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{tcp.getsockname()[1]}"))
        assert generate(tcp_stub, text="over tcp", max_new_tokens=3, ignore_eos=True)[2].reason == FR.FINISH_REASON_LENGTH
        _recv_until(notify, "WATCHDOG=1", seen, timeout=10)
        _recv_until(notify, "WATCHDOG=1", seen, timeout=10)
        # SIGHUP reopens the log file: after a rotation the next request line goes to a fresh file.
        assert wait_until(lambda: log_file.exists() and "request id=generate-2" in log_file.read_text())
        log_file.rename(tmp_path / "edgellm.log.1")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(log_file.exists)
        generate(tcp_stub, text="after rotation", max_new_tokens=2, ignore_eos=True)
        assert wait_until(lambda: "request id=generate-3" in log_file.read_text())
        assert "generate-3" not in (tmp_path / "edgellm.log.1").read_text()
        # SIGTERM while a request generates: it finishes, or ends with the drain reason; exit code 0.
        stream = tcp_stub.Generate(pb.GenerateRequest(text="long", max_new_tokens=100, ignore_eos=True), timeout=60)
        first = next(stream)
        assert first.HasField("tokens")
        proc.send_signal(signal.SIGTERM)
        finished = [m.finished for m in stream if m.HasField("finished")][0]
        assert (finished.reason == FR.FINISH_REASON_LENGTH or
                (finished.reason == FR.FINISH_REASON_CANCELLED and DRAIN_MESSAGE in finished.message)), finished
        stopping = _recv_until(notify, "STOPPING=1", seen, timeout=30)
        assert "STATUS=draining" in stopping
        assert proc.wait(60) == 0, proc.stderr.read().decode()
        line = next(line for line in log_file.read_text().splitlines() if "request id=generate-3" in line)
        for key in ("peer=tcp:127.0.0.1:", "priority=normal", "prompt_tokens=", "completion_tokens=2", "queue_ms=",
                    "ttft_ms=", "duration_ms=", "reason=length"):
            assert key in line, line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for s in (unix, tcp, notify):
            s.close()


# ---- draining, in process -----------------------------------------------------------------------------
def test_drain_refuses_new_requests_lets_short_ones_finish_and_cancels_the_rest(tiny_bundle, tmp_path):
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock")}})
    d.start()
    real_decode = d.daemon.backend.decode

    def slow_decode(*args):  # a slower device: 25 ms per step, so a long request outlasts the drain period
        threading.Event().wait(0.025)
        return real_decode(*args)

    d.daemon.backend.decode = slow_decode
    channel = grpc.insecure_channel(d.daemon.addresses[0])
    stub = pb_grpc.InferenceStub(channel)
    try:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        streams = {"short": stub.Generate(pb.GenerateRequest(text="a", max_new_tokens=4, ignore_eos=True), timeout=60),
                   "long": stub.Generate(pb.GenerateRequest(text="b", max_new_tokens=110, ignore_eos=True), timeout=60)}
        firsts = {k: next(s) for k, s in streams.items()}
        assert all(f.HasField("tokens") for f in firsts.values())
        drained = asyncio.run_coroutine_threadsafe(d.daemon.drain(1.0), d.loop)
        assert wait_until(lambda: health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(grpc.RpcError) as refused:
            generate(stub, text="too late", max_new_tokens=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.value.details()
        ends = {k: [m.finished for m in s if m.HasField("finished")][0] for k, s in streams.items()}
        assert ends["short"].reason == FR.FINISH_REASON_LENGTH and ends["short"].usage.completion_tokens == 4
        assert ends["long"].reason == FR.FINISH_REASON_CANCELLED
        assert DRAIN_MESSAGE in ends["long"].message
        assert ends["long"].usage.completion_tokens < 110
        drained.result(30)
        assert d.daemon.service.live == set()
    finally:
        d.stop()


# ---- TLS, mutual TLS, tokens ---------------------------------------------------------------------------
def _certificates(folder: Path) -> dict[str, bytes]:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a stranger's certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name: str, issuer=None, issuer_key=None, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject if issuer else subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(issuer_key or key, hashes.SHA256())
        return cert, key

    def pem(cert, key) -> tuple[bytes, bytes]:
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    ca, ca_key = make("edgellm test CA", ca=True)
    server = make("localhost", ca, ca_key, san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = make("kiosk-1", ca, ca_key)
    stranger = make("stranger")  # self-signed: not from the CA
    out = {"ca": pem(ca, ca_key)[0]}
    out["server_cert"], out["server_key"] = pem(*server)
    out["client_cert"], out["client_key"] = pem(*client)
    out["stranger_cert"], out["stranger_key"] = pem(*stranger)
    for name, data in out.items():
        (folder / f"{name}.pem").write_bytes(data)
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    return folder, _certificates(folder)


TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def mtls_daemon(tiny_bundle, certs, tmp_path_factory):
    folder, _ = certs
    token = folder / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    d = DaemonThread(tiny_bundle, {
        "listen": {"unix": str(tmp_path_factory.mktemp("sock") / "s.sock"), "tcp": "127.0.0.1:0"},
        "access": {"tls_cert": str(folder / "server_cert.pem"), "tls_key": str(folder / "server_key.pem"),
                   "tls_client_ca": str(folder / "ca.pem"), "token_file": str(token)}}).start()
    yield d
    d.stop()


def _tls_stub(d, pems, client: str | None):
    creds = grpc.ssl_channel_credentials(root_certificates=pems["ca"],
                                         private_key=pems[f"{client}_key"] if client else None,
                                         certificate_chain=pems[f"{client}_cert"] if client else None)
    port = d.daemon.addresses[1].rsplit(":", 1)[1]
    return pb_grpc.InferenceStub(grpc.secure_channel(f"localhost:{port}", creds))


def test_mutual_tls_with_token_is_served(mtls_daemon, certs):
    stub = _tls_stub(mtls_daemon, certs[1], "client")
    info = stub.GetModel(pb.GetModelRequest(), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert info.architecture == "llama"
    ids, _, finished = generate(stub, metadata=(("authorization", f"Bearer {TOKEN}"),), text="secure", max_new_tokens=3,
                             ignore_eos=True)
    assert finished.reason == FR.FINISH_REASON_LENGTH and len(ids) == 3


@pytest.mark.parametrize("client, metadata, expected", [
    (None, (("authorization", f"Bearer {TOKEN}"),), "client certificate is required"),
    ("client", (), "missing bearer token"),
    ("client", (("authorization", "Bearer wrong"),), "wrong bearer token"),
])
def test_tcp_clients_without_certificate_or_token_are_unauthenticated(mtls_daemon, certs, client, metadata, expected):
    stub = _tls_stub(mtls_daemon, certs[1], client)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetModel(pb.GetModelRequest(), timeout=10, metadata=metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert expected in e.value.details()


def test_a_certificate_from_another_ca_or_plaintext_never_gets_through(mtls_daemon, certs):
    stranger = _tls_stub(mtls_daemon, certs[1], "stranger")
    with pytest.raises(grpc.RpcError) as e:
        stranger.GetModel(pb.GetModelRequest(), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails
    plain = pb_grpc.InferenceStub(grpc.insecure_channel(mtls_daemon.daemon.addresses[1]))
    with pytest.raises(grpc.RpcError) as e:
        plain.GetModel(pb.GetModelRequest(), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_unix_socket_needs_no_token(mtls_daemon):
    assert mtls_daemon.stub().GetModel(pb.GetModelRequest(), timeout=10).architecture == "llama"


def test_tls_without_client_certificates(tiny_bundle, certs):
    folder, pems = certs
    d = DaemonThread(tiny_bundle, {"listen": {"unix": None, "tcp": "127.0.0.1:0"},
                                   "access": {"tls_cert": str(folder / "server_cert.pem"),
                                              "tls_key": str(folder / "server_key.pem")}}).start()
    try:
        port = d.daemon.addresses[0].rsplit(":", 1)[1]
        stub = pb_grpc.InferenceStub(grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(pems["ca"])))
        assert stub.GetModel(pb.GetModelRequest(), timeout=10).architecture == "llama"
    finally:
        d.stop()


# ---- Unix socket: peer credentials, mode ---------------------------------------------------------------
@pytest.mark.parametrize("access, allowed", [
    ({"allow_uids": [os.getuid() + 4242]}, False),
    ({"allow_uids": [os.getuid() + 4242], "allow_gids": [os.getgid()]}, True),
    ({"allow_uids": [os.getuid()]}, True),
])
def test_unix_peer_allow_list(tiny_bundle, tmp_path, access, allowed):
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock"), "unix_mode": "0600"},
                                   "access": access}).start()
    try:
        assert oct((tmp_path / "s.sock").stat().st_mode & 0o777) == "0o600"
        stub = d.stub()
        if allowed:
            assert stub.GetModel(pb.GetModelRequest(), timeout=10).architecture == "llama"
        else:
            with pytest.raises(grpc.RpcError) as e:
                stub.GetModel(pb.GetModelRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert f"uid {os.getuid()}" in e.value.details()
    finally:
        d.stop()


# ---- limits, metrics, request log ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def metered(tiny_bundle, tmp_path_factory):
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path_factory.mktemp("sock") / "s.sock")},
                                   "limits": {"max_prompt_tokens": 16, "max_requests_per_connection": 1,
                                              "max_message_bytes": 4096},
                                   "service": {"metrics": "127.0.0.1:0"}}).start()
    yield d
    d.stop()


def test_limits(metered, step_gate):
    stub = metered.stub()
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, text="word " * 40, max_new_tokens=2)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limits.max_prompt_tokens" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, text="x" * 5000, max_new_tokens=2)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # larger than limits.max_message_bytes
    # One request at a time per connection: a second on the same stream is turned away while the first runs.
    requests = iter([pb.SessionRequest(start=pb.StartRequest(id="a", request=pb.GenerateRequest(
                         text="a", max_new_tokens=100, ignore_eos=True))),
                     pb.SessionRequest(start=pb.StartRequest(id="b", request=pb.GenerateRequest(text="b", max_new_tokens=2)))])
    gate = step_gate(metered)
    gate.hold()
    gate.allow(1)  # admit and prefill "a": its first token, then the engine waits with "a" running
    a_started = threading.Event()

    def outgoing():
        yield next(requests)
        a_started.wait(30)  # the second start only once the first is generating
        yield next(requests)

    errors, finished, a_tokens = [], [], 0
    for msg in stub.Session(outgoing(), timeout=60):
        if msg.HasField("tokens"):
            a_tokens += len(msg.tokens.token_ids)
            a_started.set()
        elif msg.HasField("error"):
            errors.append(msg)
            assert finished == [] and metered.engine.running  # "a" was still running when "b" was turned away
            gate.open()
        elif msg.HasField("finished"):
            finished.append(msg.id)
    assert [(m.id, m.error.code) for m in errors] == [("b", grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])]
    assert "limits.max_requests_per_connection" in errors[0].error.message
    assert finished == ["a"] and a_tokens == 100


def test_metrics_endpoint_shows_requests(metered):
    stub = metered.stub()
    for _ in range(3):
        assert generate(stub, text="count me", max_new_tokens=5, ignore_eos=True)[2].reason == FR.FINISH_REASON_LENGTH
    with pytest.raises(grpc.RpcError):
        generate(stub, text="")
    body = urllib.request.urlopen(f"http://{metered.daemon.metrics_address}/metrics", timeout=10).read().decode()

    def value(sample: str) -> float:
        m = re.search(rf"^{re.escape(sample)} ([0-9.e+]+)$", body, re.M)
        assert m, f"{sample} missing from the scrape"
        return float(m.group(1))

    assert value('edgellm_requests_total{priority="normal",reason="length"}') >= 3
    assert value('edgellm_request_errors_total{code="INVALID_ARGUMENT"}') >= 1
    assert value("edgellm_generated_tokens_total") >= 15
    assert value('edgellm_time_to_first_token_seconds_count{priority="normal"}') >= 3
    assert value('edgellm_inter_token_latency_seconds_count{priority="normal"}') >= 12
    assert value('edgellm_queue_time_seconds_count{priority="normal"}') >= 3
    assert value('edgellm_request_duration_seconds_count{priority="normal"}') >= 3
    # Every request has ended: no slot in use, nothing queued, no cache kept (no conversation was opened).
    for gauge in ("edgellm_slots_in_use", "edgellm_queue_length", "edgellm_kv_cache_tokens"):
        assert value(gauge) == 0, gauge


def test_one_log_line_per_request(metered, caplog):
    caplog.set_level("INFO", logger="edgellm.requests")
    generate(metered.stub(), text="log me", max_new_tokens=3, ignore_eos=True,
             priority=pb.PRIORITY_INTERACTIVE)
    assert wait_until(lambda: any("reason=length" in r.getMessage() for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if r.name == "edgellm.requests"]
    assert len(lines) == 1
    line = lines[0]
    assert re.match(r"request id=generate-\d+ peer=unix uid=\d+ gid=\d+ pid=\d+ priority=interactive "
                    r"prompt_tokens=\d+ cached_tokens=0 completion_tokens=3 queue_ms=[0-9.]+ ttft_ms=[0-9.]+ "
                    r"duration_ms=[0-9.]+ reason=length$", line), line
    assert f" uid={os.getuid()} gid={os.getgid()} pid={os.getpid()} " in line  # SO_PEERCRED: this process


# ---- configuration errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    ({"access": {"allow_uids": ["root"]}}, "'access.allow_uids' must be a list of int"),
    ({"listen": {"unix_mode": "rw-rw----"}}, "'listen.unix_mode' must be an octal file mode"),
    ({"access": {"tls_key": "/k.pem"}}, "'access.tls_cert' and 'access.tls_key' go together"),
    ({"access": {"tls_client_ca": "/ca.pem"}}, "'access.tls_client_ca' (mutual TLS) needs"),
    ({"limits": {"max_requests_per_connection": 0}}, "'limits.max_requests_per_connection' must be at least 1"),
    ({"service": {"drain_seconds": -1}}, "'service.drain_seconds' must be at least 0"),
    ({"service": {"metrics": 9464}}, "'service.metrics' must be str"),
])
def test_bad_service_settings_are_named(data, message):
    from daemon.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert message in str(e.value)


@pytest.mark.parametrize("access, message", [
    ({"token_file": "/nonexistent/token"}, "access.token_file: cannot read /nonexistent/token"),
    ({"tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"}, "access.tls_cert/tls_key: cannot load"),
])
def test_serve_refuses_unreadable_access_files_with_a_message(tiny_bundle, tmp_path, access, message):
    config = tmp_path / "edgellm.yaml"
    config.write_text(yaml.safe_dump({"listen": {"unix": str(tmp_path / "s.sock")}, "access": access}))
    r = subprocess.run([sys.executable, "-m", "edgellm", "serve", "--bundle", str(tiny_bundle), "--config", str(config)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_world_readable_token_file_is_refused(tmp_path):
    from daemon.access import read_token

    token = tmp_path / "token"
    token.write_text("abc\n")
    token.chmod(0o644)
    with pytest.raises(ValueError, match="readable by everyone"):
        read_token(str(token))
    token.chmod(0o640)
    assert read_token(str(token)) == "abc"
