"""Faults, each with real processes: the daemon killed mid-stream, a damaged bundle, a disk that fills up
during `edgellm build`. Every wait is bounded (call timeouts, process timeouts)."""

from __future__ import annotations

import fcntl
import os
import queue
import resource
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
import yaml

from build_engine.build import build_bundle
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc
from test_cli import EDGELLM, Served, run

FR = pb.FinishReason
# A context long enough that a request generating to its end still runs when the daemon is killed: the
# tiny model streams 8k tokens to each of two clients in about 10 s on 2 cores, and the kill comes milliseconds
# after the first token.
LONG_CONTEXT = 8192


@pytest.fixture(scope="module")
def long_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    return build_bundle(tiny_checkpoint, tmp_path_factory.mktemp("long") / "tiny-8k", context_length=LONG_CONTEXT)


# ---- SIGKILL mid-stream ---------------------------------------------------------------------------------
def test_sigkill_mid_stream_gives_unavailable_and_a_restart_serves_on_the_same_socket(long_bundle, tmp_path):
    sock = tmp_path / "d.sock"
    address = f"unix:{sock}"
    served = Served("--bundle", str(long_bundle), "--unix", str(sock), "--slots", "3", log=tmp_path / "serve.log")
    session_input: queue.Queue = queue.Queue()
    channel = grpc.insecure_channel(address)
    try:
        assert served.wait_ready(60), served.log.read_text()
        stub = pb_grpc.InferenceStub(channel)
        # Two Generate streams, each asking for the whole context, both mid-generation at the kill.
        streams = [stub.Generate(pb.GenerateRequest(text=f"stream {i}", max_new_tokens=LONG_CONTEXT - 16,
                                                    ignore_eos=True, stream_interval_ms=0), timeout=60)
                   for i in range(2)]
        for stream in streams:
            assert next(stream).HasField("tokens")
        # A Session stream (in the third slot) that finished its request and stays open, idle: open at the kill
        # whatever the timing.
        session = stub.Session(iter(session_input.get, None), timeout=60)
        session_input.put(pb.SessionRequest(start=pb.StartRequest(
            id="a", request=pb.GenerateRequest(text="short", max_new_tokens=2, ignore_eos=True))))
        assert next(m for m in session if m.HasField("finished")).finished.reason == FR.FINISH_REASON_LENGTH

        served.proc.kill()
        assert served.proc.wait(10) == -signal.SIGKILL
        for stream in streams:
            with pytest.raises(grpc.RpcError) as failed:
                for msg in stream:
                    assert not msg.HasField("finished"), "the stream ended before the kill: make it longer"
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
        with pytest.raises(grpc.RpcError) as failed:
            next(session)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
        assert sock.exists()  # a SIGKILLed daemon cannot remove its socket file: the next start replaces it
    finally:
        session_input.put(None)
        if served.proc.poll() is None:
            served.proc.kill()
        served.stop()

    again = Served("--bundle", str(long_bundle), "--unix", str(sock), log=tmp_path / "serve-again.log")
    try:
        assert again.wait_ready(60), again.log.read_text()
        # The old channel reconnects by itself: a client outlives a daemon restart.
        stream = pb_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(text="again", max_new_tokens=3, ignore_eos=True), timeout=60, wait_for_ready=True)
        assert [m.finished.reason for m in stream if m.HasField("finished")] == [FR.FINISH_REASON_LENGTH]
    finally:
        channel.close()
        assert again.stop() == 0


# ---- damaged bundles ------------------------------------------------------------------------------------
def _flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 3)


def _drop_the_graph_section(path: Path) -> None:
    manifest = yaml.safe_load(path.read_text())
    del manifest["graph"]
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))


