"""INT8 / FP8 Q/DQ quantization and the TensorRT build's first stage, measured in ONNX Runtime on the CPU."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import yaml

from build_engine.accuracy import THRESHOLDS, all_position_logits, default_text
from build_engine.build import build_bundle
from build_engine.graph_builder import save_graph
from build_engine.trt_graph import build_graph
from build_engine.quantize import (calibrate, float32_twin, linear_inputs, linear_nodes, quantize_for_target,
                                   quantize_graph, quantize_weight, smooth_weights)
from build_engine.trt_build import token_ids
from bundle_format.bundle import load_bundle
from edgellm import cli

NO_TENSORRT = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
MAX_SEQ = 129


def test_weight_quantization_is_symmetric_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 8)).astype(np.float32) * np.arange(1, 9, dtype=np.float32)  # columns of different range
    for precision, qmax, tol in (("int8", 127, 0.5 / 127), ("fp8", 448, 1 / 16)):
        q, scale = quantize_weight(w, precision)
        assert scale.shape == (8,)
        np.testing.assert_allclose(np.abs(q.astype(np.float32)).max(axis=0), qmax)  # each column uses its full range
        back = q.astype(np.float32) * scale
        assert np.all(np.abs(back - w) <= tol * np.abs(w).max(axis=0) + 1e-7)


def test_qdq_placement(tiny_loaded):
    spec, weights, tok_json, *_ = tiny_loaded
    g = build_graph(spec, weights, max_seq=MAX_SEQ)
    inputs = linear_inputs(g)
    assert len(linear_nodes(g)) == 7 * spec.num_layers and len(inputs) == 4 * spec.num_layers  # q/k/v and gate/up share
    amax = calibrate(g, token_ids(tok_json, default_text("calibration")), MAX_SEQ)
    assert all(v > 0 for v in amax.values())
    quantize_graph(g, "int8", amax)
    ops = [n.op_type for n in g.graph.node]
    assert ops.count("QuantizeLinear") == len(inputs)
    assert ops.count("DequantizeLinear") == len(inputs) + 7 * spec.num_layers
    types = {t.name: t.data_type for t in g.graph.initializer}
    assert all(types[n.input[1].removesuffix(".dq") + ".q"] == onnx.TensorProto.INT8 for n in linear_nodes(g))
    assert types["model.embed_tokens.weight"] == onnx.TensorProto.FLOAT  # embedding / lm_head untouched
    onnx.checker.check_model(g)


def test_smoothing_keeps_the_function_and_shrinks_outliers(tiny_loaded, tmp_path):
    spec, weights, tok_json, *_ = tiny_loaded
    calib = token_ids(tok_json, default_text("calibration"))
    g = build_graph(spec, weights, max_seq=MAX_SEQ)
    channel = calibrate(g, calib, MAX_SEQ, per_channel=True)
    smoothed = dict(weights)
    assert smooth_weights(g, smoothed, channel, 0.75) == 3 * spec.num_layers  # attn_norm, mlp_norm, gate_up per layer
    save_graph(g, tmp_path / "a.onnx")
    save_graph(build_graph(spec, smoothed, max_seq=MAX_SEQ), tmp_path / "b.onnx")
    ids = calib[:40]
    np.testing.assert_allclose(all_position_logits(tmp_path / "b.onnx", ids), all_position_logits(tmp_path / "a.onnx", ids),
                               rtol=1e-3, atol=1e-3)
    after = calibrate(build_graph(spec, smoothed, max_seq=MAX_SEQ), calib, MAX_SEQ, per_channel=True)
    spread = lambda a: float(a.max() / np.median(a))  # noqa: E731
    assert np.mean([spread(after[k]) for k in channel]) < np.mean([spread(channel[k]) for k in channel])


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tiny_model_accuracy(tiny_loaded, precision):
    spec, weights, tok_json, *_ = tiny_loaded
    calib, held = token_ids(tok_json, default_text("calibration")), token_ids(tok_json, default_text("heldout"))
    _, amax, report = quantize_for_target(spec, weights, precision, MAX_SEQ, calib, held)
    assert report.tokens == min(len(held), MAX_SEQ - 1)
    # A random model's logits are flat, so agreement is looser than on a trained model, but close.
    assert 0.95 < report.perplexity_ratio < 1.05
    assert report.top1_agreement > 0.75
    assert report.perplexity_candidate != report.perplexity_reference  # the Q/DQ nodes did round


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_float32_twin_of_the_deploy_graph(tiny_loaded, tmp_path, precision):
    """What `edgellm validate` uses as its CPU reference: the fp16+Q/DQ graph widened to float32."""
    spec, weights, tok_json, *_ = tiny_loaded
    calib = token_ids(tok_json, default_text("calibration"))
    g32 = build_graph(spec, weights, max_seq=MAX_SEQ)
    amax = calibrate(g32, calib, MAX_SEQ)
    save_graph(quantize_graph(g32, precision, amax), tmp_path / "measured.onnx")
    deploy = quantize_graph(build_graph(spec, weights, max_seq=MAX_SEQ, dtype="float16", live_kv_prefix=False),
                            precision, amax)
    twin = float32_twin(deploy)
    kinds = {t.data_type for t in twin.graph.initializer}
    assert onnx.TensorProto.FLOAT16 not in kinds and {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64} < kinds
    assert {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}[precision] in kinds
    assert all(v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for v in [*twin.graph.input, *twin.graph.output])
    save_graph(twin, tmp_path / "twin.onnx")
    ids = calib[:50]
    a, b = all_position_logits(tmp_path / "measured.onnx", ids), all_position_logits(tmp_path / "twin.onnx", ids)
    # Same Q/DQ placement and scales; weights and tables went through fp16 once, and on a random model's flat
    # logits that flips about as many top-1s as the quantization itself does (~80% agreement).
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.7
    assert np.abs(a - b).max() < 0.25 * np.abs(a).max()


def test_static_attention_span_graph_matches(tiny_loaded, tmp_path):
    spec, weights, tok_json, *_ = tiny_loaded
    save_graph(build_graph(spec, weights, max_seq=MAX_SEQ), tmp_path / "live.onnx")
    save_graph(build_graph(spec, weights, max_seq=MAX_SEQ, live_kv_prefix=False), tmp_path / "static.onnx")
    ids = token_ids(tok_json, default_text("heldout"))[:30]
    np.testing.assert_allclose(all_position_logits(tmp_path / "static.onnx", ids),
                               all_position_logits(tmp_path / "live.onnx", ids), rtol=1e-4, atol=1e-4)


def test_cli_build_tensorrt_writes_graph_and_accuracy_and_says_where_to_compile(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "trt"
    assert cli.main(["build", str(tiny_checkpoint), "-o", str(out), "--target", "tensorrt", "--precision", "fp16",
                     "--context-length", "64"]) == 0
    captured = capsys.readouterr()
    assert "top-1 agreement" in captured.out
    assert f"edgellm compile {out}" in captured.err and "TensorRT is not installed" in captured.err
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m["target"] == "tensorrt" and m["precision"] == "fp16" and "engine" not in m
    assert m["graph"]["kv_cache"]["dtype"] == "float16"
    assert m["accuracy"]["measured"] and m["accuracy"]["perplexity_ratio"] < THRESHOLDS["fp16"][0]
    ops = {n.op_type for n in onnx.load(str(bundle.graph_path), load_external_data=False).graph.node}
    assert "ReduceMax" not in ops  # no data-dependent shapes for TensorRT


def test_cli_build_fails_on_accuracy_loss_and_writes_nothing(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(THRESHOLDS, "int8", (1.0001, 0.999))
    out = tmp_path / "trt"
    assert cli.main(["build", str(tiny_checkpoint), "-o", str(out), "--target", "tensorrt", "--precision", "int8",
                     "--context-length", "64"]) == 1
    err = capsys.readouterr().err
    assert "int8 loses too much accuracy" in err and "top-1 agreement" in err
    assert not out.exists()


def test_cli_build_refuses_unknown_combinations(tiny_checkpoint, tmp_path, capsys):
    assert cli.main(["build", str(tiny_checkpoint), "-o", str(tmp_path / "x"), "--target", "tensorrt",
                     "--precision", "fp32"]) == 1
    assert "choose from: fp16, bf16, int8, fp8" in capsys.readouterr().err
    assert cli.main(["build", str(tiny_checkpoint), "-o", str(tmp_path / "x"), "--target", "tensorrt",
                     "--precision", "int8", "--calib", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt" in capsys.readouterr().err


@NO_TENSORRT
def test_cli_compile_and_validate_say_tensorrt_is_missing(tmp_path, capsys):
    for cmd in ("compile", "validate"):
        assert cli.main([cmd, str(tmp_path)]) == 1
        assert "TensorRT is not installed" in capsys.readouterr().err


@NO_TENSORRT
def test_serving_a_tensorrt_bundle_without_tensorrt_is_refused(tiny_checkpoint, tmp_path):
    from daemon.backends import BackendError, create_backend
    from daemon.config import parse_config

    path = build_bundle(tiny_checkpoint, tmp_path / "b", target="tensorrt", precision="bf16", context_length=32)
    with pytest.raises(BackendError, match="TensorRT bundle.*edgellm\\[tensorrt\\]"):
        create_backend(load_bundle(path), parse_config({}))


def test_update_bundle_keeps_checksums_valid(tiny_bundle, tmp_path):
    import shutil

    from build_engine.bundle_writer import update_bundle

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    before = load_bundle(copy).bundle_id
    update_bundle(copy, {"model.engine": b"\0engine"}, {"engine": {"file": "model.engine"}})
    b = load_bundle(copy)  # verifies every checksum
    assert b.manifest["engine"] == {"file": "model.engine"} and "model.engine" in b.manifest["files"]
    assert b.bundle_id != before
    (copy / "model.engine").write_bytes(b"changed")
    with pytest.raises(Exception, match="model.engine: checksum mismatch"):
        load_bundle(copy)


# ------------------------------------------------------------------------------------------ the demo model


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_demo_model_quantized_bundle_within_thresholds(demo_gguf, precision, tmp_path):
    path = build_bundle(demo_gguf, tmp_path / precision, target="tensorrt", precision=precision, context_length=512)
    m = yaml.safe_load((path / "manifest.yaml").read_text())
    acc = m["accuracy"]
    max_ratio, min_agreement = THRESHOLDS[precision]
    assert acc["tokens"] > 300
    assert 1.0 < acc["perplexity_ratio"] <= max_ratio and acc["top1_agreement"] >= min_agreement
    assert acc["top1_agreement"] < 0.999  # it is quantized
    qtype = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}[precision]
    g = onnx.load(str(path / "model.onnx"), load_external_data=False)
    quantized = [t for t in g.graph.initializer if t.data_type == qtype and t.name.endswith(".weight.T.q")]
    assert len(quantized) == 7 * m["model"]["num_layers"]
