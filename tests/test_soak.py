"""bench/soak.py end to end, briefly: a real `edgellm serve` on the tiny model under the soak's mixed load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_a_short_soak_reports_outcomes_leaks_and_a_verdict(tiny_bundle, tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(SOAK), "--bundle", str(tiny_bundle), "--minutes", "0.1", "--streams", "4",
                        "--warmup-minutes", "0.03", "--row-seconds", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 1), r.stderr
    report = json.loads(out.read_text())
    assert r.returncode == (0 if report["passed"] else 1)
    assert "verdict: PASS" in r.stdout or "verdict: FAIL" in r.stdout
    checks = report["checks"]
    assert set(checks) == {"alive", "no_unexpected_errors", "no_logged_errors", "no_leaked_slots", "rss_growth",
                           "fds_flat", "threads_flat"}
    # What holds however short the run (RSS, fds and threads are judged over minutes, not seconds).
    for name in ("alive", "no_unexpected_errors", "no_logged_errors", "no_leaked_slots"):
        assert checks[name]["passed"], (checks[name], report["unexpected_samples"])
    assert report["rows"] and sum(row["requests"] for row in report["rows"]) > 0
    scenarios = {key.split(":")[0] for key in report["by_scenario"]}
    assert {"complete", "cancel", "vanish", "conversation"} <= scenarios
    for key in ("start", "baseline", "end"):
        assert report[key]["rss_kb"] > 0 and report[key]["fds"] > 0 and report[key]["threads"] > 0
