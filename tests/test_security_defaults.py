"""Secure defaults (docs/security.md): socket folders another user could tamper with are refused by the daemon
and the CLI, TCP beyond loopback needs TLS plus client authentication, logs escape control characters and
hold no prompt text, and what the daemon writes is private."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from conftest import DaemonThread, generate, wait_until
from daemon.config import ConfigError, LoggingConfig, check_tcp_exposure, parse_config
from daemon.lifecycle import check_listeners, prepare_unix_socket
from daemon.request_log import (CONTROL_CHARS, JsonFormatter, PrivateFileHandler, TextFormatter, configure_logging,
                                escape_controls, log_request, logfmt_value)
from edgellm.socket_trust import (SocketMissing, UntrustedSocket, check_private_folder, check_socket_owner,
                                  make_private_folder)
from edgellm.v1 import edgellm_pb2 as pb

EDGELLM = [sys.executable, "-m", "edgellm"]
NOBODY = 65534
MARKER = "zqx-private-marker-7731"


def run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELLM, *args], capture_output=True, text=True, timeout=timeout, env=env)


def env_with(**values: str) -> dict[str, str]:
    return {**os.environ, **values}


def listening(path: Path) -> socket.socket:
    """A real listening socket at `path`: the impostor a client must not talk to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    sock.setblocking(False)
    return sock


def was_connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


# ---- socket folders: the rule (edgellm/socket_trust.py) ------------------------------------------------------

def untrusted_folder(kind: str, root: Path) -> tuple[Path, str]:
    """A folder (and the words its refusal must contain) that another user could tamper with."""
    folder = root / kind
    folder.mkdir(mode=0o700)
    if kind == "other-owner":
        os.chown(folder, NOBODY, NOBODY)
        return folder, f"owned by uid {NOBODY}"
    if kind == "world-writable":
        folder.chmod(0o777)
        return folder, "writable by group or others (mode 0777)"
    if kind == "group-writable":
        folder.chmod(0o770)
        return folder, "writable by group or others (mode 0770)"
    if kind == "sticky-world-writable":  # like /tmp itself: others may still put a name there first
        folder.chmod(0o1777)
        return folder, "writable by group or others"
    assert kind == "symlink"
    link = root / "link"
    link.symlink_to(folder)  # the target itself is private: the link is what is refused
    return link, "symbolic link"


UNTRUSTED = ["other-owner", "world-writable", "group-writable", "sticky-world-writable", "symlink"]


@pytest.mark.parametrize("kind", UNTRUSTED)
def test_untrusted_socket_folder_is_refused_by_the_rule(kind, tmp_path):
    folder, reason = untrusted_folder(kind, tmp_path)
    with pytest.raises(UntrustedSocket, match=re.escape(reason)):
        check_private_folder(str(folder))
    with pytest.raises(UntrustedSocket, match=re.escape(reason)):
        make_private_folder(str(folder))  # there already: checked, never taken for ours
    with pytest.raises(UntrustedSocket, match=re.escape(reason)):
        prepare_unix_socket(str(folder / "edgellm.sock"))  # the daemon's side
    assert not (folder / "edgellm.sock").exists()


