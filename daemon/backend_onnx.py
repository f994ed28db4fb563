"""CPU backend: the bundle's CPU graph (build_engine/cpu_graph.py) in ONNX Runtime, with a KV cache allocated once.

The cache is one numpy array per layer and K/V, shaped [slots, kv_heads, max_seq, head_dim]. A step
runs a contiguous range of rows (slots) by binding views of those arrays as both the `past_*` inputs
and the `present_*` outputs, so GroupQueryAttention appends to the cache in place and nothing is copied.
Decode bindings are kept per row count (bundle_format/decode_buckets.py's decode_bucket) and their inputs live in fixed
numpy buffers: a decode step writes a few integers and calls ONNX Runtime, nothing else (the same
fixed-buffer discipline the TensorRT backend needs for CUDA graph replay).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnxruntime as ort

from bundle_format.bundle import Bundle
from bundle_format.decode_buckets import decode_bucket
from bundle_format.kv_cache import KvCacheLayout
from bundle_format.trt_plan import MAX_VERIFY_TOKENS
from daemon.backend import write_decode_inputs
from daemon.thread_placement import ThreadPlacement, allowed_cpus

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class _Binding:
    """An IOBinding whose inputs and logits output are fixed numpy buffers.

    A decode step fills input_ids [rows, 1] and positions [rows] (each row's token position, -1 for an idle
    row), then turns positions into the graph's seqlens_k and query_lengths."""

    io: ort.IOBinding
    input_ids: np.ndarray
    seqlens_k: np.ndarray
    query_lengths: np.ndarray
    logits_indices: np.ndarray
    logits: np.ndarray
    positions: np.ndarray


