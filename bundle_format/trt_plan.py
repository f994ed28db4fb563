"""What a TensorRT engine for a bundle looks like, decided without TensorRT or a GPU.

Profile shapes, step buffer layout and sizes, the device-memory budget, engine
compatibility and precision support per GPU: plain functions shared by the compiler
(build_engine/trt_compiler.py) and the daemon's backend (daemon/backend_trt.py), tested on any machine.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from bundle_format.decode_buckets import decode_buckets
from bundle_format.kv_cache import KvCacheLayout

ENGINE_FILE = "model.engine"
PREFILL = 0  # optimization profile of prefill; the k-th of decode_buckets() uses profile 1 + k; then verify
DEFAULT_MAX_PREFILL_TOKENS = 1024
# Most positions of a verify pass (speculative decoding: the last token and up to 32 drafted ones).
MAX_VERIFY_TOKENS = 33
# Step inputs, packed into one int64 buffer per step shape so one copy moves them all.
STEP_INPUTS = ("input_ids", "position_ids", "write_indices", "logits_indices")
MIN_COMPUTE_CAPABILITY = {"fp8": (8, 9), "bf16": (8, 0), "int8": (7, 5), "fp16": (7, 5)}
# IExecutionContext::setTensorAddress requires every bound address to be 256-byte aligned (NvInferRuntime.h).
ADDRESS_ALIGNMENT = 256
_INT64_ALIGN = ADDRESS_ALIGNMENT // 8  # packed int64 elements per alignment unit


class EngineMismatch(Exception):
    """The engine cannot serve here: built for another TensorRT version or GPU (engines are not portable), or
    breaking a rule the backend relies on (the subclasses); the message says what to change or rebuild."""


class PrecisionUnsupported(ValueError):
    """The GPU cannot run this precision."""


class EngineRefused(EngineMismatch):
    """The engine breaks a rule the backend relies on (a KV output not aliased, a misaligned cache row)."""


def align_up(n: int, alignment: int = ADDRESS_ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def format_cc(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def check_precision_supported(precision: str, compute_capability: tuple[int, int], gpu_name: str = "this GPU") -> None:
    """Refuse a precision the GPU has no tensor-core support for (FP8 needs compute capability 8.9)."""
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    if need is None or tuple(compute_capability) >= need:
        return
    hint = " Build with --precision int8 (or fp16) instead." if precision in ("fp8", "bf16") else ""
    raise PrecisionUnsupported(f"{precision} needs compute capability {format_cc(need)} or newer; {gpu_name} has "
                               f"{format_cc(compute_capability)}.{hint}")


def default_max_prefill_tokens(context_length: int) -> int:
    """Longest prefill one engine call takes; the backend splits longer prompts into chunks."""
    return min(context_length, DEFAULT_MAX_PREFILL_TOKENS)


Shape = tuple[int, ...]


def decode_profile(rows: int, slots: int) -> int:
    """The optimization profile (and so the execution context and CUDA graph) of a decode batch size."""
    return 1 + decode_buckets(slots).index(rows)


def verify_profile(slots: int) -> int:
    """The optimization profile of the verify pass: after prefill and every decode batch size."""
    return 1 + len(decode_buckets(slots))


def verify_tokens_limit(layout: KvCacheLayout, verify_tokens: int = MAX_VERIFY_TOKENS) -> int:
    """The verify profile's most positions: verify_tokens, or less where the cache is shorter."""
    return min(verify_tokens, layout.max_seq - 1)