@pytest.mark.parametrize("mode", [0o700, 0o710, 0o750, 0o755])
def test_private_folder_may_be_read_by_group_or_others(mode, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    folder.chmod(mode)
    check_private_folder(str(folder))  # only a write lets another user replace the socket
    prepare_unix_socket(str(folder / "edgellm.sock"))


def test_folder_the_daemon_creates_is_0700_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        prepare_unix_socket(str(tmp_path / "a" / "b" / "edgellm.sock"))
    finally:
        os.umask(old)
    st = (tmp_path / "a" / "b").lstat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()


def test_socket_owned_by_another_user_is_refused(tmp_path):
    impostor = listening(tmp_path / "edgellm.sock")
    try:
        check_socket_owner(str(tmp_path / "edgellm.sock"))  # ours: trusted
        os.chown(tmp_path / "edgellm.sock", NOBODY, NOBODY)
        with pytest.raises(UntrustedSocket, match=f"owned by uid {NOBODY}"):
            check_socket_owner(str(tmp_path / "edgellm.sock"))
    finally:
        impostor.close()
    with pytest.raises(SocketMissing):
        check_socket_owner(str(tmp_path / "nothing.sock"))
    with pytest.raises(SocketMissing):
        check_socket_owner(str(tmp_path / "no-folder" / "edgellm.sock"))


# ---- socket folders: `edgellm serve` and the client commands, as real processes --------------------------------

@pytest.mark.parametrize("kind", ["other-owner", "world-writable", "symlink"])
def test_serve_refuses_an_untrusted_default_socket_folder(kind, tiny_bundle, tmp_path):
    """The default socket ($XDG_RUNTIME_DIR/edgellm.sock) in a folder another user could tamper with: `serve`
    exits 2 with the reason and what to do, binds nothing there, and prints no traceback."""
    folder, reason = untrusted_folder(kind, tmp_path)
    result = run("serve", "--bundle", str(tiny_bundle), env=env_with(XDG_RUNTIME_DIR=str(folder)), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "refusing to start" in result.stderr and reason in result.stderr and "listen.unix" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.lexists(folder / "edgellm.sock")


def impostor_setup(kind: str, root: Path) -> tuple[Path, socket.socket, str]:
    """A default socket folder with a live socket in it that the CLI must not send to."""
    if kind == "socket-other-owner":
        folder = root / "private"
        folder.mkdir(mode=0o700)
        sock = listening(folder / "edgellm.sock")
        os.chown(folder / "edgellm.sock", NOBODY, NOBODY)
        return folder, sock, f"socket {folder / 'edgellm.sock'} is owned by uid {NOBODY}"
    folder, reason = untrusted_folder(kind, root)
    sock = listening(folder / "edgellm.sock")
    if kind == "other-owner":
        os.chown(folder / "edgellm.sock", NOBODY, NOBODY)
    return folder, sock, reason


@pytest.mark.parametrize("kind, command", [
    ("other-owner", ["chat", "hello"]),
    ("world-writable", ["chat", "hello"]),
    ("symlink", ["chat", "hello"]),
    ("socket-other-owner", ["chat", "hello"]),
    ("world-writable", ["info"]),
    ("other-owner", ["bench", "--concurrency", "1", "--rounds", "1"]),
])
def test_client_commands_refuse_an_untrusted_default_socket(kind, command, tmp_path):
    folder, impostor, reason = impostor_setup(kind, tmp_path)
    try:
        result = run(*command, env=env_with(XDG_RUNTIME_DIR=str(folder)), timeout=60)
        assert result.returncode == 2, result.stderr
        assert "refusing to use the default socket" in result.stderr and reason in result.stderr
        assert "--address" in result.stderr and "Traceback" not in result.stderr
        assert not was_connected(impostor)  # nothing was sent: not even a connection was opened
    finally:
        impostor.close()


def test_an_explicit_address_is_the_users_choice(tmp_path):
    """--address is not judged (beyond whether something answers there): the client connects to it."""
    folder, impostor, _ = impostor_setup("world-writable", tmp_path)
    try:
        result = run("chat", "hello", "--timeout", "3", "--address", f"unix:{folder / 'edgellm.sock'}",
                     env=env_with(XDG_RUNTIME_DIR=str(tmp_path)), timeout=60)
        assert result.returncode == 1 and "Traceback" not in result.stderr  # the impostor speaks no gRPC
        assert was_connected(impostor)
    finally:
        impostor.close()


def test_client_without_a_daemon_on_the_default_socket_says_so(tmp_path):
    result = run("info", env=env_with(XDG_RUNTIME_DIR=str(tmp_path)), timeout=60)
    assert result.returncode == 1
    assert "cannot reach the daemon" in result.stderr and "is `edgellm serve` running?" in result.stderr


def test_default_socket_round_trip(tiny_bundle, tmp_path):
    """The happy path with nothing configured: `serve` and `chat`/`info` meet on the default socket, which is
    checked and trusted."""
    from test_cli import Served

    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = env_with(XDG_RUNTIME_DIR=str(runtime))
    served = Served("--bundle", str(tiny_bundle), "--slots", "1", log=tmp_path / "serve.log", env=env)
    try:
        assert served.wait_ready(60), served.log.read_text()
        assert f"unix:{runtime / 'edgellm.sock'}" in "".join(served.stdout)
        chat = run("chat", "hello", "--max-new-tokens", "3", env=env, timeout=60)
        assert chat.returncode == 0, chat.stderr
        info = run("info", env=env, timeout=60)
        assert info.returncode == 0 and "slots: 1" in info.stdout, info.stderr
    finally:
        assert served.stop() == 0


# ---- protected mode -----------------------------------------------------------------------------------------

TLS = {"tls_cert": "/etc/edgellm/cert.pem", "tls_key": "/etc/edgellm/key.pem"}
TOKEN = {"token_file": "/etc/edgellm/token"}
CLIENT_CA = {"tls_client_ca": "/etc/edgellm/ca.pem"}


@pytest.mark.parametrize("tcp", ["127.0.0.1:0", "127.3.4.5:50051", "[::1]:50051", "localhost:50051"])
@pytest.mark.parametrize("access", [{}, TOKEN, TLS])
def test_loopback_tcp_is_served_as_configured(tcp, access):
    cfg = parse_config({"listen": {"tcp": tcp}, "access": access})
    assert check_tcp_exposure(cfg.listen, cfg.access, tcp) is None


@pytest.mark.parametrize("tcp", ["0.0.0.0:50051", "[::]:50051", "192.168.1.20:50051"])
@pytest.mark.parametrize("access, allow, outcome", [
    ({}, False, "no TLS (access.tls_cert and access.tls_key) and no client authentication (access.token_file or "
                "access.tls_client_ca)"),
    (TLS, False, "no client authentication (access.token_file or access.tls_client_ca)"),
    (TOKEN, False, "token would travel in clear text"),
    (TOKEN, True, "token would travel in clear text"),  # allow_insecure_tcp does not lift this one
    ({**TLS, **TOKEN}, False, None),
    ({**TLS, **CLIENT_CA}, False, None),
    ({}, True, "warning: without TLS"),
    (TLS, True, "warning: without client authentication"),
])
def test_non_loopback_tcp_needs_tls_and_client_authentication(tcp, access, allow, outcome):
    data = {"listen": {"tcp": tcp, "allow_insecure_tcp": allow}, "access": access}
    if outcome is None or outcome.startswith("warning"):
        cfg = parse_config(data)
        warning = check_tcp_exposure(cfg.listen, cfg.access, tcp)
        assert warning is None if outcome is None else outcome.removeprefix("warning: ") in warning
        return
    with pytest.raises(ConfigError, match="listen.tcp") as refused:
        parse_config(data)
    assert outcome in str(refused.value)
    if not access:  # the message names every way out
        assert "listen.allow_insecure_tcp: true" in str(refused.value) and "127.0.0.1" in str(refused.value)


def test_inherited_tcp_socket_is_judged_by_its_address():
    """A socket from systemd (LISTEN_FDS) is judged on the address it is bound to, before the model loads."""
    cfg = parse_config({"listen": {"unix": None, "tcp": "127.0.0.1:0"}})
    exposed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        exposed.bind(("0.0.0.0", 0))
        with pytest.raises(ConfigError, match="not a loopback address"):
            check_listeners(cfg, [exposed])
        cfg.listen.allow_insecure_tcp = True
        check_listeners(cfg, [exposed])
    finally:
        exposed.close()


def test_serve_refuses_unprotected_tcp_beyond_loopback(tiny_bundle, tmp_path):
    """`serve --tcp` overrides the config after it is parsed: the start checks again, exit 2, no traceback."""
    result = run("serve", "--bundle", str(tiny_bundle), "--unix", "", "--tcp", "0.0.0.0:0",
                 env=env_with(XDG_RUNTIME_DIR=str(tmp_path)), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "not a loopback address" in result.stderr and "access.tls_cert" in result.stderr
    assert "listen.allow_insecure_tcp" in result.stderr and "Traceback" not in result.stderr


# ---- a daemon with everything logged at debug, in JSON, to a file --------------------------------------------

@pytest.fixture(scope="module")
def logged_daemon(tiny_bundle, tmp_path_factory):
    """A daemon listening on 0.0.0.0 (allow_insecure_tcp) that logs everything at debug level, as JSON, to a file."""
    root = logging.getLogger()
    level = root.level
    folder = tmp_path_factory.mktemp("logged")
    log_file = folder / "edgellm.log"
    handler = configure_logging(LoggingConfig(file=str(log_file), level="debug", format="json"))
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(folder / "run" / "edgellm.sock"), "tcp": "0.0.0.0:0",
                                              "allow_insecure_tcp": True},
                                   "engine": {"slots": 2}, "generation": {"default_max_new_tokens": 4}}).start()
    yield d, log_file
    d.stop()
    root.removeHandler(handler)
    handler.close()
    root.setLevel(level)


