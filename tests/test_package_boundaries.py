"""Which packages may import which: checked in a fresh interpreter, where sys.modules shows everything an import pulled in.

bundle_format (the on-disk format) stands alone; build_engine (the build step) uses it but no daemon code, so
building or compiling does not load the server's stack (prometheus_client, jinja2, the tokenizer wrapper);
daemon and build_engine see of edgellm only its package (`__version__`), the generated API, edgellm.v1, and the
socket trust rule the daemon shares with its clients (edgellm.socket_trust, standard library only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def modules_loaded_by(package: str) -> set[str]:
    """Every module in sys.modules after importing `package` and each of its modules, in a new interpreter."""
    code = (f"import importlib, json, pkgutil, sys\n"
            f"import {package}\n"
            f"for m in pkgutil.iter_modules({package}.__path__):\n"
            f"    if m.name != '__main__':\n"
            f"        importlib.import_module('{package}.' + m.name)\n"
            f"print(json.dumps(sorted(sys.modules)))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def under(modules: set[str], *packages: str) -> set[str]:
    return {m for m in modules if m.split(".")[0] in packages}


def edgellm_beyond_api(modules: set[str]) -> set[str]:
    """edgellm modules other than the package itself, the generated API and the shared socket trust rule."""
    return {m for m in under(modules, "edgellm")
            if m not in ("edgellm", "edgellm.socket_trust") and not m.startswith("edgellm.v1")}


@pytest.fixture(scope="module")
def build_modules() -> set[str]:
    return modules_loaded_by("build_engine")


def test_build_engine_loads_no_daemon_code(build_modules):
    assert "build_engine.build" in build_modules and "build_engine.trt_compiler" in build_modules
    assert under(build_modules, "daemon") == set()


def test_build_engine_loads_neither_metrics_nor_chat_templates(build_modules):
    assert under(build_modules, "prometheus_client", "jinja2") == set()


def test_build_engine_sees_only_edgellm_version(build_modules):
    assert edgellm_beyond_api(build_modules) == set()


def test_bundle_format_stands_alone():
    loaded = modules_loaded_by("bundle_format")
    assert "bundle_format.trt_plan" in loaded and "bundle_format.bundle" in loaded
    assert under(loaded, "daemon", "build_engine", "edgellm") == set()
    # The daemon reads bundles without the build extra installed.
    assert under(loaded, "onnx", "onnxruntime", "tensorrt", "pycuda") == set()


def test_daemon_loads_no_build_code_and_of_edgellm_only_its_api():
    loaded = modules_loaded_by("daemon")
    assert "daemon.lifecycle" in loaded
    assert under(loaded, "build_engine") == set()
    assert edgellm_beyond_api(loaded) == set()


def test_edgellm_package_itself_imports_nothing():
    """`from edgellm import __version__` in daemon/ and build_engine/ must not pull in the CLI or the client."""
    code = "import json, sys; before = set(sys.modules); import edgellm; print(json.dumps(sorted(set(sys.modules) - before)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["edgellm"]
