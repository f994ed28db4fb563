"""What both decoder graphs are built from: the weights they expect, RoPE tables, the node writer, the logits
head, the KV-cache inputs and outputs, and saving a graph with its weights in one data file beside it.

The TensorRT graph (trt_graph.py) and the CPU graph (cpu_graph.py) share these, so both read the same
Hugging Face-named weights and expose the same `logits` and `past_*`/`present_*` tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import TensorProto, helper

from build_engine.model_spec import CheckpointError, ModelSpec

OPSET = 24
DTYPES = {
    "float32": (TensorProto.FLOAT, np.float32),
    "float16": (TensorProto.FLOAT16, np.float16),
    "bfloat16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16),
}
# Initializers at least this big go to the external data file; shape constants stay inline.
_EXTERNAL_MIN_BYTES = 1024
_ALIGN = 4096  # align tensors in the data file so they can be memory-mapped


def expected_weights(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor the graph needs, by Hugging Face name, with its Hugging Face shape ([out, in] for linear)."""
    h, d, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    out = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if spec.attention_bias:
            out |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,)}
            if has_o_bias(spec):
                out[p + "self_attn.o_proj.bias"] = (h,)
        if spec.qk_norm:
            out |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    return out


def check_weights(spec: ModelSpec, weights: dict[str, np.ndarray]) -> None:
    """Raise CheckpointError naming missing or mis-shaped tensors."""
    expected = expected_weights(spec)
    missing = [n for n in expected if n not in weights]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{spec.hf_architecture} checkpoint lacks tensors: {', '.join(missing[:5])}{more}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(weights[name].shape)}, expected {shape}")


def has_o_bias(spec: ModelSpec) -> bool:
    # Llama/Qwen3 `attention_bias` covers o_proj too; Qwen2's fixed biases are on q/k/v only.
    return spec.attention_bias and spec.architecture != "qwen2"


def rope_inv_freq(spec: ModelSpec) -> np.ndarray:
    """RoPE inverse frequencies [head_dim/2] with transformers' default/linear/llama3 scaling, as float32."""
    d = spec.head_dim
    inv = 1.0 / spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    scaling = spec.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)  # long wavelengths: interpolate fully
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = np.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"unsupported rope type {kind!r}")
    return inv.astype(np.float32)


