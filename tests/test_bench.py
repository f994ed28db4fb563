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
