"""TensorRT and CUDA graphs on real hardware (pytest -m gpu): the checks `edgellm validate` runs, on a tiny model.

The tiny model has head_dim 64 (with 16, a bool mask and grouped heads, TensorRT may find no fused attention
kernel). Skipped wherever TensorRT or a CUDA GPU is missing (this project's build machines), with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from build_engine.trt_compiler import tensorrt_available

_MISSING = tensorrt_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_MISSING is not None, reason=f"needs TensorRT and a GPU: {_MISSING}")]

SLOTS = 4
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint64(tmp_path_factory) -> Path:
    """The tiny llama with head_dim 64 (4 query heads, 2 kv heads): a head size TensorRT has fused kernels for."""
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt64") / "tiny-llama-64", "llama", head_dim=64,
                                hidden_size=128)


@pytest.fixture(scope="module", params=["fp16", "int8"])
def compiled(request, checkpoint64, tmp_path_factory) -> Path:
    from build_engine import accuracy
    from build_engine.build import build_bundle
    from build_engine.trt_compiler import compile_bundle

    # A random model's flat logits miss the trained-model thresholds; the GPU checks are about the engine.
    saved = dict(accuracy.THRESHOLDS)
    accuracy.THRESHOLDS.update({k: (2.0, 0.0) for k in accuracy.THRESHOLDS})
    try:
        path = build_bundle(checkpoint64, tmp_path_factory.mktemp("trt") / request.param, target="tensorrt",
                            precision=request.param, context_length=64)
    finally:
        accuracy.THRESHOLDS.update(saved)
    compile_bundle(path, slots=SLOTS, max_prefill_tokens=16)
    return path


def test_engine_recorded_in_manifest(compiled):
    import tensorrt as trt

    from bundle_format.bundle import load_bundle

    engine = load_bundle(compiled).manifest["engine"]
    assert engine["tensorrt_version"] == trt.__version__
    assert engine["decode_batch_sizes"] == [1, 2, 4]
    assert [p["name"] for p in engine["profiles"]] == ["prefill", "decode_batch_1", "decode_batch_2", "decode_batch_4",
                                                      "verify"]
    assert (compiled / engine["file"]).stat().st_size > 0
    assert list(compiled.parent.glob(".edgellm-timing-trt*.cache"))


def test_kv_outputs_are_aliased_and_rows_aligned(compiled):
    import tensorrt as trt

    from bundle_format.bundle import load_bundle
    from bundle_format.trt_plan import check_kv_aliases, check_kv_rows_aligned, kv_cache_pairs

    bundle = load_bundle(compiled)
    check_kv_rows_aligned(bundle.kv_cache)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine((compiled / "model.engine").read_bytes())
    layers = bundle.kv_cache.num_layers
    check_kv_aliases({out: engine.get_aliased_input_tensor(out) for out in kv_cache_pairs(layers)}, layers)


def test_odd_slot_prefill_matches_onnx_runtime(compiled):
    """Slot 1's cache row starts at an offset that used to be misaligned (issue 19)."""
    from bundle_format.bundle import load_bundle
    from build_engine.graph_session import prefill_feeds
    from daemon.backend_trt import TrtBackend
    from edgellm.validate import _cpu_reference

    bundle = load_bundle(compiled)
    ids = [5, 17, 33, 2, 9, 41, 12]
    cpu = _cpu_reference(bundle)
    want = cpu.run(["logits"], prefill_feeds(cpu, ids, [len(ids) - 1]))[0][0, 0]
    backend = TrtBackend(bundle, SLOTS)
    try:
        for slot in (0, 1, 3):
            got = backend.prefill(slot, ids, 0)
            assert int(np.argmax(got)) == int(np.argmax(want))
            assert float(np.abs(got - want).max()) < 0.05 * float(np.abs(want).max())
    finally:
        backend.close()


def test_an_out_of_profile_shape_is_refused_naming_the_tensor(compiled):
    from bundle_format.bundle import load_bundle
    from bundle_format.trt_plan import BindingError
    from daemon.backend_trt import TrtBackend

    backend = TrtBackend(load_bundle(compiled), SLOTS)
    try:
        step = backend._decode[1]
        backend._ctx.push()
        try:
            with pytest.raises(BindingError, match=r"shape \(1, 5\) for input 'input_ids'"):
                backend._set_shape(step, "input_ids", (1, 5))  # decode profiles are one token per row
        finally:
            backend._cuda.Context.pop()
    finally:
        backend.close()


