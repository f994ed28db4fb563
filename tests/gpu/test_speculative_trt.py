"""Speculative decoding's verify pass on TensorRT (pytest -m gpu): the engine's verify profile gives at every
position the logits that decode steps give, and greedy output through the engine is the same with speculation.
Skipped wherever TensorRT or a CUDA GPU is missing (this project's build machines), with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from build_engine.trt_compiler import tensorrt_available

_MISSING = tensorrt_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_MISSING is not None, reason=f"needs TensorRT and a GPU: {_MISSING}")]

SLOTS = 2


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    from build_engine import accuracy
    from build_engine.build import build_bundle
    from build_engine.trt_compiler import compile_bundle
    from tiny_models import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "llama", head_dim=64, hidden_size=128)
    saved = dict(accuracy.THRESHOLDS)  # a random model's flat logits miss the trained-model thresholds
    accuracy.THRESHOLDS.update({k: (2.0, 0.0) for k in accuracy.THRESHOLDS})
    try:
        path = build_bundle(ckpt, tmp_path_factory.mktemp("trt") / "fp16", target="tensorrt", precision="fp16",
                            context_length=64)
    finally:
        accuracy.THRESHOLDS.update(saved)
    compile_bundle(path, slots=SLOTS, max_prefill_tokens=16)
    return path


def test_verify_pass_matches_decode_steps(compiled):
    from bundle_format.bundle import load_bundle
    from daemon.backend_trt import TrtBackend

    bundle = load_bundle(compiled)
    assert load_bundle(compiled).manifest["engine"]["profiles"][-1]["name"] == "verify"
    backend = TrtBackend(bundle, SLOTS)
    try:
        assert backend.max_score_tokens > 8
        prompt, step = [5, 17, 33, 2, 9], [41, 12, 7, 3]
        backend.prefill(0, prompt, 0)
        decoded = [backend.decode([0], [t], [len(prompt) + i])[0].copy() for i, t in enumerate(step)]
        backend.prefill(1, prompt, 0)
        scored = backend.score(1, step, len(prompt)).copy()
        assert scored.shape == (len(step), bundle.model["vocab_size"])
        for want, got in zip(decoded, scored):
            assert int(np.argmax(got)) == int(np.argmax(want))
            assert float(np.abs(got - want).max()) < 0.05 * float(np.abs(want).max())
        with pytest.raises(ValueError, match="verify pass"):
            backend.score(0, list(range(backend.max_score_tokens + 1)), 0)
    finally:
        backend.close()


def test_greedy_output_is_the_same_with_speculation(compiled):
    from bundle_format.bundle import load_bundle
    from daemon.backend_trt import TrtBackend
    from daemon.config import SpeculativeConfig
    from daemon.engine import Engine
    from daemon.sampling import SamplingParams
    from daemon.sequence import Sequence, TokenEvent
    from daemon.tokenizer import Tokenizer

    bundle = load_bundle(compiled)
    tok = Tokenizer.from_dir(bundle.path, extra_eos_ids=bundle.model["eos_token_ids"])
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    outputs = []
    backend = TrtBackend(bundle, SLOTS)
    try:
        for spec in (None, SpeculativeConfig(enabled=True, ngram_min=1)):
            eng = Engine(backend, tok, bundle.context_length, speculative=spec, clock=lambda: 0.0)
            events: list = []
            eng.submit(Sequence(prompt, SamplingParams(temperature=0), 30, ignore_eos=True, sink=events.append))
            while eng.scheduler.running or eng.scheduler.waiting:
                eng.step()
            outputs.append([t for e in events if isinstance(e, TokenEvent) for t in e.token_ids])
    finally:
        backend.close()
    assert outputs[0] == outputs[1] and len(outputs[0]) == 30
