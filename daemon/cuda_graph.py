"""CUDA graph capture and replay through the CUDA driver API, by ctypes on libcuda.

pycuda (which the TensorRT backend uses for memory, streams, events and pinned buffers) has no graph
API. Of the two ways to reach the driver's, this is a six-function ctypes shim rather than the
`cuda-bindings` package: libcuda is already loaded in the process (pycuda and TensorRT use it), the
shim adds no dependency whose CUDA major version must match the driver's and pycuda's, and the calls
it needs (cuStreamBeginCapture_v2, cuStreamEndCapture, cuGraphInstantiateWithFlags, cuGraphLaunch,
cuGraphExecDestroy, cuGraphDestroy; CUDA >= 11.4) are a stable C ABI taking plain handles. A capture
happens in thread-local mode on the backend's own (non-default) stream. Whatever goes wrong during a
capture (a driver error, or an exception from the enqueue itself), the capture is ended and the graph
freed before the error goes on, and capture_or_fallback() turns it into plain enqueue. Not run on this
project's build machines (no GPU); tests/gpu/test_cuda_graph.py exercises it through libcuda alone.
"""

from __future__ import annotations

import ctypes
from typing import Callable, Protocol

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
        lib.cuDriverGetVersion.argtypes, lib.cuDriverGetVersion.restype = [ctypes.POINTER(ctypes.c_int)], ctypes.c_int
        _lib = lib
    return _lib


def driver_version() -> str:
    """The CUDA version the installed driver supports (cuDriverGetVersion), e.g. "12.8"."""
    v = ctypes.c_int()
    _check(_driver().cuDriverGetVersion(ctypes.byref(v)), "cuDriverGetVersion")
    return f"{v.value // 1000}.{v.value % 1000 // 10}"


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
        """Record what `enqueue` puts on the stream (it returns False when it could not enqueue).

        However it fails (CudaGraphError, or whatever enqueue raised), the stream has left capture mode
        and no graph is left behind."""
        lib = _driver()
        stream = ctypes.c_void_p(stream_handle)
        _check(lib.cuStreamBeginCapture_v2(stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), "cuStreamBeginCapture")
        graph = ctypes.c_void_p()
        try:
            ok = enqueue()
        except BaseException:
            # End the capture (or the stream stays in capture mode) and free what it recorded.
            lib.cuStreamEndCapture(stream, ctypes.byref(graph))
            if graph.value:
                lib.cuGraphDestroy(graph)
            raise
        end = lib.cuStreamEndCapture(stream, ctypes.byref(graph))
        if not ok or end != 0:
            if graph.value:
                lib.cuGraphDestroy(graph)
            if not ok:
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


class Closable(Protocol):
    def close(self) -> None: ...


def capture_or_fallback(capture: Callable[[], Closable], check: Callable[[Closable], None]) -> tuple[Closable | None, str]:
    """(graph, "captured"), or (None, "plain enqueue (why)") when capturing or checking the graph raised anything.

    check(graph) replays it once, so a graph that cannot launch is found at start, not on the first
    request. A graph that fails its check is closed before falling back."""
    graph = None
    try:
        graph = capture()
        check(graph)
        return graph, "captured"
    except Exception as e:  # any failure: a missed graph costs speed, a failed backend costs the service
        if graph is not None:
            try:
                graph.close()
            except Exception:  # noqa: BLE001 - already falling back; the first error is the one to report
                pass
        reason = str(e) if isinstance(e, CudaGraphError) else f"{type(e).__name__}: {e}"
        return None, f"plain enqueue ({reason})"
