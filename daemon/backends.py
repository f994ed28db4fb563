"""The backend a bundle needs, chosen by its target: ONNX Runtime on the CPU, or TensorRT on an NVIDIA GPU."""

from __future__ import annotations

import importlib

from bundle_format.bundle import Bundle, BundleError
from daemon.backend import Backend
from daemon.config import Config
from daemon.thread_placement import ThreadPlacement


class BackendError(RuntimeError):
    """The bundle's backend cannot start here; the message says why and what to do."""


def create_backend(bundle: Bundle, config: Config, placement: ThreadPlacement | None = None) -> Backend:
    """A loaded backend for the bundle's target, with its KV cache allocated for config.engine.slots."""
    target = bundle.manifest.get("target", "cpu")
    slots = config.engine.slots
    if target == "cpu":
        from daemon.backend_onnx import create_cpu_backend

        return create_cpu_backend(bundle, slots, config.engine.threads, placement)
    if target == "tensorrt":
        try:  # only whether they are installed, for a clear message; backend_trt imports them for use
            for module in ("pycuda.driver", "tensorrt"):
                importlib.import_module(module)
        except ImportError as e:
            raise BackendError(f"{bundle.path} is a TensorRT bundle, and {e.name} is not installed here: run it on an "
                               f"NVIDIA GPU with pip install 'edgellm[tensorrt]'") from None
        from daemon.backend_trt import create_trt_backend
        from bundle_format.trt_plan import EngineMismatch, PrecisionUnsupported

        try:
            return create_trt_backend(bundle, slots)
        except (BundleError, EngineMismatch, PrecisionUnsupported, MemoryError) as e:
            raise BackendError(str(e)) from None
    raise BackendError(f"{bundle.path}: unknown target {target!r} (this edgellm runs cpu and tensorrt bundles)")