@pytest.mark.parametrize("name, damage, needle", [
    ("model.onnx.data", _flip_a_byte, "checksum mismatch"),
    ("model.onnx.data", _truncate, "checksum mismatch"),
    # The graph's middle byte may sit in a tensor's external-data location: the confinement check, which reads
    # the graph before its checksum is known, then refuses it first.
    ("model.onnx", _flip_a_byte, ("checksum mismatch", "which is not one of the bundle's files")),
    ("tokenizer.json", _flip_a_byte, "checksum mismatch"),  # the byte at its middle breaks the JSON
    ("model.onnx.data", Path.unlink, "listed in the manifest but missing"),
    ("model.onnx", Path.unlink, "listed in the manifest but missing"),
    ("tokenizer.json", Path.unlink, "listed in the manifest but missing"),
    ("tokenizer_config.json", Path.unlink, "listed in the manifest but missing"),
    ("manifest.yaml", Path.unlink, "missing (is"),
    ("manifest.yaml", _drop_the_graph_section, "no graph"),
], ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_a_damaged_bundle_is_refused_at_start_naming_the_file(tiny_bundle, tmp_path, name, damage, needle):
    bundle = tmp_path / "damaged"
    shutil.copytree(tiny_bundle, bundle)
    damage(bundle / name)
    result = run("serve", "--bundle", str(bundle), "--unix", str(tmp_path / "s.sock"), timeout=60)
    assert result.returncode == 1
    needles = needle if isinstance(needle, tuple) else (needle,)
    assert f"{bundle / name}: " in result.stderr and any(n in result.stderr for n in needles), result.stderr
    assert "refusing to start" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "ready on" not in result.stdout


# ---- a full disk during `edgellm build` ------------------------------------------------------------------
def _file_size_limit(limit: int):
    """preexec_fn: files the child writes may not grow past `limit` bytes; past it, write() fails with EFBIG
    (SIGXFSZ, which would kill the child instead, is ignored)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _can_mount_a_tmpfs(folder: Path) -> bool:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs '{folder}'"], capture_output=True, timeout=30)
    return probe.returncode == 0


def _assert_refused_without_leftovers(result: subprocess.CompletedProcess, out: Path, reason: str) -> None:
    assert result.returncode == 1, result.stderr
    assert f"cannot write the bundle {out}: {reason}" in result.stderr, result.stderr
    assert "nothing of it was kept" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # nor the temporary folder it was written into


def test_a_file_size_limit_during_build_leaves_no_bundle(tiny_checkpoint, tmp_path):
    """The weights (570 kB) cannot be written past a 100 kB limit: as a full disk does, at the data file."""
    out = tmp_path / "out" / "bundle"
    out.parent.mkdir()
    result = subprocess.run([*EDGELLM, "build", str(tiny_checkpoint), "-o", str(out), "--context-length", "64"],
                            capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(100_000))
    _assert_refused_without_leftovers(result, out, "File too large")


def test_a_full_disk_during_build_leaves_no_bundle(tiny_checkpoint, tmp_path):
    """The bundle's folder on a 256 kB tmpfs (in a user and mount namespace of its own, where the system allows
    one): the weights fill it up and the write fails with ENOSPC."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if shutil.which("unshare") is None or not _can_mount_a_tmpfs(mount_point):
        pytest.skip("cannot mount a tmpfs in a user namespace here (the file size limit test covers the same path)")
    out = mount_point / "bundle"
    # The tmpfs lives as long as the namespace: what the build left on it is listed from inside.
    script = f"mount -t tmpfs -o size=256k tmpfs '{mount_point}' && {{ \"$@\"; rc=$?; echo left: $(ls -A '{mount_point}'); exit $rc; }}"
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                             *EDGELLM, "build", str(tiny_checkpoint), "-o", str(out), "--context-length", "64"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert f"cannot write the bundle {out}: No space left on device" in result.stderr, result.stderr
    assert "nothing of it was kept" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.splitlines()[-1].strip() == "left:", result.stdout


def test_a_build_killed_mid_write_leaves_nothing_the_next_build_keeps(tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    killed, running = tmp_path / ".bundle.tmp-abc123", tmp_path / ".bundle.tmp-def456"
    for folder in (killed, running):
        folder.mkdir()
        (folder / "model.onnx.data").write_bytes(b"half written")
    lock = os.open(running, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a build still writing it holds it
    try:
        build_bundle(tiny_checkpoint, out, context_length=32)
    finally:
        os.close(lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bundle", running.name])
