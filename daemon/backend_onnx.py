"""CPU backend: the bundle's CPU graph (build_engine/cpu_graph.py) in ONNX Runtime, with a KV cache allocated once.

The cache is one numpy array per layer and K/V, shaped [slots, kv_heads, max_seq, head_dim]. A step
runs a contiguous range of rows (slots) by binding views of those arrays as both the `past_*` inputs
and the `present_*` outputs, so GroupQueryAttention appends to the cache in place and nothing is copied.
A step's tokens are packed (the graph's contract): forward() runs decode rows and prompt chunks of several slots in
one call. Bindings are kept per step shape (decode: per row count, bundle_format/decode_buckets.py's
decode_bucket) and their inputs live in fixed numpy buffers: a decode step writes a few integers and calls ONNX
Runtime, nothing else (the same fixed-buffer discipline the TensorRT backend needs for CUDA graph replay).
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
from daemon.backend import StepRow, write_decode_inputs
from daemon.thread_placement import ThreadPlacement, allowed_cpus

_CACHE_DTYPES = ("float32", "float16", "int8")  # what ONNX Runtime's CPU attention holds (int8: kv_quant.py)


@dataclass
class _Binding:
    """An IOBinding of one step shape (rows of the cache from first_row, tokens, the longest row's tokens, logits)
    whose inputs are fixed numpy buffers and whose logits are the first rows of the backend's logits buffer."""

    io: ort.IOBinding
    input_ids: np.ndarray  # [1, tokens]
    seqlens_k: np.ndarray  # [rows]
    query_lengths: np.ndarray  # [rows]
    token_rows: np.ndarray  # [rows, max_q]
    token_places: np.ndarray  # [1, tokens]
    logits_indices: np.ndarray  # [1, n_logits]
    logits: np.ndarray  # [n_logits, vocab]
    positions: np.ndarray  # [rows]: a decode step's token position per row, -1 for an idle row


_MAX_BINDINGS = 64  # step shapes kept bound: decode buckets and the few shapes a steady mixed load repeats


def create_session(graph_path: str | os.PathLike, threads: int = 0,
                   worker_affinities: str | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with the daemon's threading: `threads` workers (0: one per allowed core)."""
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
    return ort.InferenceSession(os.fspath(graph_path), so, providers=["CPUExecutionProvider"])


class OnnxBackend:
    name = "onnxruntime-cpu"
    cuda_graphs = ""

    def __init__(self, graph_path: str | os.PathLike, layout: KvCacheLayout, vocab_size: int, slots: int,
                 threads: int = 0, worker_affinities: str | None = None):
        if layout.dtype not in _CACHE_DTYPES:
            raise ValueError(f"the CPU backend cannot run a {layout.dtype} KV cache")
        self.layout = layout
        self.slots = slots
        self.vocab_size = vocab_size
        # A verify pass (speculative decoding) is a step whose one row keeps every position's logits.
        self.max_score_tokens = min(MAX_VERIFY_TOKENS, layout.max_seq)
        self.session = create_session(graph_path, threads, worker_affinities)
        # CPU threads a step keeps busy (the caller's included)
        self.threads = self.session.get_session_options().intra_op_num_threads
        dtype = layout.np_dtype
        shape = (slots, layout.num_kv_heads, layout.max_seq, layout.head_dim)
        # Written once here, not left to calloc's lazy pages: the whole cache is resident from the start, so the
        # memory the daemon needs is what it holds before READY (a box short of it fails at start, not under load).
        self.cache = [(_resident(shape, dtype), _resident(shape, dtype)) for _ in range(layout.num_layers)]
        self._row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        self._ort_dtype = dtype
        # Logits of every row that wants them, reused every step; grown (and the bindings dropped) when a step
        # wants more than it holds (a verification of drafted tokens).
        self._logits = np.empty((1, slots, vocab_size), np.float32)
        self._bindings: dict[tuple[int, int, int, int, int, bool], _Binding] = {}  # by step shape, oldest first
        # Prefill gives ONNX Runtime's arena back what a long chunk made it grow by: otherwise the longest prompt
        # ever seen would keep its activations' memory for the life of the daemon. Decode steps need no more
        # than their first call did.
        self._prefill_options = ort.RunOptions()
        self._prefill_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    @property
    def kv_cache_bytes(self) -> int:
        return self.layout.bytes_per_row() * self.slots

    def _binding(self, first_row: int, rows: int, tokens: int, max_q: int, n_logits: int,
                 decode: bool = False) -> _Binding:
        """The binding of a step shape; decode steps keep their own (their token layout is written once)."""
        key = (first_row, rows, tokens, max_q, n_logits, decode)
        b = self._bindings.get(key)
        if b is not None:
            return b
        if n_logits > self._logits.shape[1]:
            self._logits = np.empty((1, n_logits, self.vocab_size), np.float32)
            self._bindings.clear()  # they point at the old buffer
        if len(self._bindings) >= _MAX_BINDINGS:
            del self._bindings[next(iter(self._bindings))]
        io = self.session.io_binding()
        logits = self._logits[:, :n_logits]
        b = _Binding(io, np.zeros((1, tokens), np.int64), np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                     np.zeros((rows, max_q), np.int64), np.zeros((1, tokens), np.int64),
                     np.zeros((1, n_logits), np.int64), logits[0], np.zeros(rows, np.int32))
        for name in ("input_ids", "seqlens_k", "query_lengths", "token_rows", "token_places", "logits_indices"):
            arr = getattr(b, name)
            io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        shape = [rows, self.layout.num_kv_heads, self.layout.max_seq, self.layout.head_dim]
        for i, (k, v) in enumerate(self.cache):
            for kind, arr in (("key", k), ("value", v)):
                ptr = arr.ctypes.data + first_row * self._row_bytes
                io.bind_input(f"past_{kind}.{i}", "cpu", 0, self._ort_dtype, shape, ptr)
                io.bind_output(f"present_{kind}.{i}", "cpu", 0, self._ort_dtype, shape, ptr)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self._bindings[key] = b
        return b

    def forward(self, rows: Sequence[StepRow]) -> np.ndarray:
        """Every row's tokens in one call, packed; logits [sum of rows' logits, vocab] row after row (a view)."""
        first = min(r.slot for r in rows)
        span = max(r.slot for r in rows) - first + 1
        counts = [len(r.token_ids) for r in rows]
        tokens, max_q = sum(counts), max(counts)
        wanted = sum(r.logits for r in rows)
        # At least one logits row: the graph's Reshape reads a 0 in its shape as "keep this dimension".
        b = self._binding(first, span, tokens, max_q, max(wanted, 1))
        b.logits_indices[0, 0] = tokens - 1  # that one, when no row wants any
        b.query_lengths.fill(0)  # rows of the span not in this step: idle, nothing written to their cache
        b.seqlens_k.fill(0)
        b.token_rows.fill(0)
        at = picked = 0
        for r, n in zip(rows, counts):
            row = r.slot - first
            b.input_ids[0, at:at + n] = r.token_ids
            b.seqlens_k[row] = r.start + n - 1
            b.query_lengths[row] = n
            b.token_rows[row, :n] = range(at, at + n)
            b.token_rows[row, n:] = at + n - 1  # padding: computed by attention, never gathered back
            b.token_places[0, at:at + n] = range(row * max_q, row * max_q + n)
            b.logits_indices[0, picked:picked + r.logits] = range(at + n - r.logits, at + n)
            at, picked = at + n, picked + r.logits
        # A step with prompt tokens gives back what it made ONNX Runtime's arena grow by (see __init__).
        self.session.run_with_iobinding(b.io, self._prefill_options if tokens > span else None)
        return b.logits[:wanted]

    def prefill(self, slot: int, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Write tokens at positions start.. of one slot; returns the last token's logits [vocab] (a view)."""
        return self.forward([StepRow(slot, token_ids, start)])[0]

    def score(self, slot: int, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Write tokens at positions start.. of one slot; returns the logits of every one of them [n, vocab] (a view)."""
        n = len(token_ids)
        if not 0 < n <= self.max_score_tokens:
            raise ValueError(f"a verify pass takes 1..{self.max_score_tokens} tokens, got {n}")
        return self.forward([StepRow(slot, token_ids, start, logits=n)])

    def _decode_binding(self, rows: int) -> _Binding:
        key = (0, rows, rows, 1, rows, True)
        b = self._bindings.get(key)
        if b is None:  # one token per row, idle rows included (they attend to nothing and write nothing)
            b = self._binding(*key)
            b.token_rows[:, 0] = b.token_places[0] = b.logits_indices[0] = np.arange(rows)
        return b

    def decode(self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """One token for each of slots at its position; returns logits [rows, vocab] (a view of the reused buffer)."""
        b = self._decode_binding(decode_bucket(max(slots), self.slots))
        write_decode_inputs(b.input_ids.reshape(-1, 1), b.positions, slots, token_ids, positions)
        # An idle row (position -1) gets no new token: nothing is written to its cache, its logits are unused.
        np.maximum(b.positions, 0, out=b.seqlens_k)
        np.greater_equal(b.positions, 0, out=b.query_lengths, casting="unsafe")
        self.session.run_with_iobinding(b.io)
        return b.logits

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
