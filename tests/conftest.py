"""Shared fixtures: a tiny random-weight model's bundle, and a real daemon serving it in-process."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemon.backend_onnx import create_cpu_backend  # noqa: E402
from daemon.bundle import load_bundle  # noqa: E402
from daemon.config import parse_config  # noqa: E402
from daemon.lifecycle import Daemon, warm_up  # noqa: E402
from daemon.tokenizer import Tokenizer  # noqa: E402
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc  # noqa: E402

TINY_CONTEXT = 128


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from build_engine.build import build_bundle

    return build_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundles") / "tiny", context_length=TINY_CONTEXT)


class DaemonThread:
    """A real Daemon (engine thread + grpc.aio server) on its own event loop in a background thread."""

    def __init__(self, bundle_path: Path, config: dict):
        self.config = parse_config(config)
        self.bundle = load_bundle(bundle_path)
        self.loop = asyncio.new_event_loop()
        self.daemon: Daemon | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> "DaemonThread":
        self._thread.start()
        tokenizer = Tokenizer.from_dir(self.bundle.path, extra_eos_ids=self.bundle.model["eos_token_ids"])
        backend = create_cpu_backend(self.bundle, self.config.engine.slots, threads=1)
        warm_up(backend, self.config.engine.slots)
        self.daemon = Daemon(self.config, self.bundle, tokenizer, backend)
        asyncio.run_coroutine_threadsafe(self.daemon.start(), self.loop).result(30)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.daemon.stop(grace=1), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def engine(self):
        return self.daemon.engine

    def stub(self, address: str | None = None) -> pb_grpc.InferenceStub:
        channel = grpc.insecure_channel(address or self.daemon.addresses[0])
        return pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def daemon(tiny_bundle, tmp_path_factory):
    sock = tmp_path_factory.mktemp("sock") / "edgellm.sock"
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(sock), "tcp": "127.0.0.1:0"},
                                   "engine": {"slots": 4, "max_queued": 8},
                                   "generation": {"default_max_new_tokens": 16}}).start()
    yield d
    d.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll a condition owned by another thread until it holds or the timeout passes."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        threading.Event().wait(0.005)
    return True
