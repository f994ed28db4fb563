"""CPU int8/int4 (weight-only MatMulNBits) against the fp32 graph: tiny random models and the demo model.

Tolerances fit each precision. On the tiny model (random weights of std 0.15, far harder to quantize than a
trained model) int8 logits stay within a mean absolute error of 5% of the fp32 logits' spread and agree on
the top-1 token at >= 90% of positions; int4, whose 16 levels per block move each logit by tens of percent
there, must still correlate >= 0.9 with fp32 (a wrong layout or scale gives ~0). Decode steps, which run the
kernels with one row, match the same graph's prefill to 1e-3. The demo model is checked on what users get:
the build's accuracy report and greedy output. An int8 KV cache (`--kv-cache int8`) is held to the same checks,
with the cache's own rounding allowed for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from tokenizers import Tokenizer

from build_engine.accuracy import THRESHOLDS, AccuracyError, all_position_logits
from build_engine.build import BuildError, build_bundle
from build_engine.cpu_graph import build_cpu_graph
from build_engine.graph_builder import save_graph
from build_engine.kv_quant import kv_cache_scales, quantize_kv_cache
from build_engine.weight_quant import (BLOCK_SIZES, LM_HEAD_NODE, bits_per_weight, int4_blocks, int4_scales,
                                       quantize_weights)
from bundle_format.bundle import load_bundle
from bundle_format.kv_cache import KvCacheLayout
from daemon.backend_onnx import OnnxBackend, create_cpu_backend
from edgellm.validate import greedy

MAX_SEQ = 65


@pytest.fixture(scope="module")
def tiny_graphs(tiny_loaded, tmp_path_factory) -> dict[str, Path]:
    spec, weights, *_ = tiny_loaded
    out = tmp_path_factory.mktemp("precisions")
    paths = {}
    for precision in ("fp32", "int8", "int4"):
        graph = build_cpu_graph(spec, weights, max_seq=MAX_SEQ)
        if precision != "fp32":
            graph = quantize_weights(graph, precision)
        paths[precision] = out / f"{precision}.onnx"
        save_graph(graph, paths[precision])
    # int8 weights and an int8 KV cache, its scales calibrated on other tokens than the tests'.
    graph = quantize_weights(build_cpu_graph(spec, weights, max_seq=MAX_SEQ), "int8")
    calibration = np.random.default_rng(7).integers(0, spec.vocab_size, 96).tolist()
    quantize_kv_cache(graph, kv_cache_scales(paths["fp32"], calibration, MAX_SEQ - 1))
    paths["int8-kv8"] = out / "int8-kv8.onnx"
    save_graph(graph, paths["int8-kv8"])
    return paths


@pytest.fixture(scope="module")
def tiny_ids(tiny_loaded) -> list[int]:
    spec, *_ = tiny_loaded
    return np.random.default_rng(0).integers(0, spec.vocab_size, 48).tolist()


def test_every_linear_layer_becomes_matmulnbits(tiny_graphs, tiny_loaded):
    spec, *_ = tiny_loaded
    for precision, bits in (("int8", 8), ("int4", 4)):
        model = onnx.load(tiny_graphs[precision], load_external_data=False)
        nbits = {n.output[0]: n for n in model.graph.node if n.op_type == "MatMulNBits"}
        # Per layer: q+k+v fused, o, gate+up fused, down; and the vocabulary projection.
        assert len(nbits) == 4 * spec.num_layers + 1
        n_out = {out: next(a.i for a in n.attribute if a.name == "N") for out, n in nbits.items()}
        qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
        assert n_out["l0.qkv"] == qkv and n_out["l0.gate_up"] == 2 * spec.intermediate_size
        assert not [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
        head = {a.name: a.i for a in nbits[LM_HEAD_NODE].attribute if a.name in ("bits", "block_size")}
        assert head == {"bits": 8, "block_size": 64}  # 8 bits for the vocabulary projection, whatever the layers get
        layer_bits = {a.i for out, n in nbits.items() if out != LM_HEAD_NODE for a in n.attribute if a.name == "bits"}
        assert layer_bits == {bits}
        blocks = {a.i for out, n in nbits.items() if out != LM_HEAD_NODE for a in n.attribute if a.name == "block_size"}
        assert blocks == {64}  # 8.5 and 4.5 bits per weight: Q8_0's and Q4_0's


@pytest.mark.parametrize("precision, layers", [("int8", 8.5), ("int4", 4.5)])
def test_bits_per_weight_match_llama_cpp_formats(tiny_graphs, precision, layers):
    """int4 streams Q4_0's 4.5 bits per weight (4-bit levels + an fp32 scale per 64 rows), int8 Q8_0's 8.5; the
    vocabulary projection is 8.5 at both."""
    model = onnx.load(tiny_graphs[precision])
    assert bits_per_weight(model) == {"layers": layers, "vocabulary_projection": 8.5}


def _dequantize_int4(packed: np.ndarray, scales: np.ndarray, k: int, block: int) -> np.ndarray:
    n = packed.shape[0]
    levels = np.stack([packed & 15, packed >> 4], -1).reshape(n, -1, block).astype(np.float32) - 8
    return (levels * scales.reshape(n, -1, 1)).reshape(n, -1)[:, :k].T


def test_int4_layout_is_what_matmulnbits_reads():
    """The packed levels and scales, dequantized here, are the matrix ONNX Runtime's kernel multiplies by (low
    nibble first, blocks along K, K padded to whole blocks): a wrong order or offset is off by the weights' size."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    k, n, block = 160, 48, BLOCK_SIZES[4]  # 160 rows: the last block is padded
    w = rng.normal(0, 0.1, (k, n)).astype(np.float32)
    packed, scales = int4_blocks(w, block)
    assert packed.shape == (n, 3, block // 2) and scales.shape == (n * 3,) and (scales > 0).all()
    deq = _dequantize_int4(packed, scales, k, block)
    assert np.abs(deq - w).mean() <= 0.35 * scales.mean()  # rounding: a quarter of a level on average, plus clipping
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s")])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(0, 1, (4, k)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ deq, atol=1e-4)


def test_int4_scale_search_beats_the_q4_0_rule_where_activations_are_large():
    """The searched scales lose less than llama.cpp's Q4_0 rule (largest magnitude / 8), in the error weighted by
    the activations' sizes; weighting by them keeps the rows with large activations better than an unweighted search."""
    rng = np.random.default_rng(2)
    blocks = rng.standard_t(4, (512, 64)).astype(np.float32) * 0.05  # heavy tails, as trained weights have
    importance = np.exp(rng.normal(0, 1.5, 64)).astype(np.float32)  # a few channels carry most of the activation

    def weighted_error(scales: np.ndarray) -> float:
        q = np.clip(np.rint(blocks / scales[:, None]), -8, 7)
        return float((importance * np.square(q * scales[:, None] - blocks)).sum())

    q4_0 = weighted_error(np.abs(blocks).max(-1) / 8)
    unweighted, weighted = weighted_error(int4_scales(blocks)), weighted_error(int4_scales(blocks, importance))
    assert weighted < unweighted < q4_0
    assert weighted < 0.9 * q4_0


@pytest.mark.parametrize("precision", ["int8", "int4", "int8-kv8"])
def test_quantized_logits_follow_fp32(tiny_graphs, tiny_ids, precision):
    ref = all_position_logits(tiny_graphs["fp32"], tiny_ids)
    got = all_position_logits(tiny_graphs[precision], tiny_ids)
    assert got.shape == ref.shape
    if precision == "int8":
        assert np.abs(got - ref).mean() < 0.05 * ref.std()
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    elif precision == "int8-kv8":  # measured 8.5% and 90% (x86-64); the cache's rounding adds to the weights'
        assert np.abs(got - ref).mean() < 0.12 * ref.std()
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
    else:
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] >= 0.9


