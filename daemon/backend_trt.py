"""TensorRT backend: the bundle's compiled engine on an NVIDIA GPU, each decode step a CUDA-graph replay.

At start: the engine's record in the manifest is checked against the running TensorRT and GPU
(engines are not portable), the memory budget against the GPU's free memory; then every device buffer
is allocated once (pycuda): per layer one K and one V cache [slots, kv_heads, max_seq, head_dim], one
activation scratch shared by all execution contexts (they run one after another on one stream), and
per step shape a packed int64 input buffer and a logits buffer, each with a pinned host twin.
Each present_* output is bound to its past_* input's address, so the cache is updated in place; an engine
whose present_* outputs TensorRT does not alias to their inputs (get_aliased_input_tensor: only its KV-cache
update layer may share an address) is refused. A row range of the cache is a pointer offset; every bound
address is 256-byte aligned (the bundle's max_seq is rounded so each cache row is, and the packed inputs'
segments are), and every set_input_shape / set_tensor_address result is checked.

The CUDA context (the device's primary context, which TensorRT's CUDA runtime uses too) is pushed at
the start of every public call and popped at its end, on whatever thread makes it: pycuda aborts the
process when a thread's context stack is not empty at exit.

Prefill runs without a graph (its shape changes with every prompt) in its own context (profile 0), and so does
speculative decoding's verify pass (the last profile: one row, up to MAX_VERIFY_TOKENS positions, logits at each).
Each decode batch size gets its own context and static profile with fixed shapes and addresses: one warm-up
execute_async_v3, then the same call captured into a CUDA graph (daemon/cuda_graph.py). A step then
copies the packed token ids/positions in, launches the graph and copies the logits back: one copy, one
launch, one copy. If a capture fails in any way, that batch size falls back to plain execute_async_v3,
logged and reported by GetModel (ModelInfo.cuda_graphs).

Written against the TensorRT >= 10.15 / 11.x and pycuda APIs; not run on this project's build machines
(no TensorRT, no GPU): tests/gpu/test_tensorrt.py and `edgellm validate` exercise it on hardware.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from bundle_format.bundle import Bundle, BundleError
from bundle_format.decode_buckets import decode_bucket, decode_buckets
from bundle_format.kv_cache import KvCacheLayout
from bundle_format.trt_plan import (PREFILL, check_aligned, check_engine_compatible, check_kv_aliases,
                                    check_kv_rows_aligned, check_memory, check_set_input_shape,
                                    check_set_tensor_address, decode_profile, fill_decode_inputs, fill_verify_inputs,
                                    kv_cache_pairs, memory_budget, packed_input_elements, packed_inputs, packed_views,
                                    verify_profile)
from daemon.backend import StepRow, forward_as_calls, write_decode_inputs
from daemon.cuda_graph import CudaGraph, capture_or_fallback
from daemon.prefix_cache import block_shape

log = logging.getLogger("edgellm.backend")


@dataclass
class _Step:
    """One step shape's execution context and fixed buffers (host views are numpy arrays on pinned memory)."""

    context: Any
    rows: int
    host_in: np.ndarray  # packed int64 inputs, pinned
    device_in: Any
    host_logits: np.ndarray  # [rows, n_logits, vocab] float32, pinned (n_logits: 1, or a verify pass's most)
    device_logits: Any
    input_ids: np.ndarray
    position_ids: np.ndarray
    write_indices: np.ndarray
    logits_indices: np.ndarray
    positions: np.ndarray  # what a decode step fills, with input_ids: each row's position, -1 if idle
    graph: CudaGraph | None = None
    profile: int = 0  # its optimization profile (named when TensorRT refuses a shape)


@dataclass(frozen=True)
class KvCopy:
    """One 2D copy between a layer's K (kv=0) or V (kv=1) cache and a host block: `rows` rows (one per KV head) of
    `width` bytes, `device_pitch` apart in the cache (a head's max_seq positions) and `host_pitch` in the block."""
    layer: int
    kv: int
    device_offset: int  # bytes from the start of that layer's K or V buffer
    device_pitch: int
    host_pitch: int
    width: int
    rows: int