def rope_cache(spec: ModelSpec, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin caches [max_seq, head_dim/2] (float64) for positions 0..max_seq-1."""
    # The angle is rounded like transformers does it (float32 position * float32 inv_freq), so long
    # contexts see the same rotation the model saw in training rather than an idealised one.
    angles = np.arange(max_seq, dtype=np.float32)[:, None] * rope_inv_freq(spec)[None, :]
    angles = angles.astype(np.float64)
    return np.cos(angles), np.sin(angles)


class GraphBuilder:
    """Writes nodes and initializers straight into one ModelProto; every op has one output, named after it."""

    def __init__(self, onnx_dtype: int, np_dtype: type) -> None:
        # Initializers go directly into the final proto: make_graph/make_model would copy every weight
        # twice more, which for a multi-GB checkpoint costs both time and peak memory.
        self.model = onnx.ModelProto()
        self.graph = self.model.graph
        self.onnx_dtype, self.np_dtype = onnx_dtype, np_dtype
        self.names: set[str] = set()

    def _init(self, name: str, array: np.ndarray, data_type: int) -> str:
        if name not in self.names:
            self.names.add(name)
            t = self.graph.initializer.add()
            t.name, t.data_type = name, data_type
            t.dims.extend(array.shape)
            t.raw_data = array.tobytes()  # C order, little-endian like every machine we build on
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        # One pass converts dtype and makes a transposed view contiguous.
        return self._init(name, np.asarray(array, dtype=self.np_dtype, order="C"), self.onnx_dtype)

    def ints(self, name: str, values: list[int] | int) -> str:
        """An int64 initializer: a 1-D tensor for a list, a scalar for an int."""
        return self._init(name, np.array(values, dtype=np.int64), TensorProto.INT64)

    def int32(self, name: str, value: int) -> str:
        """An int32 scalar initializer."""
        return self._init(name, np.array(value, dtype=np.int32), TensorProto.INT32)

    def op(self, op_type: str, inputs: list[str], out: str, **attrs) -> str:
        self.graph.node.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def logits_output(g: GraphBuilder, spec: ModelSpec, hidden: str, head: str, final_norm: Callable[[str], str]) -> None:
    """The `logits` output, float32 [batch, n_logits, vocab]: the rows of `hidden` at logits_indices, normalized
    by final_norm, times the [vocab, hidden] matrix `head`."""
    # Gather the requested rows before the final norm (RMSNorm is per row, so this is the same result
    # and prefill normalizes only the rows that get logits).
    h = spec.hidden_size
    idx = g.op("Unsqueeze", ["logits_indices", g.ints("axes.last", [-1])], "logits.idx")  # [batch, n, 1]
    idx_shape = g.op("Shape", ["logits_indices"], "logits.idx_shape")
    idx = g.op("Expand", [idx, g.op("Concat", [idx_shape, g.ints("shape.hidden", [h])], "logits.gather_shape", axis=0)],
               "logits.idx_expanded")
    x = final_norm(g.op("GatherElements", [hidden, idx], "logits.hidden", axis=1))
    # Gemm against the [vocab, hidden] matrix (transB) so tied models store the embedding once.
    x = g.op("Reshape", [x, g.ints("shape.rows", [-1, h])], "logits.rows")
    x = g.op("Gemm", [x, head], "logits.gemm", transB=1)
    if g.onnx_dtype != TensorProto.FLOAT:
        x = g.op("Cast", [x], "logits.float", to=TensorProto.FLOAT)
    out_shape = g.op("Concat", [idx_shape, g.ints("shape.vocab", [spec.vocab_size])], "logits.shape", axis=0)
    g.op("Reshape", [x, out_shape], "logits")


def finish_graph(g: GraphBuilder, spec: ModelSpec, max_seq: int, step_inputs: list[onnx.ValueInfoProto], name: str,
                 extra_opsets: tuple[str, ...] = (), logits_batch: str | int = "batch") -> onnx.ModelProto:
    """Declare the step inputs, the KV cache inputs and outputs and `logits` ([logits_batch, n_logits, vocab]);
    set the opsets. Returns the model."""
    cache_shape = ["batch", spec.num_kv_heads, max_seq, spec.head_dim]
    inputs = list(step_inputs)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [logits_batch, "n_logits", spec.vocab_size])]
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", g.onnx_dtype, cache_shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", g.onnx_dtype, cache_shape))
    g.graph.name = name
    g.graph.input.extend(inputs)
    g.graph.output.extend(outputs)
    standard = helper.make_opsetid("", OPSET)
    g.model.opset_import.extend([standard, *(helper.make_opsetid(domain, 1) for domain in extra_opsets)])
    g.model.ir_version = helper.find_min_ir_version_for([standard])
    g.model.producer_name = "edgellm"
    return g.model


def save_graph(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write path, with every large initializer in one `<file name>.data` beside it; return both paths.

    The model in memory is not modified. Only raw_data tensors move to the data file."""
    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    # A skeleton without initializers, so no weight is copied; the weights are streamed to the data file.
    skeleton = onnx.ModelProto()
    _copy_fields(skeleton, model, skip="graph")
    _copy_fields(skeleton.graph, model.graph, skip="initializer")
    with open(data_path, "wb") as f:
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                raise ValueError(f"initializer {t.name} is stored externally; load the model's data first")
            raw = t.raw_data  # each access copies the bytes, so take them once
            if len(raw) < _EXTERNAL_MIN_BYTES:
                skeleton.graph.initializer.add().CopyFrom(t)
                continue
            f.write(b"\0" * (-f.tell() % _ALIGN))
            ref = skeleton.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_path.name), ("offset", f.tell()), ("length", len(raw))):
                ref.external_data.add(key=key, value=str(value))
            f.write(raw)
    path.write_bytes(skeleton.SerializeToString())
    return [path, data_path]


def _copy_fields(dst: Message, src: Message, skip: str) -> None:
    """Copy every set field of src but `skip` into dst."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, Message):
            getattr(dst, field.name).CopyFrom(value)
        elif isinstance(value, (str, bytes, int, float, bool)):
            setattr(dst, field.name, value)
        else:  # repeated field
            getattr(dst, field.name).extend(value)