@pytest.mark.parametrize("precision", ["int8", "int4", "int8-kv8"])
def test_decode_steps_match_prefill(tiny_graphs, tiny_ids, tiny_loaded, precision):
    """One-row decode steps through the daemon's backend give the logits of one prefill over the same tokens (with
    an int8 cache too: a prefill attends over the tokens it writes as the cache holds them, quantized)."""
    spec, *_ = tiny_loaded
    full = all_position_logits(tiny_graphs[precision], tiny_ids)
    kv_dtype = "int8" if precision.endswith("kv8") else "float32"
    layout = KvCacheLayout(spec.num_layers, spec.num_kv_heads, MAX_SEQ, spec.head_dim, kv_dtype)
    backend = OnnxBackend(tiny_graphs[precision], layout, spec.vocab_size, slots=1, threads=1)
    split = 16
    np.testing.assert_allclose(backend.prefill(0, tiny_ids[:split], 0), full[split - 1], atol=1e-3)
    # A one-row step may take another kernel than a many-row one: on x86-64 (AVX-512) they agree within 1e-3; on
    # aarch64 (NEON with dot product, under qemu) the 8-bit one-row kernel differs by up to 0.046. A cache or
    # position fault moves logits by far more: each step must sit within the tolerance of its own position's
    # logits and far from the previous position's.
    tol = 0.1
    for pos in range(split, len(tiny_ids)):
        got = backend.decode([0], [tiny_ids[pos]], [pos])[0]
        assert np.abs(got - full[pos]).max() <= tol, (pos, np.abs(got - full[pos]).max())
        assert np.abs(got - full[pos - 1]).max() > 10 * tol


