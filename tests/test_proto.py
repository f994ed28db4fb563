"""The committed generated code must be what proto/ produces."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_proto():
    result = subprocess.run([sys.executable, "proto/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_drift_is_detected(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "proto"))
    import generate

    monkeypatch.setattr(generate, "REPO_ROOT", tmp_path)  # an empty tree: every generated file is missing
    assert generate.drift() == generate.GENERATED
