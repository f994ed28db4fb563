"""`edgellm bench` against a real daemon: the bandwidth figures come from the bundle's manifest and this machine."""

from __future__ import annotations

import json

import pytest

from daemon.bundle import load_bundle
from edgellm.bench import decode_bytes_per_step, format_results, measure_read_bandwidth, plot_results, run_bench


def test_bench_reports_bandwidth_against_the_roofline(daemon, tiny_bundle, tmp_path):
    report = run_bench(daemon.daemon.addresses[0], [1, 2], prompt_tokens=4, new_tokens=4, rounds=1)
    manifest = load_bundle(tiny_bundle).manifest
    assert report.weight_bytes_per_token == manifest["graph"]["weight_bytes_per_token"] > 0
    kv = manifest["graph"]["kv_cache"]
    assert report.kv_bytes_per_position == 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * 4
    assert report.read_bandwidth_gb_s > 0.1
    for level in report.levels:
        step_bytes = decode_bytes_per_step(report.weight_bytes_per_token, report.kv_bytes_per_position,
                                           level.concurrency, 4, 4)
        assert level.achieved_gb_s == pytest.approx(level.total_tokens_per_s / level.concurrency * step_bytes / 1e9)
        assert level.roofline_fraction == pytest.approx(level.achieved_gb_s / report.read_bandwidth_gb_s)
    text = format_results(report, as_json=False)
    assert "roofline" in text and "GB/s" in text
    parsed = json.loads(format_results(report, as_json=True))
    assert [lv["concurrency"] for lv in parsed["levels"]] == [1, 2] and parsed["weight_bytes_per_token"] > 0
    pytest.importorskip("matplotlib")
    plot_results(report, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_bandwidth_is_bytes_over_time():
    assert 1e8 < measure_read_bandwidth(nbytes=1 << 24, threads=1) < 1e13