def optimization_profiles(layout: KvCacheLayout, slots: int, max_prefill_tokens: int,
                          verify_tokens: int = MAX_VERIFY_TOKENS) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """[prefill, decode for each decode batch size, verify]: name -> (min, opt, max) for every input.

    Prefill: one row, 1..max_prefill_tokens tokens (opt: a typical prompt chunk). Decode: one token per row,
    static shapes, one profile per batch size the scheduler uses. Why one each: every CUDA graph needs
    its own execution context with fixed shapes, and TensorRT documents that execution contexts alive at
    the same time must not share a profile; a static profile also gets kernels tuned for its exact shape.
    The KV-cache dims are static but for the batch. Verify (speculative decoding): one row, 1..verify_tokens
    tokens with logits at every one (logits_indices [1, tokens]); like prefill, its shape changes per call."""
    if max_prefill_tokens < 1 or max_prefill_tokens > layout.max_seq - 1:
        raise ValueError(f"max prefill tokens must be in 1..{layout.max_seq - 1}, got {max_prefill_tokens}")
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    cache = (layout.num_kv_heads, layout.max_seq, layout.head_dim)
    kv_names = [f"past_{kv}.{i}" for i in range(layout.num_layers) for kv in ("key", "value")]

    def profile(rows: tuple[int, int, int], tokens: tuple[int, int, int],
                every_token: bool = False) -> dict[str, tuple[Shape, Shape, Shape]]:
        p = {"input_ids": tuple((r, t) for r, t in zip(rows, tokens)),
             "position_ids": tuple((r, t) for r, t in zip(rows, tokens)),
             "write_indices": tuple((r,) for r in rows),
             "logits_indices": tuple((r, t if every_token else 1) for r, t in zip(rows, tokens))}
        for name in kv_names:
            p[name] = tuple((r, *cache) for r in rows)
        return p

    opt_prompt = min(max_prefill_tokens, 128)
    verify = verify_tokens_limit(layout, verify_tokens)
    return [profile((1, 1, 1), (1, opt_prompt, max_prefill_tokens)),
            *(profile((r, r, r), (1, 1, 1)) for r in decode_buckets(slots)),
            profile((1, 1, 1), (1, min(9, verify), verify), every_token=True)]


def profiles_to_manifest(profiles: list[dict[str, tuple[Shape, Shape, Shape]]]) -> list[dict[str, Any]]:
    """YAML-friendly profiles (the KV-cache inputs summarized by the first one's shapes)."""
    out = []
    names = ["prefill", *("verify" if p["logits_indices"][2][1] > 1 else f"decode_batch_{p['write_indices'][0][0]}"
                          for p in profiles[1:])]
    for name, p in zip(names, profiles):
        shapes = {k: [list(s) for s in v] for k, v in p.items() if not k.startswith("past_")}
        kv = next((v for k, v in p.items() if k.startswith("past_")), None)
        if kv is not None:
            shapes["past_*"] = [list(s) for s in kv]
        out.append({"name": name, "shapes": shapes})
    return out


