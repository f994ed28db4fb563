"""CUDA graph capture and replay through the CUDA driver API, by ctypes on libcuda.

pycuda (which the TensorRT backend uses for memory, streams, events and pinned buffers) has no graph
API. Of the two ways to reach the driver's, this is a six-function ctypes shim rather than the
`cuda-bindings` package: libcuda is already loaded in the process (pycuda and TensorRT use it), the
shim adds no dependency whose CUDA major version must match the driver's and pycuda's, and the calls
it needs (cuStreamBeginCapture_v2, cuStreamEndCapture, cuGraphInstantiateWithFlags, cuGraphLaunch,
cuGraphExecDestroy, cuGraphDestroy; CUDA >= 11.4) are a stable C ABI taking plain handles. A capture
happens in thread-local mode on the backend's own (non-default) stream. Not run on this project's build
machines (no GPU); tests/gpu/test_tensorrt.py exercises it.
"""

from __future__ import annotations

import ctypes
from typing import Callable

CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1
_lib: ctypes.CDLL | None = None


class CudaGraphError(RuntimeError):
    """A driver call failed: capture is not possible (the caller falls back to plain enqueue)."""


def _driver() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaGraphError(f"cannot load the CUDA driver library libcuda.so.1: {e}") from None
        vp, u64 = ctypes.c_void_p, ctypes.c_ulonglong
        for name, args in (("cuStreamBeginCapture_v2", [vp, ctypes.c_int]),
                           ("cuStreamEndCapture", [vp, ctypes.POINTER(vp)]),
                           ("cuGraphInstantiateWithFlags", [ctypes.POINTER(vp), vp, u64]),
                           ("cuGraphLaunch", [vp, vp]),
                           ("cuGraphExecDestroy", [vp]),
                           ("cuGraphDestroy", [vp]),
                           ("cuGetErrorString", [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)])):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        _lib = lib
    return _lib


def _check(result: int, what: str) -> None:
    if result != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(msg))
        raise CudaGraphError(f"{what} failed: CUDA error {result} ({(msg.value or b'?').decode()})")


class CudaGraph:
    """One captured and instantiated graph: launch() replays it on a stream."""

    def __init__(self, graph: int, exec_: int) -> None:
        self._graph, self._exec = ctypes.c_void_p(graph), ctypes.c_void_p(exec_)

    @classmethod
    def capture(cls, stream_handle: int, enqueue: Callable[[], bool]) -> "CudaGraph":
        """Record what `enqueue` puts on the stream (it returns False when it could not enqueue)."""
        lib = _driver()
        stream = ctypes.c_void_p(stream_handle)
        _check(lib.cuStreamBeginCapture_v2(stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), "cuStreamBeginCapture")
        graph = ctypes.c_void_p()
        try:
            ok = enqueue()
        finally:
            # Always end the capture, or the stream stays in capture mode.
            end = lib.cuStreamEndCapture(stream, ctypes.byref(graph))
        if not ok:
            if graph.value:
                lib.cuGraphDestroy(graph)
            raise CudaGraphError("the enqueue during capture failed (TensorRT could not record this step)")
        _check(end, "cuStreamEndCapture")
        exec_ = ctypes.c_void_p()
        try:
            _check(lib.cuGraphInstantiateWithFlags(ctypes.byref(exec_), graph, 0), "cuGraphInstantiate")
        except CudaGraphError:
            lib.cuGraphDestroy(graph)
            raise
        return cls(graph.value, exec_.value)

    def launch(self, stream_handle: int) -> None:
        _check(_driver().cuGraphLaunch(self._exec, ctypes.c_void_p(stream_handle)), "cuGraphLaunch")

    def close(self) -> None:
        if self._exec.value:
            _driver().cuGraphExecDestroy(self._exec)
            self._exec = ctypes.c_void_p()
        if self._graph.value:
            _driver().cuGraphDestroy(self._graph)
            self._graph = ctypes.c_void_p()