def test_int8_bundle_reports_accuracy_and_reads_fewer_bytes(tiny_checkpoint, tiny_bundle, tmp_path):
    path = build_bundle(tiny_checkpoint, tmp_path / "int8", precision="int8", context_length=MAX_SEQ - 1)
    m = load_bundle(path).manifest
    acc = m["accuracy"]
    assert acc["measured"] and acc["perplexity_ratio"] <= acc["max_perplexity_ratio"] == THRESHOLDS["int8"][0]
    assert acc["top1_agreement"] >= acc["min_top1_agreement"]
    assert "MatMulNBits" in m["quantization"]["method"]
    fp32_bytes = load_bundle(tiny_bundle).manifest["graph"]["weight_bytes_per_token"]
    assert 0 < m["graph"]["weight_bytes_per_token"] < 0.4 * fp32_bytes


def test_int4_bundle_passes_its_accuracy_check_and_accounts_its_bytes(tmp_path, capsys):
    """A tiny model with weights of a trained model's size (std 0.02) builds at int4 within the int4 limits; the
    manifest records Q4_0's bits per weight, and its bytes per token are the levels, scales and fp32 leftovers."""
    from tiny_models import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "llama", initializer_range=0.02, hidden_size=128,
                                intermediate_size=256, head_dim=32)
    path = build_bundle(ckpt, tmp_path / "int4", precision="int4", context_length=MAX_SEQ - 1)
    m = load_bundle(path).manifest
    acc = m["accuracy"]
    assert acc["perplexity_ratio"] <= THRESHOLDS["int4"][0] and acc["top1_agreement"] >= THRESHOLDS["int4"][1]
    assert acc["top1_agreement"] < 1.0  # it is quantized
    assert m["quantization"]["bits_per_weight"] == {"layers": 4.5, "vocabulary_projection": 8.5}
    spec = m["model"]
    h, i, layers, vocab = spec["hidden_size"], spec["intermediate_size"], spec["num_layers"], spec["vocab_size"]
    qkv = (spec["num_heads"] + 2 * spec["num_kv_heads"]) * spec["head_dim"]
    linear = layers * (h * qkv + spec["num_heads"] * spec["head_dim"] * h + h * 2 * i + i * h)
    fp32 = 4 * (layers * 2 * h + h)  # the norms' weights
    rope = 4 * (MAX_SEQ * spec["head_dim"])  # the cos and sin tables (half a head each)
    expected = linear * 4.5 / 8 + h * vocab * 8.5 / 8 + fp32 + rope
    assert expected <= m["graph"]["weight_bytes_per_token"] < expected + 256  # + a few shape and split constants
    from edgellm.cli import main

    assert main(["info", str(path)]) == 0  # what a user sees
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["weight_bytes_per_token"] == m["graph"]["weight_bytes_per_token"]
    assert shown["bits_per_weight"] == {"layers": 4.5, "vocabulary_projection": 8.5}


def test_a_build_that_loses_too_much_is_refused(tiny_checkpoint, tmp_path):
    """int4 on the tiny random model falls outside the int4 limits (measured: top-1 agreement ~50%): the build
    is refused and writes no bundle."""
    with pytest.raises(AccuracyError, match="int4 loses too much accuracy"):
        build_bundle(tiny_checkpoint, tmp_path / "int4", precision="int4", context_length=MAX_SEQ - 1)
    assert not (tmp_path / "int4").exists()


def test_unknown_cpu_precision_is_refused_by_name(tiny_checkpoint, tmp_path):
    with pytest.raises(BuildError, match="fp8.*choose from: fp32, int8, int4"):
        build_bundle(tiny_checkpoint, tmp_path / "x", target="cpu", precision="fp8")