def records(log_file: Path) -> list[dict]:
    for h in logging.getLogger().handlers:
        h.flush()
    return [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()]


def test_allowed_insecure_tcp_is_served_with_a_warning(logged_daemon):
    d, log_file = logged_daemon
    assert any(a.startswith("0.0.0.0:") for a in d.daemon.addresses)
    warnings = [r for r in records(log_file) if r["level"] == "WARNING" and "allow_insecure_tcp" in r["message"]]
    assert warnings and "without TLS" in warnings[0]["message"]


def test_what_the_daemon_writes_is_private(logged_daemon):
    d, log_file = logged_daemon
    sock = Path(d.config.listen.unix)
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700  # the socket folder it created
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660  # listen.unix_mode's default
    relay = Path(d.daemon._relay_dir)
    st = relay.lstat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


def test_log_file_created_private_keeps_an_existing_files_mode(tmp_path):
    existing = tmp_path / "existing.log"
    existing.touch(mode=0o640)
    existing.chmod(0o640)
    for path in (tmp_path / "new.log", existing):
        PrivateFileHandler(str(path)).close()  # the class configure_logging uses for logging.file
    assert stat.S_IMODE((tmp_path / "new.log").stat().st_mode) == 0o600
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640  # the operator's choice (e.g. for a log reader group)