def packed_inputs(rows: int, tokens: int, n_logits: int = 1) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Where each step input lives in the packed int64 buffer: name -> (element offset, shape); n_logits positions
    per row get logits (a verify pass: every one).

    Each segment starts on a 256-byte boundary (setTensorAddress refuses anything less); the buffer
    itself comes from cuMemAlloc, which aligns to at least 256 bytes."""
    shapes = {"input_ids": (rows, tokens), "position_ids": (rows, tokens), "write_indices": (rows,),
              "logits_indices": (rows, n_logits)}
    out, offset = {}, 0
    for name in STEP_INPUTS:
        out[name] = (offset, shapes[name])
        offset = align_up(offset + math.prod(shapes[name]), _INT64_ALIGN)
    return out


def packed_input_elements(rows: int, tokens: int, n_logits: int = 1) -> int:
    offset, shape = packed_inputs(rows, tokens, n_logits)[STEP_INPUTS[-1]]
    return offset + math.prod(shape)


def packed_views(buffer: np.ndarray, rows: int, tokens: int, n_logits: int = 1) -> dict[str, np.ndarray]:
    """Each step input as a view of the packed buffer (writes go straight into it), shaped for rows x tokens."""
    return {name: buffer[off:off + int(np.prod(shape))].reshape(shape)
            for name, (off, shape) in packed_inputs(rows, tokens, n_logits).items()}


def fill_verify_inputs(views: dict[str, np.ndarray], token_ids: np.ndarray, start: int) -> None:
    """A verify pass's inputs (packed_views of 1 row x n tokens x n logits): the tokens at positions start..,
    written from start, logits at every one."""
    n = len(token_ids)
    views["input_ids"][0] = token_ids
    views["position_ids"][0] = np.arange(start, start + n)
    views["write_indices"][0] = start
    views["logits_indices"][0] = np.arange(n)


def graph_key(profile: int, rows: int, tokens: int) -> tuple[int, int, int]:
    """A CUDA graph is valid for exactly one profile and one set of input shapes."""
    return (profile, rows, tokens)


@dataclass(frozen=True)
class MemoryBudget:
    """Device memory the backend allocates once at start, in bytes."""

    weights: int  # the engine's size: weights dominate it
    kv_cache: int
    activations: int  # TensorRT's scratch memory, shared by both profiles' contexts
    step_buffers: int  # packed inputs and logits of every step shape

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.step_buffers

    def summary(self) -> str:
        mib = 1 << 20
        return (f"{self.total / mib:.0f} MiB (weights {self.weights / mib:.0f}, KV cache {self.kv_cache / mib:.0f}, "
                f"activations {self.activations / mib:.0f}, step buffers {self.step_buffers / mib:.1f})")


def step_buffer_bytes(slots: int, vocab_size: int, max_prefill_tokens: int, verify_tokens: int = 0) -> int:
    """Packed inputs of the prefill shape, each decode shape and the longest verify pass, plus logits of one row, of
    every decode shape and of every verify position."""
    inputs = packed_input_elements(1, max_prefill_tokens) + sum(packed_input_elements(r, 1) for r in decode_buckets(slots))
    logits = vocab_size + sum(r * vocab_size for r in decode_buckets(slots))
    if verify_tokens:
        inputs += packed_input_elements(1, verify_tokens, verify_tokens)
        logits += verify_tokens * vocab_size
    return 8 * inputs + 4 * logits


def memory_budget(layout: KvCacheLayout, slots: int, vocab_size: int, max_prefill_tokens: int, engine_bytes: int,
                  activation_bytes: int, verify_tokens: int = 0) -> MemoryBudget:
    return MemoryBudget(engine_bytes, layout.bytes_per_row() * slots, activation_bytes,
                        step_buffer_bytes(slots, vocab_size, max_prefill_tokens, verify_tokens))


def check_memory(budget: MemoryBudget, free_bytes: int, headroom: float = 0.9) -> None:
    """Refuse to start when the budget does not fit the GPU's free memory (keeping 10% for CUDA itself)."""
    if budget.total > free_bytes * headroom:
        raise MemoryError(f"the engine needs {budget.summary()} but the GPU has {free_bytes / (1 << 20):.0f} MiB free; "
                          f"lower engine.slots or rebuild with a shorter --context-length")


def tensorrt_version_key(version: str) -> tuple[int, int, int, int]:
    """(major, minor, patch, build) of a TensorRT version string; missing parts count as 0."""
    parts = []
    for p in version.split(".")[:4]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (4 - len(parts)))  # type: ignore[return-value]


def check_engine_compatible(engine: dict[str, Any], tensorrt_version: str, gpu_name: str,
                            compute_capability: tuple[int, int], slots: int) -> None:
    """Refuse an engine built by another TensorRT, for another GPU, or for fewer slots than configured."""
    built = engine.get("tensorrt_version", "?")
    # The standard (non-lean) runtime loads only engines of its own major.minor.patch.build.
    if tensorrt_version_key(built) != tensorrt_version_key(tensorrt_version):
        raise EngineMismatch(f"the engine was built with TensorRT {built}, this machine runs TensorRT {tensorrt_version}; "
                             f"engines are not portable: compile the bundle again here (edgellm compile BUNDLE --force)")
    gpu = engine.get("gpu", {})
    cc = format_cc(compute_capability)
    if gpu.get("compute_capability") != cc or gpu.get("name") != gpu_name:
        raise EngineMismatch(f"the engine was built for {gpu.get('name', '?')} (compute capability "
                             f"{gpu.get('compute_capability', '?')}), this GPU is {gpu_name} ({cc}); engines are not "
                             f"portable: compile the bundle again here (edgellm compile BUNDLE --force)")
    if slots > engine.get("slots", 0):
        raise EngineMismatch(f"engine.slots is {slots} but the engine was compiled for at most {engine.get('slots')}; "
                             f"lower engine.slots or compile again with --slots {slots}")
    compiled = engine.get("decode_batch_sizes", [])  # the manifest's name for the engine's decode buckets
    if not set(decode_buckets(slots)) <= set(compiled):
        usable = [s for s in range(1, engine.get("slots", 0) + 1) if set(decode_buckets(s)) <= set(compiled)]
        raise EngineMismatch(f"engine.slots {slots} decodes batches of {decode_buckets(slots)} rows, the engine has "
                             f"profiles for {compiled}; set engine.slots to one of {usable} or compile again with --slots {slots}")