@pytest.mark.slow
def test_demo_model_int8_and_int4(demo_gguf, tmp_path):
    """The demo model at each CPU precision: within its accuracy limits, and its next tokens close to fp32's."""
    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
    prompt = fp32_tokens = None
    for precision in ("fp32", "int8", "int4"):
        path = build_bundle(demo_gguf, tmp_path / precision, precision=precision, context_length=384)
        bundle = load_bundle(path)
        if precision != "fp32":
            acc = bundle.manifest["accuracy"]
            assert acc["perplexity_ratio"] <= THRESHOLDS[precision][0]
            assert acc["top1_agreement"] >= THRESHOLDS[precision][1]
        backend = create_cpu_backend(bundle, slots=1)
        if fp32_tokens is None:  # fp32's greedy continuation, through the backend's decode steps
            prompt = Tokenizer.from_file(str(path / "tokenizer.json")).encode(text).ids
            fp32_tokens = greedy(backend, prompt, 16)
            assert Tokenizer.from_file(str(path / "tokenizer.json")).decode(fp32_tokens[:2]).strip() == "Rome."
            continue
        # Teacher-forced: after the prompt and each of fp32's tokens, does this precision pick fp32's next one?
        picks = greedy(backend, prompt, len(fp32_tokens), forced=fp32_tokens)
        agreement = np.mean(np.array(picks) == np.array(fp32_tokens))
        # Measured: int8 15/16, int4 13/16.
        assert agreement >= {"int8": 0.85, "int4": 0.6}[precision], (precision, picks, fp32_tokens)


def test_int8_kv_cache_bundle_holds_a_quarter_of_the_memory(tiny_checkpoint, tmp_path, capsys):
    """`--kv-cache int8`: the build calibrates the cache's scales and checks accuracy with them; the backend holds
    the cache in int8, a quarter of fp32's bytes. (A daemon serving it: test_prefix_cache.py.)"""
    from edgellm.cli import main

    path = build_bundle(tiny_checkpoint, tmp_path / "kv8", precision="int8", context_length=128, kv_cache="int8")
    bundle = load_bundle(path)
    m = bundle.manifest
    assert m["graph"]["kv_cache"]["dtype"] == "int8" and "int8" in m["quantization"]["kv_cache"]
    assert m["accuracy"]["perplexity_ratio"] <= THRESHOLDS["int8"][0]
    graph = onnx.load(bundle.graph_path, load_external_data=False)
    caches = {i.type.tensor_type.elem_type for i in graph.graph.input if i.name.startswith("past_")}
    assert caches == {onnx.TensorProto.INT8}
    fp32_layout = dataclasses.replace(bundle.kv_cache, dtype="float32")
    assert bundle.kv_cache.bytes_per_row() * 4 == fp32_layout.bytes_per_row()
    backend = create_cpu_backend(bundle, slots=2)
    assert backend.cache[0][0].dtype == np.int8 and backend.kv_cache_bytes == 2 * bundle.kv_cache.bytes_per_row()
    assert main(["info", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["kv_cache"] == {"dtype": "int8", "bytes_per_slot": bundle.kv_cache.bytes_per_row()}


@pytest.mark.parametrize("target, precision, kv_cache, message", [
    ("cpu", "fp32", "int8", "int8 and int4 precisions"),
    ("tensorrt", "int8", "int8", "not for tensorrt int8"),
    ("cpu", "int8", "int4", "KV cache 'int4' is not available"),
])
def test_a_kv_cache_the_build_cannot_make_is_refused_by_name(tiny_checkpoint, tmp_path, target, precision, kv_cache,
                                                            message):
    with pytest.raises(BuildError, match=message):
        build_bundle(tiny_checkpoint, tmp_path / "x", target=target, precision=precision, kv_cache=kv_cache)
    assert not (tmp_path / "x").exists()


def test_a_bundle_with_an_unknown_kv_cache_type_is_refused_at_load(tiny_bundle, tmp_path):
    import shutil

    from bundle_format.bundle import BundleError

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    manifest = yaml.safe_load((copy / "manifest.yaml").read_text())
    manifest["graph"]["kv_cache"]["dtype"] = "int3"
    (copy / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(BundleError, match="KV cache type int3, which this edgellm cannot hold"):
        load_bundle(copy, verify=False)
