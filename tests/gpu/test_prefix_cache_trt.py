"""The prefix cache's copies on the TensorRT backend, on real hardware (pytest -m gpu): a slot's K/V read out to a
host block and written into another slot give that slot the same logits as a full prefill.

Skipped wherever TensorRT or a CUDA GPU is missing; tests/test_prefix_cache.py checks the copies' addressing
(kv_copy_plan) with numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from build_engine.trt_compiler import tensorrt_available

_MISSING = tensorrt_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_MISSING is not None, reason=f"needs TensorRT and a GPU: {_MISSING}")]

SLOTS = 4


@pytest.fixture(scope="module")
def fp16_engine(tiny_checkpoint, tmp_path_factory) -> Path:
    from build_engine import accuracy
    from build_engine.build import build_bundle
    from build_engine.trt_compiler import compile_bundle

    saved = dict(accuracy.THRESHOLDS)  # a random model's flat logits miss the trained-model thresholds
    accuracy.THRESHOLDS.update({k: (2.0, 0.0) for k in accuracy.THRESHOLDS})
    try:
        path = build_bundle(tiny_checkpoint, tmp_path_factory.mktemp("trt-prefix") / "fp16", target="tensorrt",
                            precision="fp16", context_length=64)
    finally:
        accuracy.THRESHOLDS.update(saved)
    compile_bundle(path, slots=SLOTS, max_prefill_tokens=16)
    return path


def test_blocks_copied_between_slots_give_the_full_prefill_logits(fp16_engine):
    from bundle_format.bundle import load_bundle
    from daemon.backend_trt import TrtBackend

    backend = TrtBackend(load_bundle(fp16_engine), SLOTS)
    try:
        prompt = list(range(3, 43))  # 40 tokens: 32 from the copied blocks, 8 prefilled
        full = backend.prefill(0, prompt, 0).copy()
        kv = backend.read_kv(0, 0, 32)
        assert kv.shape == (backend.layout.num_layers, 2, backend.layout.num_kv_heads, 32, backend.layout.head_dim)
        backend.write_kv(2, 0, kv[:, :, :, :16])
        backend.write_kv(2, 16, kv[:, :, :, 16:])
        np.testing.assert_array_equal(backend.read_kv(2, 0, 32), kv)  # bit for bit
        restored = backend.prefill(2, prompt[32:], 32).copy()
        np.testing.assert_allclose(restored, full, rtol=0, atol=2e-2)
        assert int(restored.argmax()) == int(full.argmax())
    finally:
        backend.close()