class OnnxBackend:
    name = "onnxruntime-cpu"
    cuda_graphs = ""

    def __init__(self, graph_path: str | os.PathLike, layout: KvCacheLayout, vocab_size: int, slots: int,
                 threads: int = 0, worker_affinities: str | None = None):
        if layout.dtype not in _NP_DTYPES:
            raise ValueError(f"the CPU backend cannot run a {layout.dtype} KV cache")
        self.layout = layout
        self.slots = slots
        self.vocab_size = vocab_size
        # A verify pass (speculative decoding) is a prefill that keeps every position's logits, into one buffer.
        self.max_score_tokens = min(MAX_VERIFY_TOKENS, layout.max_seq)
        self._score_logits = np.empty((self.max_score_tokens, vocab_size), np.float32)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or len(allowed_cpus())
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # Threads, deliberately: one per core. The pool spins while a step runs (waking a sleeping thread for
        # each of the ~300 kernels of a decode step costs more than the kernels) and stops spinning the moment
        # the step returns, so it never competes with the event loop, gRPC threads or the sampler between
        # steps, where a pool left spinning slows decode several times over (figures: docs/benchmarks.md).
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.force_spinning_stop", "1")
        # Work in small dynamic blocks: a step is not held up by the one thread that another process preempted.
        so.add_session_config_entry("session.dynamic_block_base", "4")
        if worker_affinities:  # see daemon/thread_placement.py
            so.add_session_config_entry("session.intra_op_thread_affinities", worker_affinities)
        self.session = ort.InferenceSession(os.fspath(graph_path), so, providers=["CPUExecutionProvider"])
        self.threads = so.intra_op_num_threads  # CPU threads a step keeps busy (the caller's included)
        dtype = _NP_DTYPES[layout.dtype]
        shape = (slots, layout.num_kv_heads, layout.max_seq, layout.head_dim)
        # Written once here, not left to calloc's lazy pages: the whole cache is resident from the start, so the
        # memory the daemon needs is what it holds before READY (a box short of it fails at start, not under load).
        self.cache = [(_resident(shape, dtype), _resident(shape, dtype)) for _ in range(layout.num_layers)]
        self._row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        self._ort_dtype = dtype
        # Logits of at most one position per row at a time: [slots, 1, vocab], reused every step.
        self._logits = np.empty((slots, 1, vocab_size), np.float32)
        self._decode_bindings: dict[int, _Binding] = {}  # by row count
        self._score_bindings: dict[tuple[int, int], _Binding] = {}  # by (slot, tokens)
        # Prefill gives ONNX Runtime's arena back what a long chunk made it grow by: otherwise the longest prompt
        # ever seen would keep its activations' memory for the life of the daemon. Decode steps need no more
        # than their first call did.
        self._prefill_options = ort.RunOptions()
        self._prefill_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    @property
    def kv_cache_bytes(self) -> int:
        return self.layout.bytes_per_row() * self.slots

    def _bind(self, first_row: int, rows: int, tokens: int, logits: np.ndarray | None = None) -> _Binding:
        """A binding of rows first_row.. with `tokens` input positions each; logits [rows, n_logits, vocab] into
        `logits` (default: one position per row, into the shared buffer)."""
        if logits is None:
            logits = self._logits[first_row:first_row + rows]
        io = self.session.io_binding()
        b = _Binding(io, np.zeros((rows, tokens), np.int64), np.zeros(rows, np.int32), np.full(rows, tokens, np.int32),
                     np.zeros((rows, logits.shape[1]), np.int64), logits, np.zeros(rows, np.int32))
        for name in ("input_ids", "seqlens_k", "query_lengths", "logits_indices"):
            arr = getattr(b, name)
            io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        shape = [rows, self.layout.num_kv_heads, self.layout.max_seq, self.layout.head_dim]
        for i, (k, v) in enumerate(self.cache):
            for kind, arr in (("key", k), ("value", v)):
                ptr = arr.ctypes.data + first_row * self._row_bytes
                io.bind_input(f"past_{kind}.{i}", "cpu", 0, self._ort_dtype, shape, ptr)
                io.bind_output(f"present_{kind}.{i}", "cpu", 0, self._ort_dtype, shape, ptr)
        io.bind_output("logits", "cpu", 0, np.float32, list(b.logits.shape), b.logits.ctypes.data)
        return b

    def prefill(self, slot: int, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Write tokens at positions start.. of one slot; returns the last token's logits [vocab] (a view)."""
        n = len(token_ids)
        b = self._bind(slot, 1, n)
        b.input_ids[0] = token_ids
        b.seqlens_k[0] = start + n - 1
        b.logits_indices[0, 0] = n - 1
        self.session.run_with_iobinding(b.io, self._prefill_options)
        return b.logits[0, 0]

    def score(self, slot: int, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Write tokens at positions start.. of one slot; returns the logits of every one of them [n, vocab] (a view)."""
        n = len(token_ids)
        if not 0 < n <= self.max_score_tokens:
            raise ValueError(f"a verify pass takes 1..{self.max_score_tokens} tokens, got {n}")
        b = self._score_bindings.get((slot, n))
        if b is None:  # a few draft lengths per slot: kept, so a verify pass allocates nothing
            b = self._score_bindings[(slot, n)] = self._bind(slot, 1, n, self._score_logits[None, :n])
            b.logits_indices[0] = np.arange(n)
        b.input_ids[0] = token_ids
        b.seqlens_k[0] = start + n - 1
        self.session.run_with_iobinding(b.io)
        return b.logits[0]

    def _decode_binding(self, rows: int) -> _Binding:
        b = self._decode_bindings.get(rows)
        if b is None:
            b = self._decode_bindings[rows] = self._bind(0, rows, 1)
        return b

    def decode(self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """One token for each of slots at its position; returns logits [rows, vocab] (a view of the reused buffer)."""
        b = self._decode_binding(decode_bucket(max(slots), self.slots))
        write_decode_inputs(b.input_ids, b.positions, slots, token_ids, positions)
        # An idle row (position -1) gets no new token: nothing is written to its cache, its logits are unused.
        np.maximum(b.positions, 0, out=b.seqlens_k)
        np.greater_equal(b.positions, 0, out=b.query_lengths, casting="unsafe")
        self.session.run_with_iobinding(b.io)
        return b.logits[:, 0]

    def read_kv(self, slot: int, start: int, end: int) -> np.ndarray:
        """K/V of positions [start, end) of a slot: a new array [layers, 2, kv_heads, end - start, head_dim]."""
        out = np.empty((self.layout.num_layers, 2, self.layout.num_kv_heads, end - start, self.layout.head_dim),
                       self._ort_dtype)
        for i, (k, v) in enumerate(self.cache):
            out[i, 0] = k[slot, :, start:end]
            out[i, 1] = v[slot, :, start:end]
        return out

    def write_kv(self, slot: int, start: int, kv: np.ndarray) -> None:
        """Copy K/V as read_kv gives them into positions start.. of a slot."""
        end = start + kv.shape[3]
        for i, (k, v) in enumerate(self.cache):
            k[slot, :, start:end] = kv[i, 0]
            v[slot, :, start:end] = kv[i, 1]

    def close(self) -> None:
        """Nothing to release: the session and the cache go with the object."""


def _resident(shape: tuple[int, ...], dtype) -> np.ndarray:
    arr = np.empty(shape, dtype)
    arr.fill(0)
    return arr


def create_cpu_backend(bundle: Bundle, slots: int, threads: int = 0,
                       placement: ThreadPlacement | None = None) -> OnnxBackend:
    return OnnxBackend(bundle.graph_path, bundle.kv_cache, int(bundle.model["vocab_size"]), slots, threads,
                       placement.onnxruntime_affinities() if placement else None)