def kv_copy_plan(layout: KvCacheLayout, row_bytes: int, slot: int, start: int, tokens: int) -> list[KvCopy]:
    """The copies that move positions [start, start + tokens) of a slot between the cache, per layer and K/V one
    [slots, kv_heads, max_seq, head_dim] buffer whose slot rows are row_bytes apart, and a host block
    [layers, 2, kv_heads, tokens, head_dim] (a head's positions are contiguous on both sides)."""
    position_bytes = layout.head_dim * layout.itemsize
    return [KvCopy(layer, kv, slot * row_bytes + start * position_bytes, layout.max_seq * position_bytes,
                   tokens * position_bytes, tokens * position_bytes, layout.num_kv_heads)
            for layer in range(layout.num_layers) for kv in (0, 1)]


class TrtBackend:
    name = "tensorrt"
    threads = 0  # the model runs on the GPU: a step keeps no CPU thread busy but the caller's

    def __init__(self, bundle: Bundle, slots: int, cuda_graphs: bool = True, device: int = 0):
        import pycuda.driver as cuda
        import tensorrt as trt

        self._cuda, self._trt = cuda, trt
        record = bundle.manifest.get("engine")
        if not record:
            raise BundleError(f"{bundle.path} holds no TensorRT engine yet: compile it on this device first "
                              f"(edgellm compile {bundle.path})")
        self.layout = layout = bundle.kv_cache
        check_kv_rows_aligned(layout)  # EngineRefused (an EngineMismatch): a bundle built before rows were aligned
        cuda.init()
        dev = cuda.Device(device)
        check_engine_compatible(record, trt.__version__, dev.name(), tuple(dev.compute_capability()), slots)
        self._ctx = dev.retain_primary_context()  # the context TensorRT's CUDA runtime uses too
        self._decode: dict[int, _Step] = {}
        self._prefill: _Step | None = None
        self._verify: _Step | None = None  # speculative decoding's verify pass; None: the engine has no profile for it
        self.max_score_tokens = 0
        self._buffers: list[Any] = []  # every device allocation, freed by close()
        self.graph_status: dict[int, str] = {}
        self._ctx.push()
        try:
            self._load(bundle, record, slots, cuda_graphs, dev.name())
        except BaseException:
            self._free()
            raise
        finally:
            cuda.Context.pop()  # this thread's stack is empty again, whatever happened

    def _load(self, bundle: Bundle, record: dict, slots: int, cuda_graphs: bool, gpu_name: str) -> None:
        cuda, trt, layout = self._cuda, self._trt, self.layout
        self.slots = slots
        self.vocab_size = vocab = int(bundle.model["vocab_size"])
        self.max_prefill_tokens = int(record["max_prefill_tokens"])
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine_bytes = (bundle.path / record["file"]).read_bytes()
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise BundleError(f"TensorRT could not load {record['file']} (see its messages above); compile again here")
        outputs = set(self._engine_tensors())
        aliased = {out: self.engine.get_aliased_input_tensor(out) for out in kv_cache_pairs(layout.num_layers)
                   if out in outputs}
        self._aliases = check_kv_aliases(aliased, layout.num_layers)  # EngineRefused names the tensor
        scratch = max(self.engine.get_device_memory_size_for_profile_v2(p)
                      for p in range(self.engine.num_optimization_profiles))
        verify = verify_profile(int(record["slots"]))
        if self.engine.num_optimization_profiles > verify:  # engines compiled before it have none
            self.max_score_tokens = int(self.engine.get_tensor_profile_shape("input_ids", verify)[2][1])
        budget = memory_budget(layout, slots, vocab, self.max_prefill_tokens, len(engine_bytes), scratch,
                               self.max_score_tokens)
        free, _total = cuda.mem_get_info()
        check_memory(budget, free + len(engine_bytes))  # the engine's weights are already resident
        log.info("TensorRT %s on %s: device memory %s", trt.__version__, gpu_name, budget.summary())

        self.stream = cuda.Stream()
        self._scratch = self._alloc(max(scratch, 1))
        self._scratch_bytes = scratch
        self._row_bytes = layout.tensor_row_bytes()  # one layer's K (or V) of one row: 256-byte multiple
        self._cache = {}
        for i in range(layout.num_layers):
            for kind in ("key", "value"):
                buf = self._alloc(self._row_bytes * slots)
                cuda.memset_d8(buf, 0, self._row_bytes * slots)
                self._cache[i, kind] = buf
        self._prefill = self._make_step(PREFILL, rows=1, tokens=self.max_prefill_tokens)
        if self.max_score_tokens:
            n = self.max_score_tokens
            self._verify = self._make_step(verify, rows=1, tokens=n, n_logits=n)
        else:
            log.info("the engine has no verify profile: no speculative decoding (compile the bundle again for it)")
        for rows in decode_buckets(slots):
            step = self._make_step(decode_profile(rows, int(record["slots"])), rows=rows, tokens=1)
            self._decode[rows] = step
            self._bind(step, first_row=0, rows=rows, tokens=1)
            step.logits_indices.fill(0)
            self._warm_up(step)
            if cuda_graphs:
                self._capture(step)
            else:
                self.graph_status[rows] = "disabled"

    # ---- set-up ---------------------------------------------------------------------------------------
    def _engine_tensors(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def _alloc(self, nbytes: int) -> Any:
        buf = self._cuda.mem_alloc(nbytes)  # cuMemAlloc: aligned to at least 256 bytes
        self._buffers.append(buf)
        return buf

    def _make_step(self, profile: int, rows: int, tokens: int, n_logits: int = 1) -> _Step:
        cuda, trt = self._cuda, self._trt
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(int(self._scratch), self._scratch_bytes)
        if not context.set_optimization_profile_async(profile, self.stream.handle):
            raise RuntimeError(f"TensorRT refused optimization profile {profile} for an execution context")
        n = packed_input_elements(rows, tokens, n_logits)
        host_in = cuda.pagelocked_zeros(n, np.int64)
        host_logits = cuda.pagelocked_zeros((rows, n_logits, self.vocab_size), np.float32)
        return _Step(context, rows, host_in, self._alloc(host_in.nbytes), host_logits,
                     self._alloc(host_logits.nbytes), **packed_views(host_in, rows, tokens, n_logits),
                     positions=np.zeros(rows, np.int64), profile=profile)

    def _set_shape(self, step: _Step, name: str, shape: tuple[int, ...]) -> None:
        check_set_input_shape(step.context.set_input_shape(name, shape), name, shape, step.profile)

    def _set_address(self, step: _Step, name: str, address: int) -> None:
        check_aligned(name, address)
        check_set_tensor_address(step.context.set_tensor_address(name, address), name, address)

    def _bind(self, step: _Step, first_row: int, rows: int, tokens: int, n_logits: int = 1) -> None:
        """Shapes and addresses of one step; inputs packed in device_in, KV cache rows [first_row, first_row+rows)."""
        base = int(step.device_in)
        for name, (offset, shape) in packed_inputs(rows, tokens, n_logits).items():
            self._set_shape(step, name, shape)
            self._set_address(step, name, base + 8 * offset)
        cache_shape = (rows, self.layout.num_kv_heads, self.layout.max_seq, self.layout.head_dim)
        for (i, kind), buf in self._cache.items():
            ptr = int(buf) + first_row * self._row_bytes
            self._set_shape(step, f"past_{kind}.{i}", cache_shape)
            self._set_address(step, f"past_{kind}.{i}", ptr)
            self._set_address(step, f"present_{kind}.{i}", ptr)  # aliased (checked at load): updated in place
        self._set_address(step, "logits", int(step.device_logits))

    def _warm_up(self, step: _Step) -> None:
        step.input_ids.fill(0)
        step.positions.fill(-1)
        self._decode_inputs(step)
        self._run(step, graph=False)

    def _decode_inputs(self, step: _Step) -> None:
        fill_decode_inputs(step.positions, step.position_ids, step.write_indices, self.layout.max_seq - 1)

    def _capture(self, step: _Step) -> None:
        def capture() -> CudaGraph:
            return CudaGraph.capture(self.stream.handle, lambda: bool(step.context.execute_async_v3(self.stream.handle)))

        def check(graph: CudaGraph) -> None:
            step.graph = graph
            try:
                self._run(step)  # replay once: a graph that cannot launch is found now, not on the first request
            except BaseException:
                step.graph = None
                raise

        step.graph, status = capture_or_fallback(capture, check)
        self.graph_status[step.rows] = status
        if step.graph is None:
            try:
                self.stream.synchronize()
            except Exception:  # noqa: BLE001 - the warning below says what failed; plain enqueue reports its own errors
                pass
            log.warning("decode batch %d: CUDA graph capture failed, using plain enqueue: %s", step.rows, status)

    @property
    def cuda_graphs(self) -> str:
        """One line for GetModel: which decode batch sizes replay a CUDA graph."""
        captured = [r for r, s in self.graph_status.items() if s == "captured"]
        if len(captured) == len(self.graph_status):
            return f"captured for decode batch sizes {', '.join(map(str, captured))}"
        fallback = {r: s for r, s in self.graph_status.items() if s != "captured"}
        return "; ".join(f"batch {r}: {s}" for r, s in fallback.items()) + (
            f"; captured for {', '.join(map(str, captured))}" if captured else "")

    @property
    def kv_cache_bytes(self) -> int:
        return self.layout.bytes_per_row() * self.slots

    # ---- steps ----------------------------------------------------------------------------------------
    def _run(self, step: _Step, graph: bool = True) -> np.ndarray:
        cuda, stream = self._cuda, self.stream
        cuda.memcpy_htod_async(step.device_in, step.host_in, stream)
        if graph and step.graph is not None:
            step.graph.launch(stream.handle)
        elif not step.context.execute_async_v3(stream.handle):
            raise RuntimeError("TensorRT could not enqueue the step (see its messages in the log)")
        cuda.memcpy_dtoh_async(step.host_logits, step.device_logits, stream)
        stream.synchronize()
        return step.host_logits

    def prefill(self, slot: int, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Write tokens at positions start.. of one slot; returns the last token's logits [vocab] (a view).

        Prompts longer than the engine's prefill profile run as consecutive chunks."""
        ids = np.asarray(token_ids, np.int64)
        step = self._prefill
        self._ctx.push()  # popped below on this same thread: no thread keeps the context pushed
        try:
            for begin in range(0, len(ids), self.max_prefill_tokens):
                chunk = ids[begin:begin + self.max_prefill_tokens]
                n = len(chunk)
                self._bind(step, first_row=slot, rows=1, tokens=n)
                views = packed_views(step.host_in, 1, n)
                pos = start + begin
                views["input_ids"][0] = chunk
                views["position_ids"][0] = np.arange(pos, pos + n)
                views["write_indices"][0] = pos
                views["logits_indices"][0, 0] = n - 1
                self._run(step, graph=False)
        finally:
            self._cuda.Context.pop()
        return step.host_logits[0, 0]

    def score(self, slot: int, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Write tokens at positions start.. of one slot; the logits of every one of them [n, vocab] (a view of the
        pinned buffer). The verify profile's own context, bound per call like prefill (no CUDA graph: its shape
        and slot change from call to call)."""
        n = len(token_ids)
        if not 0 < n <= self.max_score_tokens:
            raise ValueError(f"a verify pass takes 1..{self.max_score_tokens} tokens here, got {n}")
        step, cuda, stream = self._verify, self._cuda, self.stream
        self._ctx.push()  # popped below on this same thread: no thread keeps the context pushed
        try:
            self._bind(step, first_row=slot, rows=1, tokens=n, n_logits=n)
            fill_verify_inputs(packed_views(step.host_in, 1, n, n), np.asarray(token_ids, np.int64), start)
            cuda.memcpy_htod_async(step.device_in, step.host_in, stream)
            if not step.context.execute_async_v3(stream.handle):
                raise RuntimeError("TensorRT could not enqueue the verify pass (see its messages in the log)")
            out = step.host_logits[0, :n]  # the first n rows of the buffer: what the engine wrote
            cuda.memcpy_dtoh_async(out, step.device_logits, stream)
            stream.synchronize()
        finally:
            cuda.Context.pop()
        return out

    def _decode_step(self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]) -> _Step:
        """The fixed buffers of the decode batch size that covers slots, filled for this step (host side only)."""
        step = self._decode[decode_bucket(max(slots), self.slots)]
        write_decode_inputs(step.input_ids, step.positions, slots, token_ids, positions)
        self._decode_inputs(step)
        return step

    def _run_pushed(self, step: _Step, graph: bool) -> np.ndarray:
        self._ctx.push()  # popped below on this same thread: no thread keeps the context pushed
        try:
            return self._run(step, graph)[:, 0]
        finally:
            self._cuda.Context.pop()

    def decode(self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """One token for each of slots at its position; returns logits [rows, vocab] (a view of the pinned buffer)."""
        return self._run_pushed(self._decode_step(slots, token_ids, positions), graph=True)

    def forward(self, rows: Sequence[StepRow]) -> np.ndarray:
        """Backend.forward as this backend's fixed-shape calls (one CUDA-graph bucket per decode batch size)."""
        return forward_as_calls(self, rows, self.vocab_size)

    def decode_plain(self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """decode() without the CUDA graph (for validation and timing)."""
        return self._run_pushed(self._decode_step(slots, token_ids, positions), graph=False)

    def layer_information(self) -> str:
        """The engine inspector's JSON for the first decode profile's context (shapes resolved)."""
        step = self._decode[min(self._decode)]
        self._ctx.push()
        try:
            inspector = self.engine.create_engine_inspector()
            inspector.execution_context = step.context
            return inspector.get_engine_information(self._trt.LayerInformationFormat.JSON)
        finally:
            self._cuda.Context.pop()

    # ---- the prefix cache's copies (daemon/prefix_cache.py) ---------------------------------------------
    def _kv_copy(self, slot: int, start: int, tokens: int, host: np.ndarray, to_host: bool) -> None:
        """Copy positions [start, start + tokens) of a slot between every layer's K/V cache and host
        [layers, 2, kv_heads, tokens, head_dim], as kv_copy_plan lays the copies out."""
        cuda = self._cuda
        for c in kv_copy_plan(self.layout, self._row_bytes, slot, start, tokens):
            side = host[c.layer, c.kv]  # contiguous [kv_heads, tokens, head_dim]
            device = int(self._cache[c.layer, ("key", "value")[c.kv]]) + c.device_offset
            copy = cuda.Memcpy2D()
            if to_host:
                copy.set_src_device(device)
                copy.src_pitch = c.device_pitch
                copy.set_dst_host(side)
                copy.dst_pitch = c.host_pitch
            else:
                copy.set_src_host(side)
                copy.src_pitch = c.host_pitch
                copy.set_dst_device(device)
                copy.dst_pitch = c.device_pitch
            copy.width_in_bytes = c.width
            copy.height = c.rows
            copy(self.stream)  # on the steps' stream: after the prefill that wrote them, before the next step
        self.stream.synchronize()

    def read_kv(self, slot: int, start: int, end: int) -> np.ndarray:
        """K/V of positions [start, end) of a slot: a new host array [layers, 2, kv_heads, end - start, head_dim]."""
        self._ensure_context()
        out = np.empty(block_shape(self.layout, end - start), self.layout.np_dtype)
        self._kv_copy(slot, start, end - start, out, to_host=True)
        return out

    def write_kv(self, slot: int, start: int, kv: np.ndarray) -> None:
        """Copy K/V as read_kv gives them into positions start.. of a slot."""
        self._ensure_context()
        self._kv_copy(slot, start, kv.shape[3], np.ascontiguousarray(kv), to_host=False)

    def close(self) -> None:
        """Destroy the graphs and free every device buffer, with the context current (any thread may call this)."""
        if self._ctx is None:
            return
        self._ctx.push()
        try:
            self._free()
        finally:
            self._cuda.Context.pop()
            self._ctx = None

    def _free(self) -> None:
        for step in self._decode.values():
            if step.graph is not None:
                step.graph.close()
                step.graph = None
        steps = [*self._decode.values(), *(s for s in (self._prefill, self._verify) if s is not None)]
        self._decode, self._prefill, self._verify = {}, None, None
        for step in steps:
            step.context = None  # execution contexts before the scratch memory they use
            for host in (step.host_in, step.host_logits):
                if host.base is not None and hasattr(host.base, "free"):
                    host.base.free()  # pinned memory
        for buf in self._buffers:
            buf.free()
        self._buffers.clear()
        self.engine = None
        if getattr(self, "stream", None) is not None:
            self.stream = None  # cuStreamDestroy while the context is current


def create_trt_backend(bundle: Bundle, slots: int, cuda_graphs: bool = True) -> TrtBackend:
    return TrtBackend(bundle, slots, cuda_graphs=cuda_graphs)
