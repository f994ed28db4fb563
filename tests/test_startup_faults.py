"""`edgellm serve` as a process against what a machine leaves lying around or withholds: a killed daemon's
socket and relay folder, a low open-file limit, a busy port, an unreadable config or cache folder."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
import yaml

from conftest import wait_until
from daemon.front import FD_RESERVE, FDS_PER_CONNECTION, RELAY_DIR_PREFIX
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc
from test_limits import CLOSED, H2, PREFACE, SETTINGS, frame
from test_service import _recv_until


class Serve:
    """`edgellm serve ARGS` as a child process with its own notify socket (READY=1) and its log in a file."""

    def __init__(self, folder: Path, args: list[str], env: dict | None = None, preexec_fn=None):
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(folder / f"notify-{len(list(folder.glob('notify-*')))}"))
        self.log_path = folder / f"serve-{len(list(folder.glob('serve-*')))}.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, **(env or {}), "NOTIFY_SOCKET": self.notify.getsockname()}
        self.proc = subprocess.Popen([sys.executable, "-m", "edgellm", "serve", *args], env=env, preexec_fn=preexec_fn,
                                     stdout=subprocess.DEVNULL, stderr=self._log)
        self.pid = self.proc.pid

    def wait_ready(self) -> None:
        try:
            _recv_until(self.notify, "READY=1", [], timeout=60)
        except TimeoutError:
            raise AssertionError(f"not ready: {self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        """SIGTERM (SIGKILL after 30 s); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def short_tmp():
    """A folder with a short path, also the children's TMPDIR: Unix socket paths must stay under 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="elt-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def get_model(address: str) -> pb.ModelInfo:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.InferenceStub(channel).GetModel(pb.GetModelRequest(), timeout=10)


def serves(address: str) -> bool:
    try:
        return get_model(address).architecture == "llama"
    except grpc.RpcError:
        return False


def test_a_killed_daemon_leaves_nothing_that_stops_the_next_start(tiny_bundle, short_tmp):
    sock = short_tmp / "s.sock"
    args = ["--bundle", str(tiny_bundle), "--unix", str(sock)]
    env = {"TMPDIR": str(short_tmp)}
    first = Serve(short_tmp, args, env)
    second = None
    try:
        first.wait_ready()
        relay = list(short_tmp.glob(f"{RELAY_DIR_PREFIX}{first.pid}-*"))
        assert len(relay) == 1 and (relay[0] / "grpc.sock").exists()
        first.proc.kill()
        first.proc.wait(30)
        assert relay[0].exists() and sock.exists()  # SIGKILL: the daemon cleaned up nothing
        second = Serve(short_tmp, args, env)
        second.wait_ready()
        assert serves(f"unix:{sock}")  # the stale socket file was replaced
        assert not relay[0].exists()  # the dead daemon's relay folder was removed
        assert len(list(short_tmp.glob(f"{RELAY_DIR_PREFIX}{second.pid}-*"))) == 1
        assert f"left by daemon process {first.pid}, which is gone" in second.log()
        assert second.stop() == 0
        assert not list(short_tmp.glob(f"{RELAY_DIR_PREFIX}*")) and not sock.exists()
    finally:
        first.stop()
        if second:
            second.stop()


def test_a_second_daemon_does_not_take_the_socket_of_a_running_one(tiny_bundle, short_tmp):
    sock = short_tmp / "s.sock"
    first = Serve(short_tmp, ["--bundle", str(tiny_bundle), "--unix", str(sock)], {"TMPDIR": str(short_tmp)})
    try:
        first.wait_ready()
        r = subprocess.run([sys.executable, "-m", "edgellm", "serve", "--bundle", str(tiny_bundle), "--unix", str(sock)],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(short_tmp)})
        assert r.returncode == 1
        assert f"edgellm serve: error: listen.unix: cannot listen on {sock}: another process" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert serves(f"unix:{sock}")  # still the first daemon's socket
    finally:
        assert first.stop() == 0
    assert not sock.exists()


def test_a_low_open_file_limit_is_raised_and_bounds_the_connections(tiny_bundle, short_tmp):
    soft, hard = 128, 320
    bound = (hard - FD_RESERVE) // FDS_PER_CONNECTION
    sock = short_tmp / "s.sock"
    d = Serve(short_tmp, ["--bundle", str(tiny_bundle), "--unix", str(sock)], {"TMPDIR": str(short_tmp)},
              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    held: list[H2] = []
    try:
        d.wait_ready()
        limits = Path(f"/proc/{d.pid}/limits").read_text()
        assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == [[str(hard)] * 2]
        assert f"soft limit raised from {soft} to the hard limit, {hard}" in d.log()
        assert f"limits.max_connections: 512 lowered to {bound} to fit the open-file limit ({hard}" in d.log()
        for _ in range(bound):
            held.append(H2(f"unix:{sock}"))
            held[-1].handshake()  # each one relayed all the way to the gRPC server
        extra = H2(f"unix:{sock}")
        extra.send(PREFACE + frame(SETTINGS))
        assert extra.frame() is CLOSED
        extra.close()
        assert len(os.listdir(f"/proc/{d.pid}/fd")) < hard - 16  # the bound held with room to spare
        held.pop().close()
        assert wait_until(lambda: serves(f"unix:{sock}"))
        for c in held:
            c.close()
        assert d.stop() == 0
        assert "out of file descriptors" not in d.log() and "Too many open files" not in d.log()
    finally:
        for c in held:
            c.close()
        d.stop()


@pytest.mark.parametrize("key", ["listen.tcp", "service.metrics"])
def test_a_busy_port_is_named_in_a_clear_message(tiny_bundle, tmp_path, key):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        section, name = key.split(".")
        config = {"listen": {"unix": str(tmp_path / "s.sock"), "tcp": "127.0.0.1:0"}, section: {name: address}}
        (tmp_path / "edgellm.yaml").write_text(yaml.safe_dump(config))
        r = subprocess.run([sys.executable, "-m", "edgellm", "serve", "--bundle", str(tiny_bundle),
                            "--config", str(tmp_path / "edgellm.yaml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"edgellm serve: error: {key}: cannot listen on {address}: Address already in use" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "s.sock").exists()


# Root reads and writes through file modes: without its DAC capabilities it meets them like anyone else.
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
needs_file_modes = pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                                      reason="running as root without setpriv: file modes do not apply")


@needs_file_modes
@pytest.mark.parametrize("case", ["config unreadable", "config is a folder", "cache unwritable", "cache unreadable",
                                  "cache is a file"])
def test_an_unusable_config_or_cache_folder_gets_a_message_not_a_traceback(tmp_path, case):
    config, cache = tmp_path / "edgellm.yaml", tmp_path / "cache"
    config.write_text(yaml.safe_dump({"listen": {"unix": str(tmp_path / "s.sock")}}))
    cache.mkdir()
    args = ["--config", str(config)]
    if case == "config unreadable":
        config.chmod(0)
    elif case == "config is a folder":
        args = ["--config", str(tmp_path)]
    elif case == "cache unwritable":
        cache.chmod(0o555)
    elif case == "cache unreadable":
        (cache / "bundles").mkdir()
        (cache / "bundles").chmod(0)
    else:
        cache.rmdir()
        cache.write_text("")
    try:
        r = subprocess.run([*UNPRIVILEGED, sys.executable, "-m", "edgellm", "serve", *args], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "EDGELLM_CACHE": str(cache)})
    finally:
        for path in (config, cache, cache / "bundles"):
            if path.exists():
                path.chmod(0o700)
    assert "Traceback" not in r.stderr, r.stderr
    if case.startswith("config"):
        assert r.returncode == 2
        reason = "Permission denied" if case == "config unreadable" else "Is a directory"
        assert f"edgellm serve: error: cannot read config {args[1]}: {reason}" in r.stderr, r.stderr
    else:
        assert r.returncode == 1
        reason = "Not a directory" if case == "cache is a file" else "Permission denied"
        assert f"edgellm serve: error: cannot use the cache folder {cache} ($EDGELLM_CACHE): {reason}" in r.stderr, r.stderr


def test_a_health_watch_does_not_keep_the_daemon_from_exiting(tiny_bundle, short_tmp):
    """A Watch call (Kubernetes' and grpc_health_probe's way to follow health) open or cancelled before SIGTERM."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sock = short_tmp / "s.sock"
    daemon = Serve(short_tmp, ["--bundle", str(tiny_bundle), "--unix", str(sock)], {"TMPDIR": str(short_tmp)})
    try:
        daemon.wait_ready()
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            cancelled = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(cancelled).status == health_pb2.HealthCheckResponse.SERVING
            cancelled.cancel()
            watching = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(watching).status == health_pb2.HealthCheckResponse.SERVING
            daemon.proc.send_signal(signal.SIGTERM)
            assert next(watching).status == health_pb2.HealthCheckResponse.NOT_SERVING  # the drain is announced
            assert daemon.proc.wait(30) == 0, daemon.log()
    finally:
        daemon.stop()
