"""`edgellm bench` against a real daemon: the bandwidth figures come from the bundle's manifest and this machine."""

from __future__ import annotations

import asyncio
import json

import pytest

from bundle_format.bundle import load_bundle
from edgellm.bench import (decode_bytes_per_step, format_results, measure_read_bandwidth, plot_results, run_bench,
                           run_level)


def test_bench_reports_bandwidth_against_the_roofline(daemon, tiny_bundle, tmp_path):
    report = run_bench(daemon.daemon.addresses[0], [1, 2], prompt_tokens=4, new_tokens=4, rounds=1)
    manifest = load_bundle(tiny_bundle).manifest
    assert report.weight_bytes_per_token == manifest["graph"]["weight_bytes_per_token"] > 0
    kv = manifest["graph"]["kv_cache"]
    assert report.kv_bytes_per_position == 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * 4
    # The tiny llama in float32: K and V x 2 layers x 2 kv heads x head_dim 16 x 4 bytes.
    assert report.kv_bytes_per_position == 512
    weights = report.weight_bytes_per_token
    # At least its linear layers, read whole each step: per layer q/k/v/o 64x(64+32+32+64), gate/up 64x256,
    # down 128x64; and the 512-token vocabulary projection 64x512; float32.
    assert weights >= 4 * (2 * (64 * 192 + 64 * 256 + 128 * 64) + 64 * 512) == 425_984
    assert report.read_bandwidth_gb_s > 0.1
    # A decode step reads the weights once, and each row's cache: 4 prompt positions plus, on average over
    # the 4 new tokens, 2 more = 6 positions of 512 bytes, 3072 bytes per row.
    assert decode_bytes_per_step(1000, 10, 3, 4, 4) == 1000 + 3 * 10 * 6
    for level in report.levels:
        step_bytes = weights + level.concurrency * 3072
        assert decode_bytes_per_step(weights, 512, level.concurrency, 4, 4) == step_bytes
        assert level.achieved_gb_s == pytest.approx(level.total_tokens_per_s / level.concurrency * step_bytes / 1e9)
        assert level.roofline_fraction == pytest.approx(level.achieved_gb_s / report.read_bandwidth_gb_s)
        # What the bandwidth allows: as many steps per second as it reads step_bytes, a token per row each.
        assert level.roofline_tokens_per_s == pytest.approx(report.read_bandwidth_gb_s * 1e9 / step_bytes * level.concurrency)
    text = format_results(report, as_json=False)
    assert "roofline" in text and "GB/s" in text
    # The requests left the interval unset: the report names the server's default (0 on the test daemon).
    assert (report.stream_interval_ms, report.stream_interval_default) == (0, True)
    assert "every token streamed (the server's default)" in text
    parsed = json.loads(format_results(report, as_json=True))
    assert [lv["concurrency"] for lv in parsed["levels"]] == [1, 2] and parsed["weight_bytes_per_token"] > 0
    pytest.importorskip("matplotlib")
    plot_results(report, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_bandwidth_is_bytes_over_time():
    assert 1e8 < measure_read_bandwidth(nbytes=1 << 24, threads=1) < 1e13


def test_bench_paces_the_tokens_of_batched_chunks(daemon):
    level = asyncio.run(run_level(daemon.daemon.addresses[0], 1, 4, 8, 1, daemon.daemon.tokenizer.vocab_size,
                                  stream_interval_ms=1000))
    assert level.requests == 1 and level.total_tokens_per_s > 0
    # The first token alone, then (on this fast tiny model) the other 7 in one chunk: each of them gets
    # a seventh of the wait for that chunk, not 0 ms, so all 7 gaps are that same, positive, value.
    assert level.itl_p50_ms == level.itl_p99_ms > 0
    # Their mean is the stream's pace once it decodes (what bench/mixed_steps.py compares): the same value here.
    assert level.itl_mean_ms == pytest.approx(level.itl_p50_ms)


def test_bench_reports_the_interval_the_requests_asked_for(daemon):
    report = run_bench(daemon.daemon.addresses[0], [1], prompt_tokens=4, new_tokens=4, rounds=1, stream_interval_ms=30)
    assert (report.stream_interval_ms, report.stream_interval_default) == (30, False)
    assert format_results(report, as_json=False).splitlines()[0].endswith("tokens in chunks every 30 ms")


def _kernel_scaling():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "kernel_scaling.py"
    spec = importlib.util.spec_from_file_location("kernel_scaling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_scaling_times_the_bundles_own_matrices_and_attention(tiny_bundle):
    import numpy as np
    import onnx
    import onnxruntime as ort

    ks = _kernel_scaling()
    bundle = load_bundle(tiny_bundle)
    model = onnx.load(bundle.graph_path)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    linear = ks.linear_graph(model)
    layers = bundle.kv_cache.num_layers
    # Per layer: the packed q/k/v, o, the packed gate/up and down projections; the vocabulary projection left out.
    assert len(linear.graph.node) == 4 * layers
    sess = ort.InferenceSession(linear.SerializeToString(), providers=["CPUExecutionProvider"])
    x = {i.name: np.random.default_rng(1).standard_normal((3, i.type.tensor_type.shape.dim[1].dim_value), np.float32)
         for i in linear.graph.input}
    outputs = sess.run(None, x)
    for node, y in zip(linear.graph.node, outputs):  # each output is its own matrix applied to the step's tokens
        np.testing.assert_allclose(y, x[node.input[0]] @ inits[node.input[1]], rtol=1e-4, atol=1e-4)
    attention = ks.attention_graph(model)
    assert [n.op_type for n in attention.graph.node] == ["GroupQueryAttention"] * layers
    for part in ks.PARTS:
        times = ks.worker(part, bundle, position=8, chunk=4, repeats=2)
        assert list(times) == ["1", "2", "4", "8", "8 + 4"] and all(t > 0 for t in times.values())


def test_kernel_scaling_prints_its_table_and_refuses_a_position_past_the_cache(tiny_bundle):
    import subprocess
    import sys

    script = str(_kernel_scaling().__file__)
    r = subprocess.run([sys.executable, script, "--bundle", str(tiny_bundle), "--position", "8", "--chunk", "4",
                        "--rounds", "1", "--repeats", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| rows")]
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 2", "| 4", "| 8", "| 8 + 4"]
    assert rows[0].count("1.00×") == 3 and rows[0].endswith("GB/s |")  # one row against itself, each part
    max_seq = load_bundle(tiny_bundle).kv_cache.max_seq
    r = subprocess.run([sys.executable, script, "--bundle", str(tiny_bundle), "--position", str(max_seq)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"{max_seq}-token cache" in r.stderr and "Traceback" not in r.stderr
