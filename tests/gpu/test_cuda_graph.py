"""daemon/cuda_graph.py on a real GPU through the NVIDIA driver alone (libcuda.so.1): no TensorRT, no pycuda.

A memset and a device-to-device copy are captured on a stream, the graph is replayed, and the bytes are
checked; a capture whose enqueue raises must leave the stream out of capture mode with no graph behind.
Skipped where libcuda.so.1 or a GPU is missing, with the reason.
"""

from __future__ import annotations

import ctypes

import pytest

from daemon.cuda_graph import CudaGraph, CudaGraphError, capture_or_fallback


def _libcuda() -> tuple[ctypes.CDLL | None, str]:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return None, f"no NVIDIA driver: cannot load libcuda.so.1 ({e})"
    count = ctypes.c_int()
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return None, "libcuda.so.1 loads but the driver sees no GPU"
    return lib, ""


LIB, WHY = _libcuda()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(LIB is None, reason=WHY or "?")]
N = 1 << 20  # bytes per buffer


def _ok(result: int, what: str) -> None:
    assert result == 0, f"{what} failed: CUDA error {result}"


@pytest.fixture
def stream():
    """The primary context pushed on this thread (and popped again), a non-default stream and two device buffers."""
    vp, u64, sz = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t
    LIB.cuCtxPushCurrent_v2.argtypes = [vp]
    LIB.cuCtxPopCurrent_v2.argtypes = [ctypes.POINTER(vp)]
    LIB.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(vp), ctypes.c_int]
    LIB.cuStreamCreate.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
    LIB.cuStreamDestroy_v2.argtypes = [vp]
    LIB.cuStreamSynchronize.argtypes = [vp]
    LIB.cuStreamIsCapturing.argtypes = [vp, ctypes.POINTER(ctypes.c_int)]
    LIB.cuMemAlloc_v2.argtypes = [ctypes.POINTER(u64), sz]
    LIB.cuMemFree_v2.argtypes = [u64]
    LIB.cuMemsetD8Async.argtypes = [u64, ctypes.c_ubyte, sz, vp]
    LIB.cuMemcpyDtoDAsync_v2.argtypes = [u64, u64, sz, vp]
    LIB.cuMemcpyDtoH_v2.argtypes = [vp, u64, sz]
    device, ctx, s = ctypes.c_int(), vp(), vp()
    _ok(LIB.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
    _ok(LIB.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "cuDevicePrimaryCtxRetain")
    _ok(LIB.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
    a, b = u64(), u64()
    try:
        _ok(LIB.cuStreamCreate(ctypes.byref(s), 1), "cuStreamCreate")  # 1: CU_STREAM_NON_BLOCKING
        _ok(LIB.cuMemAlloc_v2(ctypes.byref(a), N), "cuMemAlloc")
        _ok(LIB.cuMemAlloc_v2(ctypes.byref(b), N), "cuMemAlloc")
        yield s, a.value, b.value
    finally:
        for buf in (a, b):
            if buf.value:
                LIB.cuMemFree_v2(buf)
        if s.value:
            LIB.cuStreamDestroy_v2(s)
        popped = vp()
        LIB.cuCtxPopCurrent_v2(ctypes.byref(popped))
        LIB.cuDevicePrimaryCtxRelease_v2(device)


def _read(buf: int) -> bytes:
    host = ctypes.create_string_buffer(N)
    _ok(LIB.cuMemcpyDtoH_v2(ctypes.cast(host, ctypes.c_void_p), ctypes.c_uint64(buf), N), "cuMemcpyDtoH")
    return host.raw


def _capturing(s) -> bool:
    status = ctypes.c_int()
    _ok(LIB.cuStreamIsCapturing(s, ctypes.byref(status)), "cuStreamIsCapturing")
    return status.value != 0  # CU_STREAM_CAPTURE_STATUS_NONE is 0


def test_captured_memset_and_copy_replay(stream):
    s, a, b = stream

    def enqueue() -> bool:
        _ok(LIB.cuMemsetD8Async(a, 0x5A, N, s), "cuMemsetD8Async")
        _ok(LIB.cuMemcpyDtoDAsync_v2(b, a, N, s), "cuMemcpyDtoDAsync")
        return True

    graph = CudaGraph.capture(s.value, enqueue)
    try:
        assert not _capturing(s)
        graph.launch(s.value)
        _ok(LIB.cuStreamSynchronize(s), "cuStreamSynchronize")
        assert _read(b) == b"\x5a" * N
        for buf in (a, b):  # clear both outside the graph, then replay it again
            _ok(LIB.cuMemsetD8Async(buf, 0, N, s), "cuMemsetD8Async")
        _ok(LIB.cuStreamSynchronize(s), "cuStreamSynchronize")
        assert _read(b) == b"\x00" * N
        graph.launch(s.value)
        _ok(LIB.cuStreamSynchronize(s), "cuStreamSynchronize")
        assert _read(a) == _read(b) == b"\x5a" * N
    finally:
        graph.close()


def test_an_enqueue_that_raises_ends_the_capture_and_falls_back(stream):
    s, a, _ = stream

    def enqueue() -> bool:
        _ok(LIB.cuMemsetD8Async(a, 1, N, s), "cuMemsetD8Async")
        raise ValueError("TensorRT raised during capture")

    with pytest.raises(ValueError, match="during capture"):
        CudaGraph.capture(s.value, enqueue)
    assert not _capturing(s)  # the stream works again
    graph, status = capture_or_fallback(lambda: CudaGraph.capture(s.value, enqueue), lambda g: None)
    assert graph is None and status == "plain enqueue (ValueError: TensorRT raised during capture)"
    assert not _capturing(s)
    _ok(LIB.cuMemsetD8Async(a, 7, N, s), "cuMemsetD8Async")  # plain enqueue on the same stream
    _ok(LIB.cuStreamSynchronize(s), "cuStreamSynchronize")
    assert _read(a) == b"\x07" * N


def test_an_enqueue_that_reports_failure_is_a_capture_error(stream):
    s, _, _ = stream
    with pytest.raises(CudaGraphError, match="enqueue during capture failed"):
        CudaGraph.capture(s.value, lambda: False)
    assert not _capturing(s)