def fill_decode_inputs(positions: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray,
                       scratch_position: int) -> None:
    """A decode step's row positions (-1: idle row) -> the graph's position_ids [rows, 1] and write_indices
    [rows], in place. An idle row sits at position 0 (so it widens nothing) and writes to the scratch
    position, the cache's last, which no query ever reads."""
    np.maximum(positions, 0, out=position_ids[:, 0])
    np.copyto(write_indices, positions)
    np.putmask(write_indices, positions < 0, scratch_position)


# ---- addresses the backend binds ------------------------------------------------------------------------
def aligned_max_seq(max_seq: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """The smallest max_seq >= max_seq whose cache row (num_kv_heads * max_seq * head_dim * itemsize bytes)
    is a multiple of 256 bytes, so that every slot's row of a cache tensor is a bindable address."""
    per_position = num_kv_heads * head_dim * itemsize
    return align_up(max_seq, ADDRESS_ALIGNMENT // math.gcd(ADDRESS_ALIGNMENT, per_position))


def check_kv_rows_aligned(layout: KvCacheLayout) -> None:
    """Refuse a cache whose rows would bind misaligned addresses (a bundle built before rows were aligned)."""
    row = layout.tensor_row_bytes()
    if row % ADDRESS_ALIGNMENT:
        want = aligned_max_seq(layout.max_seq, layout.num_kv_heads, layout.head_dim, layout.itemsize)
        raise EngineRefused(f"a KV-cache row is {row} bytes ({layout.num_kv_heads} kv heads x max_seq "
                            f"{layout.max_seq} x head_dim {layout.head_dim} x {layout.itemsize} bytes), not a multiple "
                            f"of {ADDRESS_ALIGNMENT}: odd slots would bind misaligned addresses; rebuild the bundle "
                            f"with this edgellm (it rounds max_seq up to {want})")


class BindingError(EngineMismatch):
    """TensorRT refused a tensor shape or address; the message names the tensor."""


def check_aligned(name: str, address: int) -> None:
    if address % ADDRESS_ALIGNMENT:
        raise BindingError(f"address 0x{address:x} of tensor {name!r} is not {ADDRESS_ALIGNMENT}-byte aligned")


def check_set_input_shape(ok: bool, name: str, shape: Shape, profile: int) -> None:
    """IExecutionContext.set_input_shape's result: False for an unknown name or a shape outside the profile."""
    if not ok:
        raise BindingError(f"TensorRT refused shape {tuple(shape)} for input {name!r} (optimization profile {profile}): "
                           f"not an input of this engine, or outside the profile's min..max; compile the bundle again")


def check_set_tensor_address(ok: bool, name: str, address: int) -> None:
    """IExecutionContext.set_tensor_address's result: False for an unknown name or a misaligned address."""
    if not ok:
        raise BindingError(f"TensorRT refused address 0x{address:x} for tensor {name!r}: not a tensor of this engine "
                           f"(or a misaligned address)")


def kv_cache_pairs(num_layers: int) -> dict[str, str]:
    """present_* output -> the past_* input it must be updated in place through."""
    return {f"present_{kind}.{i}": f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")}


def check_kv_aliases(aliased: dict[str, str | None], num_layers: int) -> dict[str, str]:
    """Require each present_* output to be aliased to its past_* input; returns present -> past.

    aliased: output name -> what ICudaEngine.get_aliased_input_tensor(output) answered (None or "" when not
    aliased; a name missing from the dict: the engine has no such output). Only TensorRT's KV-cache update
    layer may share its input's address; binding one buffer to both tensors otherwise is undefined."""
    pairs = kv_cache_pairs(num_layers)
    for present, past in pairs.items():
        if present not in aliased:
            raise EngineRefused(f"the engine has no output {present}: not an edgellm TensorRT graph")
        got = aliased[present]
        if not got:
            raise EngineRefused(f"the engine does not alias output {present} to input {past} (get_aliased_input_tensor "
                                f"returned {got!r}): TensorRT did not map TensorScatter to its in-place KV-cache update "
                                f"layer; compile with TensorRT >= 10.15 from a bundle built by this edgellm")
        if got != past:
            raise EngineRefused(f"the engine aliases output {present} to {got}, expected {past}")
    return pairs


# ---- what the engine inspector says about layer precisions ------------------------------------------------
# IEngineInspector.get_engine_information(LayerInformationFormat.JSON) with ProfilingVerbosity.DETAILED:
# {"Layers": [{"Name", "LayerType", "Inputs": [{"Name", "Dimensions", "Format/Datatype"}], "Outputs": [...],
#  "Metadata": "[ONNX Layer: ...]", ...}], "Bindings": [...]}. A layer fused from several ONNX nodes names them
# all (in its Name joined by " + ", or in Metadata).
_QUANTIZED_FORMATS = ("int8", "fp8", "e4m3")


def inspector_layers(info_json: str) -> list[dict[str, Any]]:
    """The layer records of an engine inspector's JSON (a layer without detail is {"Name": ...})."""
    data = json.loads(info_json)
    layers = data.get("Layers", []) if isinstance(data, dict) else []
    return [layer if isinstance(layer, dict) else {"Name": str(layer)} for layer in layers]


def layer_precisions(layer: dict[str, Any]) -> list[str]:
    """The distinct Format/Datatype strings of a layer's inputs (what its kernel reads)."""
    return list(dict.fromkeys(str(t.get("Format/Datatype", "?")) for t in layer.get("Inputs", []) if isinstance(t, dict)))


def precision_summary(layers: list[dict[str, Any]]) -> dict[str, int]:
    """How many layers read each input datatype (Int8, FP8, Half, Float, ...): the compile/validate dump."""
    counts: dict[str, int] = {}
    for layer in layers:
        kinds = {_datatype(f) for f in layer_precisions(layer)} or {"no detail"}
        for kind in kinds:
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def _datatype(fmt: str) -> str:
    low = fmt.lower()
    for key, name in (("int8", "Int8"), ("fp8", "FP8"), ("e4m3", "FP8"), ("bf16", "BF16"), ("half", "FP16"),
                      ("fp16", "FP16"), ("int64", "Int64"), ("int32", "Int32"), ("bool", "Bool"), ("float", "FP32"),
                      ("fp32", "FP32"), ("n/a", "N/A")):
        if key in low:
            return name
    return fmt or "?"


def _mentions(layer: dict[str, Any], node: str) -> bool:
    text = f"{layer.get('Name', '')}\n{layer.get('Metadata', '')}"
    return re.search(rf"(?<![\w.]){re.escape(node)}(?![\w.])", text) is not None


def unfused_quantized_gemms(layers: list[dict[str, Any]], gemm_nodes: list[str]) -> list[str]:
    """Warnings for quantized GEMMs (ONNX MatMul nodes behind Q/DQ) that run in a float type: no layer that
    names the node reads an Int8/FP8 input, so TensorRT dequantized the weights and fell back to fp16."""
    if not gemm_nodes:
        return []
    if not any(layer.get("Inputs") for layer in layers):
        return ["the engine holds no per-layer detail (built without ProfilingVerbosity.DETAILED): "
                "compile again (edgellm compile --force) to check that quantized GEMMs fused"]
    warnings = []
    for node in gemm_nodes:
        found = [layer for layer in layers if _mentions(layer, node)]
        if not found:
            continue  # fused beyond recognition into a larger kernel: nothing to say
        formats = [f.lower() for layer in found for f in layer_precisions(layer)]
        if any(q in f for f in formats for q in _QUANTIZED_FORMATS):
            continue
        if formats and all(f.startswith("n/a") for f in formats):
            continue  # shapes unresolved (no execution context given to the inspector)
        warnings.append(f"quantized GEMM {node} did not fuse: its layer {found[0].get('Name', '?')!r} "
                        f"({found[0].get('LayerType', '?')}) reads {', '.join(dict.fromkeys(formats)) or 'no typed input'}")
    return warnings