def test_prompts_and_outputs_are_never_logged_even_at_debug(logged_daemon):
    """Text, chat, Tokenize and a refused request (a stop sequence too long) carry a marker: the debug-level log
    holds a line for each request, and not the marker."""
    d, log_file = logged_daemon
    stub = d.stub(f"unix:{d.config.listen.unix}")
    _, text, _ = generate(stub, text=f"say {MARKER}", max_new_tokens=4)
    generate(stub, chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=MARKER)]), max_new_tokens=4)
    stub.Tokenize(pb.TokenizeRequest(text=MARKER), timeout=10)
    with pytest.raises(grpc.RpcError) as refused:
        generate(stub, text="hi", stop=[MARKER * 20])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and MARKER not in refused.value.details()
    def requests() -> list[dict]:
        return [r["request"] for r in records(log_file) if r["logger"] == "edgellm.requests"]

    # The request line may be written just after the client has its answer.
    assert wait_until(lambda: sum(r.get("reason") == "refused" for r in requests()) >= 1 and len(requests()) >= 3)
    raw = log_file.read_text(encoding="utf-8")
    assert MARKER not in raw
    if len(text) >= 6 and text.strip():  # the output too, where it is long enough not to match by chance
        assert text not in raw


# ---- log hygiene ----------------------------------------------------------------------------------------------

ALL_CONTROLS = [chr(c) for c in [*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029, 0x202e, 0x2066]]