def test_a_process_using_the_backend_from_another_thread_exits_cleanly(compiled):
    """pycuda aborts a process whose threads leave a context pushed ("context stack was not empty")."""
    code = f"""
import sys, threading
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
from bundle_format.bundle import load_bundle
from daemon.backend_trt import TrtBackend
backend = TrtBackend(load_bundle({str(compiled)!r}), {SLOTS})
def serve():
    backend.prefill(1, [5, 6, 7], 0)
    backend.decode([1], [8], [3])
t = threading.Thread(target=serve)
t.start(); t.join()
backend.decode([0], [1], [0])
backend.close()
print("done")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]
    assert "context stack was not empty" not in done.stderr


def test_graphs_captured_and_replay_equals_plain_enqueue(compiled):
    from daemon.backend_trt import TrtBackend
    from bundle_format.bundle import load_bundle

    backend = TrtBackend(load_bundle(compiled), SLOTS)
    try:
        assert set(backend.graph_status) == {1, 2, 4}
        assert all(s == "captured" for s in backend.graph_status.values()), backend.graph_status
        backend.prefill(0, list(range(1, 20)), 0)  # longer than max_prefill_tokens: two chunks
        for rows in (1, 2, 4):
            step = (list(range(rows)), [5] * rows, [19] * rows)  # slots, token ids, positions
            with_graph = backend.decode(*step).copy()
            plain = backend.decode_plain(*step).copy()
            assert with_graph.shape == (rows, backend.vocab_size)
            np.testing.assert_allclose(with_graph, plain, rtol=0, atol=1e-4)
    finally:
        backend.close()


def test_greedy_tokens_agree_with_onnx_runtime_cpu(compiled):
    from edgellm.validate import validate_bundle

    report = validate_bundle(compiled, slots=SLOTS, new_tokens=8)
    print(report.text())
    assert report.graph_max_diff <= 1e-3
    assert report.agreement >= 0.8  # fp16/int8 on the GPU vs the same graph in float32 on the CPU
    assert any("CUDA graph" in k for k in report.timings_ms)


def test_mismatched_engine_is_refused(compiled, tmp_path):
    from daemon.backends import BackendError, create_backend
    from bundle_format.bundle import load_bundle
    from daemon.config import parse_config

    from build_engine.bundle_writer import update_bundle

    copy = tmp_path / "b"
    shutil.copytree(compiled, copy)
    engine = yaml.safe_load((copy / "manifest.yaml").read_text())["engine"]
    update_bundle(copy, {}, {"engine": {**engine, "tensorrt_version": "9.0.0"}})
    with pytest.raises(BackendError, match="TensorRT 9.0.0.*not portable"):
        create_backend(load_bundle(copy), parse_config({"engine": {"slots": SLOTS}}))
    with pytest.raises(BackendError, match="--slots 8"):
        create_backend(load_bundle(compiled), parse_config({"engine": {"slots": 8}}))


def test_daemon_serves_the_engine(compiled, tmp_path):
    """A real daemon on the TensorRT backend answers a Generate over its Unix socket."""
    from conftest import DaemonThread, generate
    from daemon.backends import create_backend
    from edgellm.v1 import edgellm_pb2 as pb

    d = DaemonThread(compiled, {"listen": {"unix": str(tmp_path / "s.sock")}, "engine": {"slots": SLOTS}},
                     backend=create_backend).start()
    try:
        assert d.daemon.backend.name == "tensorrt" and d.daemon.backend.cuda_graphs.startswith("captured")
        info = d.stub().GetModel(pb.GetModelRequest(), timeout=10)
        assert info.backend == "tensorrt" and info.cuda_graphs.startswith("captured")
        ids, _, finished = generate(d.stub(), text="hello", max_new_tokens=6, ignore_eos=True)
        assert finished.reason == pb.FINISH_REASON_LENGTH and len(ids) == 6 == finished.usage.completion_tokens
    finally:
        d.stop()
        d.daemon.backend.close()
