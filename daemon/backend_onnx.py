"""CPU backend: the bundle's ONNX graph in ONNX Runtime, with a KV cache allocated once.

The cache is one numpy array per layer and K/V, shaped [slots, kv_heads, max_seq, head_dim]. A step
runs a contiguous range of rows (slots) by binding views of those arrays as both the `past_*` inputs
and the `present_*` outputs, so TensorScatter updates the cache in place and nothing is copied.
Decode bindings are kept per row range and their inputs live in fixed numpy buffers: a decode step
writes a few integers and calls ONNX Runtime, nothing else (the same fixed-buffer discipline the
TensorRT backend needs for CUDA graph replay).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from daemon.bundle import Bundle, KvCacheLayout

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class _Binding:
    """An IOBinding whose inputs and logits output are fixed numpy buffers."""

    io: ort.IOBinding
    input_ids: np.ndarray
    position_ids: np.ndarray
    write_indices: np.ndarray
    logits_indices: np.ndarray
    logits: np.ndarray


class OnnxBackend:
    name = "onnxruntime-cpu"

    def __init__(self, graph_path: str | os.PathLike, layout: KvCacheLayout, vocab_size: int, slots: int,
                 threads: int = 0):
        if layout.dtype not in _NP_DTYPES:
            raise ValueError(f"the CPU backend cannot run a {layout.dtype} KV cache")
        self.layout = layout
        self.slots = slots
        self.vocab_size = vocab_size
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # Threads, deliberately: one per core, and no spinning (a spinning pool starves the event loop and gRPC
        # threads that share the cores: 3-4x slower decode on 2 cores). Work is handed out in small dynamic
        # blocks, so a step is not held up by the one thread that was preempted by those: measured on 2 busy
        # cores, 1.3-1.5x the decode tokens/s of static blocks; a single thread was 0.4-0.7x.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.dynamic_block_base", "4")
        self.session = ort.InferenceSession(os.fspath(graph_path), so, providers=["CPUExecutionProvider"])
        dtype = _NP_DTYPES[layout.dtype]
        shape = (slots, layout.num_kv_heads, layout.max_seq, layout.head_dim)
        self.cache = [(np.zeros(shape, dtype), np.zeros(shape, dtype)) for _ in range(layout.num_layers)]
        self._row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        self._ort_dtype = dtype
        # Logits of at most one position per row at a time: [slots, 1, vocab], reused every step.
        self._logits = np.empty((slots, 1, vocab_size), np.float32)
        self._decode_bindings: dict[tuple[int, int], _Binding] = {}

    @property
    def kv_cache_bytes(self) -> int:
        return self.layout.bytes_per_row() * self.slots

    def _bind(self, first_row: int, rows: int, tokens: int) -> _Binding:
        io = self.session.io_binding()
        b = _Binding(io, np.zeros((rows, tokens), np.int64), np.zeros((rows, tokens), np.int64),
                     np.zeros(rows, np.int64), np.zeros((rows, 1), np.int64), self._logits[first_row:first_row + rows])
        for name in ("input_ids", "position_ids", "write_indices", "logits_indices"):
            arr = getattr(b, name)
            io.bind_input(name, "cpu", 0, np.int64, list(arr.shape), arr.ctypes.data)
        shape = [rows, self.layout.num_kv_heads, self.layout.max_seq, self.layout.head_dim]
        for i, (k, v) in enumerate(self.cache):
            for kind, arr in (("key", k), ("value", v)):
                ptr = arr.ctypes.data + first_row * self._row_bytes
                io.bind_input(f"past_{kind}.{i}", "cpu", 0, self._ort_dtype, shape, ptr)
                io.bind_output(f"present_{kind}.{i}", "cpu", 0, self._ort_dtype, shape, ptr)
        io.bind_output("logits", "cpu", 0, np.float32, list(b.logits.shape), b.logits.ctypes.data)
        return b

    def prefill(self, row: int, token_ids: np.ndarray | list[int], start: int) -> np.ndarray:
        """Write tokens at positions start.. of one row; returns the last token's logits [vocab] (a view)."""
        n = len(token_ids)
        b = self._bind(row, 1, n)
        b.input_ids[0] = token_ids
        b.position_ids[0] = np.arange(start, start + n)
        b.write_indices[0] = start
        b.logits_indices[0, 0] = n - 1
        self.session.run_with_iobinding(b.io)
        return b.logits[0, 0]

    def decode_binding(self, rows: int) -> _Binding:
        """The fixed buffers of a decode step over rows [0, rows): fill them, then call decode()."""
        key = (0, rows)
        b = self._decode_bindings.get(key)
        if b is None:
            b = self._decode_bindings[key] = self._bind(0, rows, 1)
        return b

    def decode(self, b: _Binding) -> np.ndarray:
        """One token per row; returns logits [rows, vocab] (a view of the reused buffer)."""
        self.session.run_with_iobinding(b.io)
        return b.logits[:, 0]


def create_cpu_backend(bundle: Bundle, slots: int, threads: int = 0) -> OnnxBackend:
    return OnnxBackend(bundle.graph_path, bundle.kv_cache, int(bundle.model["vocab_size"]), slots, threads)
