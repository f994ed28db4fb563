"""The GPU path's fixes that logic alone can check (issue 19): no TensorRT, pycuda or GPU needed.

Address alignment, binding checks, KV aliasing (against a plain description of an engine's outputs),
TensorScatter's axis, fp16 Q/DQ scales, the engine inspector's JSON, CUDA-graph capture fallback, the
environment report of `edgellm validate`, the install extras, the systemd drop-ins and the smoke script.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest

from bundle_format.kv_cache import KvCacheLayout
from bundle_format.trt_plan import (ADDRESS_ALIGNMENT, BindingError, EngineMismatch, EngineRefused, aligned_max_seq,
                                    check_aligned, check_engine_compatible, check_kv_aliases, check_kv_rows_aligned,
                                    check_set_input_shape, check_set_tensor_address, inspector_layers, kv_cache_pairs,
                                    packed_input_elements, packed_inputs, precision_summary, tensorrt_version_key,
                                    unfused_quantized_gemms)

ROOT = Path(__file__).resolve().parent.parent
NO_TENSORRT = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")


# ---- 2: 256-byte alignment of packed inputs and KV-cache rows ---------------------------------------------
@pytest.mark.parametrize("rows,tokens", [(1, 1), (2, 1), (3, 1), (4, 1), (8, 1), (1, 7), (1, 37), (1, 1024)])
def test_every_packed_input_starts_on_a_256_byte_boundary(rows, tokens):
    layout = packed_inputs(rows, tokens)
    spans = sorted((off, off + math.prod(shape)) for off, shape in layout.values())
    assert all((8 * off) % ADDRESS_ALIGNMENT == 0 for off, _ in spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no overlap
    assert spans[-1][1] == packed_input_elements(rows, tokens)  # the buffer holds the last segment exactly
    assert layout["position_ids"][0] * 8 != 8  # batch-1 decode: position_ids was at +8 bytes


def test_aligned_max_seq_is_the_smallest_with_256_byte_rows():
    for kv_heads in (1, 2, 3, 5, 8):
        for head_dim in (16, 64, 80, 96, 128):
            for itemsize in (2, 4):
                for max_seq in (17, 65, 129, 2049, 4097):
                    got = aligned_max_seq(max_seq, kv_heads, head_dim, itemsize)
                    row = lambda m: kv_heads * m * head_dim * itemsize  # noqa: E731
                    assert got >= max_seq and row(got) % ADDRESS_ALIGNMENT == 0
                    assert all(row(m) % ADDRESS_ALIGNMENT for m in range(max_seq, got))
    # The demo model (SmolLM2-135M: 3 kv heads, head_dim 64, fp16) at 2048 tokens: 2049 -> 2050.
    assert aligned_max_seq(2049, 3, 64, 2) == 2050


def test_a_cache_with_misaligned_rows_is_refused_naming_the_fix():
    check_kv_rows_aligned(KvCacheLayout(30, 3, 2050, 64, "float16"))
    with pytest.raises(EngineRefused, match=r"not a multiple of 256.*rebuild the bundle.*2050"):
        check_kv_rows_aligned(KvCacheLayout(30, 3, 2049, 64, "float16"))  # 128 mod 256: every odd slot misaligned


def test_tensorrt_bundles_get_aligned_rows_cpu_bundles_keep_their_length(tiny_checkpoint, tiny_bundle, tmp_path):
    from build_engine.build import build_bundle
    from bundle_format.bundle import load_bundle
    from conftest import TINY_CONTEXT

    # bf16: not measured on the CPU, so the build is quick. Tiny model: 2 kv heads x 16 dims x 2 bytes = 64 B/position.
    trt = load_bundle(build_bundle(tiny_checkpoint, tmp_path / "trt", target="tensorrt", precision="bf16",
                                   context_length=32))
    assert trt.kv_cache.max_seq == 36 and trt.kv_cache.tensor_row_bytes() % ADDRESS_ALIGNMENT == 0
    check_kv_rows_aligned(trt.kv_cache)
    assert load_bundle(tiny_bundle).kv_cache.max_seq == TINY_CONTEXT + 1  # the CPU target is unchanged


# ---- 3: set_input_shape / set_tensor_address results ------------------------------------------------------
def test_refused_shapes_and_addresses_name_the_tensor():
    check_set_input_shape(True, "input_ids", (1, 5), 0)
    with pytest.raises(BindingError, match=r"shape \(1, 2000\) for input 'input_ids' \(optimization profile 0\)"):
        check_set_input_shape(False, "input_ids", (1, 2000), 0)
    check_set_tensor_address(True, "logits", 0x7F0000000000)
    with pytest.raises(BindingError, match=r"address 0x7f0000000100 for tensor 'present_key\.3'"):
        check_set_tensor_address(False, "present_key.3", 0x7F0000000100)
    check_aligned("past_key.0", 0x7F0000000000 + 3 * ADDRESS_ALIGNMENT)
    with pytest.raises(BindingError, match=r"tensor 'position_ids' is not 256-byte aligned"):
        check_aligned("position_ids", 0x7F0000000000 + 8)


# ---- 4: KV aliasing required (a plain description of the engine: output name -> aliased input) ---------------
def _aliases(num_layers: int) -> dict[str, str | None]:
    return {present: past for present, past in kv_cache_pairs(num_layers).items()}


def test_aliased_engine_is_accepted():
    assert check_kv_aliases(_aliases(2), 2) == {"present_key.0": "past_key.0", "present_value.0": "past_value.0",
                                                 "present_key.1": "past_key.1", "present_value.1": "past_value.1"}


@pytest.mark.parametrize("answer", [None, ""])
def test_engine_without_the_alias_is_refused_naming_the_tensor(answer):
    engine = _aliases(2) | {"present_value.1": answer}
    with pytest.raises(EngineRefused, match=r"does not alias output present_value\.1 to input past_value\.1"):
        check_kv_aliases(engine, 2)


def test_wrong_alias_and_missing_output_are_refused():
    with pytest.raises(EngineRefused, match=r"aliases output present_key\.0 to past_value\.0, expected past_key\.0"):
        check_kv_aliases(_aliases(1) | {"present_key.0": "past_value.0"}, 1)
    engine = _aliases(2)
    del engine["present_key.1"]
    with pytest.raises(EngineRefused, match=r"no output present_key\.1"):
        check_kv_aliases(engine, 2)


# ---- 6: full TensorRT version ----------------------------------------------------------------------------
def test_version_key_has_major_minor_patch_build():
    assert tensorrt_version_key("10.15.1.29") == (10, 15, 1, 29)
    assert tensorrt_version_key("11.4") == (11, 4, 0, 0)
    assert tensorrt_version_key("11.4.0.106") < tensorrt_version_key("11.4.0.107") < tensorrt_version_key("11.4.1")


def test_an_engine_of_another_build_number_is_refused():
    engine = {"tensorrt_version": "10.15.1.29", "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"},
              "slots": 8, "decode_batch_sizes": [1, 2, 4, 8]}
    check_engine_compatible(engine, "10.15.1.29", "NVIDIA H100", (9, 0), 8)
    with pytest.raises(EngineMismatch, match=r"TensorRT 10\.15\.1\.29, this machine runs TensorRT 10\.15\.1\.30"):
        check_engine_compatible(engine, "10.15.1.30", "NVIDIA H100", (9, 0), 8)


# ---- 7: TensorScatter axis --------------------------------------------------------------------------------
def test_tensorscatter_uses_axis_minus_2_and_onnx_runtime_runs_it(tiny_loaded, tmp_path):
    from build_engine.graph_builder import save_graph
    from build_engine.graph_session import open_session, prefill_feeds
    from build_engine.trt_graph import build_graph

    spec, weights, *_ = tiny_loaded
    g = build_graph(spec, weights, max_seq=36, live_kv_prefix=False)
    scatters = [n for n in g.graph.node if n.op_type == "TensorScatter"]
    assert len(scatters) == 2 * spec.num_layers
    assert all(onnx.helper.get_attribute_value(a) == -2 for n in scatters for a in n.attribute if a.name == "axis")
    assert all(any(a.name == "axis" for a in n.attribute) for n in scatters)
    save_graph(g, tmp_path / "g.onnx")
    sess = open_session(tmp_path / "g.onnx")
    logits = sess.run(["logits"], prefill_feeds(sess, [1, 2, 3, 4], [3]))[0]
    assert logits.shape[-1] == spec.vocab_size and np.isfinite(logits).all()


# ---- 9: fp16 Q/DQ scales ----------------------------------------------------------------------------------
def test_fp16_scales_are_clamped_to_the_smallest_positive_normal():
    from build_engine.quantize import engine_scales, quantize_weight

    tiny = float(np.finfo(np.float16).smallest_normal)
    got = engine_scales(np.array([0.0, 1e-12, 3e-6, 0.5]), np.float16)
    assert got[0] == got[1] == got[2] == tiny and got[3] == 0.5
    w = np.ones((8, 3), np.float32)
    w[:, 1] = 1e-9  # a column SmoothQuant shrank: amax/127 is far below fp16's range
    q, scale = quantize_weight(w, "int8", np.float16)
    assert (scale > 0).all() and scale[1] == tiny
    assert (np.abs(q.astype(np.int32)) <= 127).all()


def _scales(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer
            if t.name.endswith(".scale") or t.name.endswith(".act_scale")}


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_graphs_carry_positive_scales_and_the_measured_graph_the_engines(tiny_loaded, precision):
    from build_engine.quantize import linear_inputs, quantize_graph
    from build_engine.trt_graph import build_graph

    spec, weights, *_ = tiny_loaded
    g32 = build_graph(spec, weights, max_seq=36)
    amax = {name: np.float32(1.0) for name in linear_inputs(g32)}
    amax[next(iter(amax))] = np.float32(1e-9)  # an activation range that underflows fp16
    deploy = _scales(quantize_graph(build_graph(spec, weights, max_seq=36, dtype="float16", live_kv_prefix=False),
                                    precision, amax))
    assert all((s > 0).all() for s in deploy.values())  # TensorRT's quantize layer needs strictly positive scales
    measured = _scales(quantize_graph(g32, precision, amax, scale_dtype=np.float16))
    assert measured.keys() == deploy.keys()
    for name, s in measured.items():
        assert (s.astype(np.float16).astype(np.float32) == s).all(), name  # fp16 values, though stored as float32
        if name.endswith(".act_scale"):  # the CPU measures with exactly the activation scales the engine holds
            np.testing.assert_array_equal(s, deploy[name], err_msg=name)
        else:  # weight scales: from fp16-rounded weights in the engine's graph, so within one fp16 step
            np.testing.assert_allclose(s, deploy[name], rtol=2e-3, err_msg=name)


# ---- 10: engine inspector JSON -> precisions and unfused quantized GEMMs ------------------------------------
# Written from the documented format (IEngineInspector, LayerInformationFormat.JSON, ProfilingVerbosity.DETAILED).
INSPECTOR_SAMPLE = json.dumps({"Layers": [
    {"Name": "l0.q_proj + l0.k_proj + l0.v_proj", "LayerType": "CaskGemmMatrixMultiply",
     "Inputs": [{"Name": "l0.attn_norm.dq", "Location": "Device", "Dimensions": [1, 1, 64],
                 "Format/Datatype": "Row major linear Int8 format"}],
     "Outputs": [{"Name": "l0.v_proj", "Location": "Device", "Dimensions": [1, 1, 32],
                  "Format/Datatype": "Row major linear FP16 format"}], "TacticValue": "0x1"},
    {"Name": "myl0_12", "LayerType": "gemm", "Metadata": "[ONNX Layer: l0.o_proj]",
     "Inputs": [{"Name": "l0.attn.merged", "Dimensions": [1, 1, 64], "Format/Datatype": "Row major linear FP16 format"},
                {"Name": "w", "Dimensions": [64, 64], "Format/Datatype": "Row major linear FP16 format"}],
     "Outputs": [{"Name": "l0.o_proj", "Dimensions": [1, 1, 64], "Format/Datatype": "Row major linear FP16 format"}]},
    {"Name": "l11.up", "LayerType": "gemm",
     "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP16 format"}], "Outputs": []},
    {"Name": "l1.down", "LayerType": "gemm", "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP8 format"}]},
    {"Name": "Reformatting CopyNode for Output Tensor 0 to logits", "LayerType": "Reformat",
     "Inputs": [{"Name": "logits_f16", "Format/Datatype": "Row major linear FP16 format"}],
     "Outputs": [{"Name": "logits", "Format/Datatype": "Row major linear FP32 format"}]},
], "Bindings": ["input_ids", "logits"]})


def test_inspector_json_gives_precisions_and_names_the_gemm_that_did_not_fuse():
    layers = inspector_layers(INSPECTOR_SAMPLE)
    assert precision_summary(layers) == {"FP16": 3, "FP8": 1, "Int8": 1}
    nodes = ["l0.q_proj", "l0.v_proj", "l0.o_proj", "l1.up", "l1.down"]
    warnings = unfused_quantized_gemms(layers, nodes)
    assert len(warnings) == 1, warnings  # l1.up is not l11.up; l1.down fused into FP8
    assert "l0.o_proj did not fuse" in warnings[0] and "myl0_12" in warnings[0] and "fp16" in warnings[0]


def test_inspector_without_detail_says_how_to_get_it():
    layers = inspector_layers(json.dumps({"Layers": ["l0.q_proj + l0.k_proj", "l0.o_proj"], "Bindings": []}))
    assert precision_summary(layers) == {"no detail": 2}
    (warning,) = unfused_quantized_gemms(layers, ["l0.o_proj"])
    assert "ProfilingVerbosity.DETAILED" in warning and "--force" in warning
    assert unfused_quantized_gemms(layers, []) == []  # an fp16 engine has no quantized GEMM to check


def test_quantized_gemms_are_the_matmuls_behind_a_dequantize(tiny_loaded):
    from build_engine.quantize import linear_nodes, quantize_graph
    from build_engine.trt_compiler import quantized_gemms
    from build_engine.trt_graph import build_graph

    spec, weights, *_ = tiny_loaded
    g = build_graph(spec, weights, max_seq=36)
    names = [n.name for n in linear_nodes(g)]
    assert quantized_gemms(g.graph.node) == []
    quantize_graph(g, "int8", {x: np.float32(1.0) for x in dict.fromkeys(n.input[0] for n in linear_nodes(g))})
    assert quantized_gemms(g.graph.node) == names and len(names) == 7 * spec.num_layers


# ---- 11: CUDA-graph capture fallback ----------------------------------------------------------------------
class _Graph:
    closed = 0

    def close(self) -> None:
        self.closed += 1


def test_any_capture_failure_falls_back_to_plain_enqueue():
    from daemon.cuda_graph import CudaGraphError, capture_or_fallback

    def fails(exc):
        def capture():
            raise exc
        return capture

    assert capture_or_fallback(fails(ValueError("bad shape")), lambda g: None) == (
        None, "plain enqueue (ValueError: bad shape)")
    assert capture_or_fallback(fails(CudaGraphError("cuGraphInstantiate failed")), lambda g: None) == (
        None, "plain enqueue (cuGraphInstantiate failed)")
    graph = _Graph()

    def replay_fails(g):
        raise RuntimeError("launch failed")

    assert capture_or_fallback(lambda: graph, replay_fails) == (None, "plain enqueue (RuntimeError: launch failed)")
    assert graph.closed == 1  # the graph that failed its check is freed
    ok = _Graph()
    assert capture_or_fallback(lambda: ok, lambda g: None) == (ok, "captured") and ok.closed == 0


def test_capture_without_a_driver_is_a_clear_error():
    from daemon.cuda_graph import CudaGraph, CudaGraphError

    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("an NVIDIA driver is present: tests/gpu/test_cuda_graph.py covers capture")
    except OSError:
        pass
    calls = []
    with pytest.raises(CudaGraphError, match="libcuda.so.1"):
        CudaGraph.capture(0, lambda: calls.append(1) or True)
    assert calls == []  # nothing was enqueued outside a capture


# ---- 5: install paths and `edgellm validate`'s environment report ------------------------------------------
def test_extras_name_each_supported_install():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("tensorrt-cu12>=10.15") and "<12" in r for r in extras["tensorrt-cu12"])
    assert any(r.startswith("tensorrt-cu13>=10.15") and "<12" in r for r in extras["tensorrt-cu13"])
    assert not any(r.startswith("tensorrt") for r in extras["jetpack"])  # JetPack's TensorRT is a system package
    for name in ("tensorrt-cu12", "tensorrt-cu13", "jetpack"):
        assert any(r.startswith("pycuda") for r in extras[name])


def test_environment_problems_say_what_to_do():
    from edgellm.validate import Environment

    good = Environment(tensorrt="11.4.0.106", tensorrt_cuda=13, pycuda="2026.1", driver_cuda="13.0",
                       gpu="NVIDIA H100", compute_capability=(9, 0))
    assert good.problems() == [] and "all found" in good.text() and "compute capability 9.0" in good.text()
    old = Environment(tensorrt="10.3.0.30", pycuda="2024.1", driver_cuda="12.6", gpu="Orin", compute_capability=(8, 7))
    (problem,) = old.problems()
    assert "10.3.0.30 is older than 10.15" in problem and "JetPack 6" in problem
    mismatch = Environment(tensorrt="11.4.0.106", tensorrt_cuda=13, pycuda="2026.1", driver_cuda="12.8", gpu="L4",
                           compute_capability=(8, 9))
    (problem,) = mismatch.problems()
    assert "built for CUDA 13" in problem and "[tensorrt-cu12]" in problem


@NO_TENSORRT
def test_validate_prints_what_it_found_and_what_is_missing_without_a_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "edgellm.cli", "validate", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert "tensorrt: missing (not installed)" in done.stdout
    assert "pycuda: " in done.stdout and "NVIDIA driver (libcuda): " in done.stdout and "GPU: " in done.stdout
    assert "[tensorrt-cu13]" in done.stdout and "--system-site-packages" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert "edgellm validate: error: TensorRT is not installed" in done.stderr


# ---- 12: systemd drop-ins per platform ---------------------------------------------------------------------
def _directives(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def test_drop_ins_allow_each_platforms_gpu_nodes():
    folder = ROOT / "systemd" / "edgellm.service.d"
    desktop = _directives(folder / "gpu-nvidia-desktop.conf")
    jetson = _directives(folder / "gpu-jetson.conf")
    allowed = lambda d: {v.split()[0] for k, v in d if k == "DeviceAllow"}  # noqa: E731
    assert {"char-nvidiactl", "char-nvidia-frontend", "char-nvidia-uvm"} <= allowed(desktop)
    assert {"/dev/nvmap", "/dev/nvgpu/igpu0/ctrl"} <= allowed(jetson)
    assert any(a.startswith("/dev/nvhost-") for a in allowed(jetson))
    for d in (desktop, jetson):
        assert ("DevicePolicy", "closed") in d
    text = (folder / "gpu-jetson.conf").read_text()
    assert "JetPack 6" in text and "JetPack 7" in text


# ---- the first GPU's script -------------------------------------------------------------------------------
@NO_TENSORRT  # with TensorRT here the script runs its full 10 minutes: run bench/gpu_smoke.sh itself
def test_gpu_smoke_script_writes_one_report_and_records_every_stage(tmp_path):
    script = ROOT / "bench" / "gpu_smoke.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    report = tmp_path / "report.txt"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), EDGELLM_SMOKE_REPORT=str(report),
               EDGELLM_SMOKE_WORK=str(tmp_path / "work"))
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    text = report.read_text()
    assert done.returncode != 0  # no GPU, no TensorRT: the smoke test cannot pass here
    for stage in ("versions", "cuda-graph-driver", "parse", "build", "aliases", "logits", "graph-replay", "pytest-gpu",
                  "throughput"):
        assert f"[{stage}]" in text, stage
    assert "tensorrt: missing" in text and "RESULT: FAIL" in text
    assert "[parse] SKIP" in text and "[build] SKIP: needs stage parse" in text  # skipped, not failed, without TensorRT
