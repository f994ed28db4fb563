"""The TensorRT path's logic that needs no GPU: profiles, buckets, buffers, memory budget, compatibility."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from bundle_format.decode_buckets import decode_buckets
from bundle_format.kv_cache import KvCacheLayout
from bundle_format.trt_plan import (PREFILL, EngineMismatch, MemoryBudget, PrecisionUnsupported, check_engine_compatible,
                                    check_memory, check_precision_supported, decode_profile, default_max_prefill_tokens,
                                    fill_decode_inputs, graph_key, memory_budget, optimization_profiles,
                                    packed_input_elements, packed_inputs, packed_views, profiles_to_manifest,
                                    step_buffer_bytes, tensorrt_version_key)

LAYOUT = KvCacheLayout(num_layers=2, num_kv_heads=2, max_seq=129, head_dim=16, dtype="float16")


@pytest.mark.parametrize("cc", [(8, 7), (8, 6), (8, 0), (7, 5)])
def test_fp8_refused_below_89_with_int8_hint(cc):
    with pytest.raises(PrecisionUnsupported, match=r"compute capability 8\.9.*--precision int8"):
        check_precision_supported("fp8", cc, "Orin")


@pytest.mark.parametrize("cc", [(8, 9), (9, 0), (10, 0), (12, 0)])
def test_fp8_accepted_from_89(cc):
    check_precision_supported("fp8", cc)


def test_int8_and_fp16_run_on_orin_bf16_needs_ampere():
    check_precision_supported("int8", (8, 7))
    check_precision_supported("fp16", (8, 7))
    with pytest.raises(PrecisionUnsupported, match="bf16"):
        check_precision_supported("bf16", (7, 5))


def test_profiles_prefill_one_row_then_a_static_profile_per_decode_batch_size():
    profiles = optimization_profiles(LAYOUT, slots=6, max_prefill_tokens=100)
    assert len(profiles) == 1 + len(decode_buckets(6)) + 1 == 6  # prefill, decode 1, 2, 4, 6, verify
    prefill = profiles[PREFILL]
    assert prefill["input_ids"] == ((1, 1), (1, 100), (1, 100))
    assert prefill["write_indices"] == ((1,), (1,), (1,))
    for rows in decode_buckets(6):
        decode = profiles[decode_profile(rows, 6)]
        assert decode["input_ids"] == ((rows, 1),) * 3
        assert decode["logits_indices"] == ((rows, 1),) * 3
        assert set(decode) == set(prefill)
    for p in profiles:
        kv = [v for k, v in p.items() if k.startswith("past_")]
        assert len(kv) == 2 * LAYOUT.num_layers
        rows = p["write_indices"]
        assert all(s == tuple((r[0], 2, 129, 16) for r in rows) for s in kv)  # only the batch varies


def test_profile_limits_are_checked():
    with pytest.raises(ValueError, match="1..128"):
        optimization_profiles(LAYOUT, slots=4, max_prefill_tokens=129)
    with pytest.raises(ValueError, match="slots"):
        optimization_profiles(LAYOUT, slots=0, max_prefill_tokens=8)
    assert default_max_prefill_tokens(4096) == 1024 and default_max_prefill_tokens(100) == 100


def test_profiles_in_manifest_are_plain_lists():
    m = profiles_to_manifest(optimization_profiles(LAYOUT, slots=2, max_prefill_tokens=64))
    assert [p["name"] for p in m] == ["prefill", "decode_batch_1", "decode_batch_2", "verify"]
    assert m[2]["shapes"]["past_*"] == [[2, 2, 129, 16]] * 3
    assert m[0]["shapes"]["input_ids"] == [[1, 1], [1, 64], [1, 64]]


def test_packed_inputs_do_not_overlap_and_each_starts_on_a_256_byte_boundary():
    for rows, tokens in ((1, 1), (4, 1), (1, 37), (1, 64)):
        layout = packed_inputs(rows, tokens)
        spans = sorted((off, off + math.prod(shape)) for off, shape in layout.values())
        assert spans[0][0] == 0
        assert all(b[0] - a[1] in range(32) and b[0] % 32 == 0 for a, b in zip(spans, spans[1:]))  # padding < 256 B
        assert spans[-1][1] == packed_input_elements(rows, tokens)


def test_packed_views_write_into_the_one_buffer():
    buf = np.zeros(packed_input_elements(2, 3), np.int64)
    views = packed_views(buf, 2, 3)
    assert {n: v.shape for n, v in views.items()} == {n: tuple(shape) for n, (_, shape) in packed_inputs(2, 3).items()}
    for i, v in enumerate(views.values(), start=1):
        v[...] = i
    # Each view is its own part of the buffer (the rest is alignment padding, left at 0).
    assert sorted(set(buf.tolist()) - {0}) == list(range(1, len(views) + 1))
    assert sum(v.size for v in views.values()) == np.count_nonzero(buf)  # no two views share an element


def test_memory_budget_and_refusal():
    vocab = 1000
    b = memory_budget(LAYOUT, slots=4, vocab_size=vocab, max_prefill_tokens=64, engine_bytes=10 << 20,
                      activation_bytes=5 << 20)
    assert b.kv_cache == 4 * LAYOUT.bytes_per_row() == 4 * 2 * 2 * 2 * 129 * 16 * 2
    # logits: one prefill row + decode shapes 1, 2, 4; inputs: prefill packed + each decode shape packed
    inputs = packed_input_elements(1, 64) + sum(packed_input_elements(r, 1) for r in (1, 2, 4))
    assert inputs == (64 + 64 + 32 + 1) + 3 * 96 + 1 + 2 + 4  # each segment padded to 32 int64s (256 bytes)
    assert b.step_buffers == step_buffer_bytes(4, vocab, 64) == 4 * vocab * (1 + 1 + 2 + 4) + 8 * inputs
    assert b.total == b.weights + b.kv_cache + b.activations + b.step_buffers
    check_memory(b, free_bytes=b.total * 2)
    with pytest.raises(MemoryError, match="lower engine.slots"):
        check_memory(b, free_bytes=b.total)
    assert "MiB" in MemoryBudget(1 << 20, 0, 0, 0).summary()


ENGINE = {"tensorrt_version": "10.15.1.29", "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"}, "slots": 8,
          "decode_batch_sizes": [1, 2, 4, 8]}


def test_engine_compatibility():
    check_engine_compatible(ENGINE, "10.15.1.29", "NVIDIA H100", (9, 0), 8)
    with pytest.raises(EngineMismatch, match="10.15.1.29.*10.15.1.30"):  # the runtime needs the same build too
        check_engine_compatible(ENGINE, "10.15.1.30", "NVIDIA H100", (9, 0), 8)
    with pytest.raises(EngineMismatch, match="TensorRT 10.15.1.29.*11.4.1.*edgellm compile"):
        check_engine_compatible(ENGINE, "11.4.1", "NVIDIA H100", (9, 0), 8)
    with pytest.raises(EngineMismatch, match="NVIDIA H100.*Orin"):
        check_engine_compatible(ENGINE, "10.15.1.29", "Orin", (8, 7), 8)
    with pytest.raises(EngineMismatch, match="H200"):
        check_engine_compatible(ENGINE, "10.15.1.29", "NVIDIA H200", (9, 0), 8)
    with pytest.raises(EngineMismatch, match="--slots 16"):
        check_engine_compatible(ENGINE, "10.15.1.29", "NVIDIA H100", (9, 0), 16)
    assert tensorrt_version_key("11.4.1.2") == (11, 4, 1, 2) and tensorrt_version_key("10.15") == (10, 15, 0, 0)


def test_configured_slots_must_map_to_compiled_decode_profiles():
    for slots in (1, 2, 4, 8):
        check_engine_compatible(ENGINE, "10.15.1.29", "NVIDIA H100", (9, 0), slots)
    with pytest.raises(EngineMismatch, match=r"engine.slots 6 .*\[1, 2, 4, 6\].*one of \[1, 2, 4, 8\]"):
        check_engine_compatible(ENGINE, "10.15.1.29", "NVIDIA H100", (9, 0), 6)


def test_graph_keys_separate_profiles_and_shapes():
    keys = {graph_key(decode_profile(r, 8), r, 1) for r in decode_buckets(8)} | {graph_key(PREFILL, 1, 1)}
    assert len(keys) == len(decode_buckets(8)) + 1


def test_timing_cache_is_kept_per_tensorrt_version_and_gpu(tmp_path):
    from build_engine.trt_compiler import default_timing_cache

    a = default_timing_cache(tmp_path / "bundle", "10.15.1.29", "NVIDIA H100 80GB HBM3")
    assert a.parent == tmp_path.resolve()
    assert a.name == ".edgellm-timing-trt10.15.1.29-NVIDIA-H100-80GB-HBM3.cache"
    assert default_timing_cache(tmp_path / "bundle", "11.4.1", "NVIDIA H100 80GB HBM3") != a
    assert default_timing_cache(tmp_path / "other", "10.15.1.29", "Orin") != a


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_availability_is_explained():
    from build_engine.trt_compiler import tensorrt_available

    assert "pip install 'edgellm[tensorrt-cu13]'" in tensorrt_available() and "--system-site-packages" in tensorrt_available()


def test_decode_positions_become_the_graph_inputs_idle_rows_write_to_the_scratch_slot():
    positions = np.array([7, -1, 0, 12], np.int64)
    position_ids, write_indices = np.full((4, 1), 99, np.int64), np.full(4, 99, np.int64)
    fill_decode_inputs(positions, position_ids, write_indices, scratch_position=64)
    assert position_ids[:, 0].tolist() == [7, 0, 0, 12]
    assert write_indices.tolist() == [7, 64, 0, 12]
