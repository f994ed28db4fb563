"""The connection edge under abusive clients: a bound on connections, handshake and idle timeouts, HTTP/2
ping floods, streams per connection, and a metrics endpoint that holds no thread per client. Real
daemons (in process), real sockets; raw HTTP/2 frames where a gRPC client would be too polite."""

from __future__ import annotations

import fcntl
import queue
import re
import socket
import ssl
import struct
import termios
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest

from conftest import DaemonThread, generate, wait_until
from daemon.front import FD_RESERVE, FDS_PER_CONNECTION, connection_bound
from daemon.metrics import METRICS_MAX_CONNECTIONS
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
ACK = END_STREAM = 0x1
END_HEADERS = 0x4
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
MAX_WINDOW = 2**31 - 1
ENHANCE_YOUR_CALM = 0xB
CLOSED = None  # what H2.frame returns once the server has closed the connection


def frame(kind: int, flags: int = 0, payload: bytes = b"", stream: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK header field without indexing, its name a literal too."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def call_headers(path: bytes) -> bytes:
    """HPACK: :method POST and :scheme http from the static table, then :path, :authority and the gRPC headers."""
    return (b"\x83\x86" + b"\x04" + bytes([len(path)]) + path + b"\x01\x01x" +
            _literal(b"content-type", b"application/grpc") + _literal(b"te", b"trailers"))


CALL_HEADERS = call_headers(b"/grpc.health.v1.Health/Check")


class Frame(NamedTuple):
    kind: int
    flags: int
    payload: bytes
    stream: int


class H2:
    """A raw HTTP/2 client connection: just enough to handshake, ping, and read what the server sends."""

    def __init__(self, address: str, timeout: float = 10.0):
        if address.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(address[len("unix:"):])
        else:
            host, port = address.rsplit(":", 1)
            self.sock = socket.create_connection((host, int(port)))
        self.sock.settimeout(timeout)
        self._buf = b""

    def send(self, data: bytes) -> None:
        """Send, unless the server has closed the connection already (the next frame() says CLOSED)."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def handshake(self, settings: bytes = b"") -> dict[int, int]:
        """Preface and SETTINGS both ways (ours: `settings`, packed); returns the server's settings."""
        self.send(PREFACE + frame(SETTINGS, 0, settings))
        while True:
            got = self.frame()
            assert got is not CLOSED, "the server closed the connection during the handshake"
            if got.kind == SETTINGS and not got.flags & ACK:
                self.sock.sendall(frame(SETTINGS, ACK))
                return dict(struct.unpack(">HI", got.payload[i:i + 6]) for i in range(0, len(got.payload), 6))

    def frame(self) -> Frame | None:
        """The next frame from the server, or CLOSED at the end of the connection (socket timeout: raises)."""
        while len(self._buf) < 9 or len(self._buf) < 9 + int.from_bytes(self._buf[:3], "big"):
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return CLOSED
            self._buf += data
        n = int.from_bytes(self._buf[:3], "big")
        got = Frame(self._buf[3], self._buf[4], self._buf[9:9 + n], int.from_bytes(self._buf[5:9], "big") & 0x7FFFFFFF)
        self._buf = self._buf[9 + n:]
        return got

    def frames_until_closed(self) -> list[Frame]:
        frames = []
        while (got := self.frame()) is not CLOSED:
            frames.append(got)
        return frames

    def close(self) -> None:
        self.sock.close()


def goaway(frames: list) -> tuple[int, bytes]:
    """(error code, debug text) of the last GOAWAY among `frames`."""
    payload = [f.payload for f in frames if f.kind == GOAWAY][-1]
    return struct.unpack(">I", payload[4:8])[0], payload[8:]


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server closes `s` before the socket's timeout (a reset counts: it had unread bytes)."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def get_model(address: str) -> pb.ModelInfo:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.InferenceStub(channel).GetModel(pb.GetModelRequest(), timeout=10)


def scrape(d: DaemonThread) -> str:
    return urllib.request.urlopen(f"http://{d.daemon.metrics_address}/metrics", timeout=10).read().decode()


def sample(body: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", body, re.M)
    assert m, f"{name} missing from the scrape"
    return float(m.group(1))


MAX_CONNECTIONS = 4
MAX_STREAMS = 3


@pytest.fixture(scope="module")
def guarded(tiny_bundle, tmp_path_factory):
    d = DaemonThread(tiny_bundle, {
        "listen": {"unix": str(tmp_path_factory.mktemp("sock") / "s.sock"), "tcp": "127.0.0.1:0"},
        "limits": {"max_connections": MAX_CONNECTIONS, "handshake_timeout_s": 2.0, "idle_timeout_s": 600,
                   "min_ping_interval_s": 0.2, "max_streams_per_connection": MAX_STREAMS},
        "service": {"metrics": "127.0.0.1:0", "metrics_timeout_s": 1.0}}).start()
    yield d
    d.stop()


@pytest.fixture
def quiet(guarded) -> DaemonThread:
    """The guarded daemon once the previous test's connections are gone."""
    assert wait_until(lambda: guarded.daemon.front.open_connections == 0)
    return guarded


# ---- the connection bound ---------------------------------------------------------------------------------
def test_connections_beyond_the_bound_are_closed_at_once_counted_and_logged(quiet, caplog):
    caplog.set_level("WARNING", logger="edgellm.front")
    unix, tcp = quiet.daemon.addresses
    held = [H2(unix if i % 2 else tcp) for i in range(MAX_CONNECTIONS)]
    try:
        for c in held:
            c.handshake()  # relayed to the gRPC server, which answered
        assert quiet.daemon.front.open_connections == MAX_CONNECTIONS
        for address in (unix, tcp):
            extra = H2(address)
            extra.send(PREFACE + frame(SETTINGS))
            assert extra.frame() is CLOSED  # nothing from gRPC: the front door closed it
            extra.close()
        with pytest.raises(grpc.RpcError) as e:
            get_model(unix)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        body = scrape(quiet)
        assert sample(body, "edgellm_connections_refused_total") >= 3
        assert sample(body, "edgellm_connections_open") == MAX_CONNECTIONS
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert refused and "limits.max_connections" in refused[0]
        assert len(refused) == 1  # rate-limited: one line for the burst
        held.pop().close()
        assert wait_until(lambda: quiet.daemon.front.open_connections == MAX_CONNECTIONS - 1)
        assert get_model(unix).architecture == "llama"  # a freed place is taken by the next client
    finally:
        for c in held:
            c.close()


def test_the_bound_is_lowered_to_fit_the_open_file_limit(caplog):
    caplog.set_level("WARNING", logger="edgellm.front")
    assert connection_bound(512, 20000) == 512
    assert not [r for r in caplog.records if r.name == "edgellm.front"]
    fits = (1024 - FD_RESERVE) // FDS_PER_CONNECTION
    assert fits <= 300 and connection_bound(512, 1024) == fits  # ~330 idle clients took every descriptor at 1024
    assert f"limits.max_connections: 512 lowered to {fits} to fit the open-file limit (1024" in caplog.text
    assert connection_bound(512, 10) == 1  # a silly limit still serves one client


@pytest.mark.parametrize("data, message", [
    ({"limits": {"max_connections": 0}}, "'limits.max_connections' must be at least 1"),
    ({"limits": {"handshake_timeout_s": 0}}, "'limits.handshake_timeout_s' must be at least 0.1"),
    ({"limits": {"idle_timeout_s": 10**6}}, "'limits.idle_timeout_s' must be at most 86400"),
    ({"limits": {"max_streams_per_connection": 0}}, "'limits.max_streams_per_connection' must be at least 1"),
    ({"limits": {"min_ping_interval_s": -1}}, "'limits.min_ping_interval_s' must be at least 0"),
    ({"service": {"metrics_timeout_s": 0}}, "'service.metrics_timeout_s' must be at least 0.1"),
])
def test_limit_settings_are_checked(data, message):
    from daemon.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert message in str(e.value)


def test_the_service_unit_gives_room_for_the_default_bound():
    from daemon.config import LimitsConfig

    unit = (Path(__file__).resolve().parent.parent / "systemd" / "edgellm.service").read_text()
    m = re.search(r"^LimitNOFILE=(\d+)$", unit, re.M)
    assert m, "edgellm.service sets no LimitNOFILE"
    assert connection_bound(LimitsConfig().max_connections, int(m.group(1))) == LimitsConfig().max_connections


# ---- handshake, idle, pings, streams ---------------------------------------------------------------------
@pytest.mark.parametrize("sends", [b"", PREFACE], ids=["nothing", "preface-only"])
def test_a_client_that_never_finishes_the_http2_handshake_is_closed(quiet, sends):
    c = H2(quiet.daemon.addresses[0])  # the gRPC default would hold it 120 s: the socket times out after 10
    try:
        c.sock.sendall(sends)
        frames = c.frames_until_closed()
        assert b"settings" in goaway(frames)[1].lower()
    finally:
        c.close()
    assert wait_until(lambda: quiet.daemon.front.open_connections == 0)


def test_a_tls_client_that_never_finishes_the_tls_handshake_is_closed(tiny_bundle, tmp_path):
    from test_service import _certificates

    _certificates(tmp_path)
    d = DaemonThread(tiny_bundle, {"listen": {"unix": None, "tcp": "127.0.0.1:0"},
                                   "access": {"tls_cert": str(tmp_path / "server_cert.pem"),
                                              "tls_key": str(tmp_path / "server_key.pem")},
                                   "limits": {"handshake_timeout_s": 2.0}}).start()
    try:
        host, port = d.daemon.addresses[0].rsplit(":", 1)
        silent = socket.create_connection((host, int(port)))
        silent.settimeout(8)  # before this edgellm closed it after 10 s
        try:
            assert closed_by_server(silent)
        finally:
            silent.close()
        # A client that does the handshake is served; its certificate check still applies.
        tls = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        tls.set_alpn_protocols(["h2"])
        with socket.create_connection((host, int(port))) as raw, tls.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(PREFACE + frame(SETTINGS))
            assert s.recv(9)[3] == SETTINGS
        assert wait_until(lambda: d.daemon.front.open_connections == 0)
    finally:
        d.stop()


def test_idle_connections_are_closed_through_the_relay_and_calls_in_flight_keep_theirs(tiny_bundle, tmp_path):
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock")}, "limits": {"idle_timeout_s": 1.0, **BIG_TEXTS}}).start()
    address = d.daemon.addresses[0]
    try:
        # A Session stream open with no request: a call in flight, so its connection is not idle.
        outgoing: queue.Queue = queue.Queue()
        channel = grpc.insecure_channel(address)
        replies = pb_grpc.InferenceStub(channel).Session(iter(outgoing.get, None), timeout=60)
        assert wait_until(lambda: d.daemon.front.open_connections == 1)
        # A raw client that does the handshake and then nothing gets GOAWAY, then its own socket closed.
        idle = H2(address)
        idle.handshake()
        frames = idle.frames_until_closed()  # the socket times out after 10 s
        assert goaway(frames)[1] == b"connection idle"
        idle.close()
        # The session outlived that idle period: a request on it now is served.
        outgoing.put(pb.SessionRequest(start=pb.StartRequest(id="late", request=pb.GenerateRequest(
            text="still here", max_new_tokens=2, ignore_eos=True))))
        outgoing.put(None)
        ends = [m for m in replies if m.HasField("finished")]
        assert [m.id for m in ends] == ["late"] and ends[0].finished.usage.completion_tokens == 2
        # Then that channel's connection has no call and is closed too; the channel reconnects by itself (once it
        # has seen the close: a call sent before then would go out on the closing socket).
        states: list = []
        channel.subscribe(states.append)
        assert wait_until(lambda: d.daemon.front.open_connections == 0)
        assert wait_until(lambda: states and states[-1] != grpc.ChannelConnectivity.READY)
        assert generate(pb_grpc.InferenceStub(channel), text="again", max_new_tokens=2, ignore_eos=True)[2].usage.completion_tokens == 2
        channel.close()
    finally:
        d.stop()


BIG_TEXTS = {"max_prompt_bytes": 1_000_000}  # stalled_client's Tokenize texts are far longer than the tiny context


def stalled_client(d: DaemonThread) -> H2:
    """A client that asks for 1 MiB of answers (4 times what the sockets on the way hold) and reads none of them,
    returned once its socket is full: the relay then waits on it with the rest."""
    text = "日本語のテキスト。😀 🎉 " * 4000
    with grpc.insecure_channel(d.daemon.addresses[0]) as channel:
        answer = pb_grpc.InferenceStub(channel).Tokenize(pb.TokenizeRequest(text=text), timeout=30)
    assert wait_until(lambda: d.daemon.front.open_connections == 0)
    message = pb.TokenizeRequest(text=text).SerializeToString()
    c = H2(d.daemon.addresses[0])
    # Windows wide open, so the server may send it all at once; then the client reads nothing more.
    c.handshake(struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW))
    c.send(frame(WINDOW_UPDATE, 0, struct.pack(">I", MAX_WINDOW - 65535)))
    for n in range(1024 * 1024 // answer.ByteSize() + 1):
        c.send(frame(HEADERS, END_HEADERS, call_headers(b"/edgellm.v1.Inference/Tokenize"), stream=2 * n + 1) +
               frame(DATA, END_STREAM, b"\x00" + struct.pack(">I", len(message)) + message, stream=2 * n + 1))

    def unread() -> int:
        return struct.unpack("i", fcntl.ioctl(c.sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]

    assert wait_until(lambda: unread() >= 128 * 1024, timeout=20)
    return c


def test_a_client_that_stops_reading_is_cut_off(tiny_bundle, tmp_path):
    """Its calls cannot finish, so its connection never goes idle: the relay cuts it off once it has taken
    nothing for limits.idle_timeout_s."""
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock")}, "limits": {"idle_timeout_s": 1.0, **BIG_TEXTS}}).start()
    try:
        c = stalled_client(d)
        assert wait_until(lambda: d.daemon.front.open_connections == 0, timeout=20)
        c.close()
    finally:
        d.stop()


def test_a_client_that_stops_reading_does_not_hold_up_the_stop(tiny_bundle, tmp_path):
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock")}, "limits": {"idle_timeout_s": 600, **BIG_TEXTS}}).start()
    c = stalled_client(d)
    try:
        stopped = threading.Thread(target=d.stop)  # gRPC's stop alone waited about a minute on this client
        stopped.start()
        stopped.join(20)
        assert not stopped.is_alive()
    finally:
        c.close()


def test_a_ping_flood_gets_goaway_and_paced_keepalive_does_not(quiet):
    c = H2(quiet.daemon.addresses[1])
    try:
        c.handshake()
        # Keepalive pings further apart than limits.min_ping_interval_s (0.2 s), no call open: more than the
        # 2 strikes that gRPC's default (5 min, none without a call) would let pass.
        for i in range(5):
            threading.Event().wait(0.5)
            c.sock.sendall(frame(PING, 0, struct.pack(">Q", i)))
            while (got := c.frame()) is not CLOSED and got.kind != PING:
                pass
            assert got is not CLOSED and got.flags & ACK, "a paced keepalive ping was answered with a closed connection"
        c.sock.sendall(b"".join(frame(PING, 0, struct.pack(">Q", 100 + i)) for i in range(5)))
        code, text = goaway(c.frames_until_closed())
        assert (code, text) == (ENHANCE_YOUR_CALM, b"too_many_pings")
    finally:
        c.close()


def test_streams_per_connection_are_advertised_and_enforced(quiet):
    for address in quiet.daemon.addresses:
        c = H2(address)
        try:
            assert c.handshake().get(SETTINGS_MAX_CONCURRENT_STREAMS) == MAX_STREAMS
            # A client that ignores the setting: calls opened (headers, no message yet) beyond it are reset.
            streams = [2 * i + 1 for i in range(MAX_STREAMS + 2)]
            c.sock.sendall(b"".join(frame(HEADERS, END_HEADERS, CALL_HEADERS, stream=n) for n in streams))
            reset: set[int] = set()
            while reset != set(streams[MAX_STREAMS:]):
                got = c.frame()
                assert got is not CLOSED, f"closed with streams {sorted(reset)} reset"
                if got.kind == RST_STREAM:
                    assert got.stream not in streams[:MAX_STREAMS], f"stream {got.stream} was reset"
                    reset.add(got.stream)
        finally:
            c.close()


# ---- the metrics endpoint ----------------------------------------------------------------------------------
def test_metrics_clients_are_bounded_time_out_and_hold_no_thread(quiet):
    endpoint = quiet.daemon.metrics_server
    host, port = quiet.daemon.metrics_address.rsplit(":", 1)
    threads = threading.active_count()
    half_sent = []
    try:
        for _ in range(3 * METRICS_MAX_CONNECTIONS):
            s = socket.create_connection((host, int(port)))
            s.settimeout(10)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the empty line that ends the request
            half_sent.append(s)
        # At the bound, each newcomer closes the oldest client still sending its request.
        evicted, kept = half_sent[:-METRICS_MAX_CONNECTIONS], half_sent[-METRICS_MAX_CONNECTIONS:]
        for s in evicted:
            assert closed_by_server(s)
        assert endpoint.open_connections <= METRICS_MAX_CONNECTIONS
        assert threading.active_count() <= threads + 2  # a thread per client would add 48
        assert "edgellm_connections_open" in scrape(quiet)  # a scraper still gets in
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{quiet.daemon.metrics_address}/other", timeout=10)
        assert e.value.code == 404
        for s in kept:  # service.metrics_timeout_s (1 s) after they came
            assert closed_by_server(s)
        assert wait_until(lambda: endpoint.open_connections == 0)
    finally:
        for s in half_sent:
            s.close()