def test_every_control_character_in_a_logged_value_is_escaped():
    for c in ALL_CONTROLS:
        value = logfmt_value(f"a{c}b")
        assert not CONTROL_CHARS.search(value) and value.startswith('"'), repr(c)
        assert len(value.splitlines()) == 1
    assert logfmt_value('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert logfmt_value("plain") == "plain"
    assert escape_controls("a\nb\x1b[2J\u2028\x85") == "a\\nb\\x1b[2J\\u2028\\x85"


def record(message: str, *args, exc: BaseException | None = None, **extra) -> logging.LogRecord:
    r = logging.LogRecord("edgellm.test", logging.WARNING, __file__, 1, message, args,
                          (type(exc), exc, exc.__traceback__) if exc else None)
    r.__dict__.update(extra)
    return r


def test_text_format_keeps_one_record_on_one_line():
    """A client-chosen value can neither end the line nor start a forged one: every line after a record's first
    (a traceback) is indented."""
    forged = "x\n2026-01-01 00:00:00,000 INFO edgellm.requests: request id=forged\r\u2028\x85\x1b[31m"
    line = TextFormatter().format(record("conversation %s", forged))
    assert len(line.splitlines()) == 1 and not CONTROL_CHARS.search(line)
    try:
        raise ValueError(forged)
    except ValueError as e:
        text = TextFormatter().format(record("failed", exc=e))
    first, *rest = text.split("\n")
    assert rest and all(part.startswith("    ") for part in rest)
    assert not CONTROL_CHARS.search(text.replace("\n", ""))


def test_json_format_one_object_per_line_with_request_fields(tmp_path):
    log_file = tmp_path / "requests.log"
    root = logging.getLogger()
    level = root.level
    handler = PrivateFileHandler(str(log_file), encoding="utf-8")  # as configure_logging sets it up for json
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        log_request(id="generate-1", peer="unix", uid=0, prompt_tokens=12, message="odd\u2028id\n\x85\x7f")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("edgellm.test").exception("step failed")
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(level)
    raw = log_file.read_text(encoding="utf-8")
    assert not CONTROL_CHARS.search(raw.replace("\n", "")) and len(raw.splitlines()) == 2
    first, second = (json.loads(line) for line in raw.splitlines())
    assert set(first) == {"time", "level", "logger", "message", "request"}
    assert first["level"] == "INFO" and first["logger"] == "edgellm.requests" and first["time"].endswith("+00:00")
    assert first["request"] == {"id": "generate-1", "peer": "unix", "uid": 0, "prompt_tokens": 12,
                                "message": "odd\u2028id\n\x85\x7f"}  # escaped in the file, whole once parsed
    assert first["message"].startswith("request id=generate-1 ")
    assert second["level"] == "ERROR" and "RuntimeError: boom" in second["exception"]


def test_json_formatter_escapes_what_json_dumps_leaves():
    line = JsonFormatter().format(record("a\x7fb\x9b\u2028\u2029c"))
    assert not CONTROL_CHARS.search(line)
    assert json.loads(line)["message"] == "a\x7fb\x9b\u2028\u2029c"


@pytest.mark.parametrize("data, needle", [
    ({"logging": {"format": "xml"}}, "logging.format"),
    ({"listen": {"allow_insecure_tcp": "yes"}}, "listen.allow_insecure_tcp"),
])
def test_new_keys_are_validated(data, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config(data)


def test_demo_cache_folder_is_created_private(tmp_path, monkeypatch):
    """The demo bundle's cache is created 0700: whoever can write it can change the model `serve` runs."""
    import build_engine.build
    import build_engine.demo_model
    from edgellm.cli import cache_dir, demo_bundle

    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path / "new" / "edgellm"))
    monkeypatch.setattr(build_engine.demo_model, "demo_gguf_path", lambda cache: cache / "demo.gguf")
    monkeypatch.setattr(build_engine.build, "build_bundle", lambda gguf, path, **kw: path)
    old = os.umask(0)
    try:
        demo_bundle()
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache_dir().stat().st_mode) == 0o700


def test_stale_relay_folder_cleanup_spares_other_users_and_links(tmp_path):
    """At start the daemon removes relay folders of its own dead processes only: not another user's, not a link."""
    from daemon.front import RELAY_DIR_PREFIX, remove_stale_relay_dirs

    dead = 2**22 + 12345  # above the kernel's pid_max default: no such process
    ours, theirs = tmp_path / f"{RELAY_DIR_PREFIX}{dead}-a", tmp_path / f"{RELAY_DIR_PREFIX}{dead}-b"
    target = tmp_path / "precious"
    for folder in (ours, theirs, target):
        folder.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    (tmp_path / f"{RELAY_DIR_PREFIX}{dead}-c").symlink_to(target)
    assert remove_stale_relay_dirs(str(tmp_path)) == [str(ours)]
    assert theirs.is_dir() and target.is_dir() and (tmp_path / f"{RELAY_DIR_PREFIX}{dead}-c").is_symlink()
