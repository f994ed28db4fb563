"""Explicit INT8 / FP8 (E4M3) quantization for the TensorRT target: our own Q/DQ insertion, no ModelOpt.

Placement (what TensorRT fuses into quantized GEMMs):
  weights of every decoder linear layer (q/k/v/o, gate/up/down projections) are stored quantized
  (int8 or float8e4m3fn initializers) with per-output-channel symmetric scales, behind a
  DequantizeLinear; each distinct input activation of those layers gets one per-tensor
  QuantizeLinear -> DequantizeLinear pair whose scale comes from calibration on real text.
Not quantized: the embedding and vocabulary projection (tied to the embedding in many models and the
most sensitive layer), norms, attention and the KV cache (which stays in the graph's float type).

The same function quantizes the float32 graph that ONNX Runtime measures on the CPU (its CPU
provider runs both INT8 and FP8 Q/DQ, so FP8 is measured with real E4M3 rounding, not an imitation)
and the float16 graph that TensorRT compiles, with the same calibrated scales.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from build_engine.graph_session import open_session, prefill_feeds
from build_engine.graph_builder import save_graph

QUANT_PRECISIONS = ("int8", "fp8")
# Largest representable magnitude: int8 symmetric range, float8 E4M3 (fn: finite, no infinities).
_QMAX = {"int8": 127.0, "fp8": 448.0}
_QTYPE = {"int8": (TensorProto.INT8, np.int8), "fp8": (TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn)}
_FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16}
CALIBRATION_WINDOW = 512  # tokens per calibration prefill


def linear_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The decoder's linear layers: MatMul nodes whose weight is a `.weight.T` initializer."""
    weights = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in weights and n.input[1].endswith(".weight.T")]


def linear_inputs(model: onnx.ModelProto) -> list[str]:
    """Distinct activation tensors that feed linear layers (q/k/v share one, gate/up share one)."""
    return list(dict.fromkeys(n.input[0] for n in linear_nodes(model)))


def _run_prefills(graph: Path, outputs: list[str], token_ids: list[int], window: int) -> list[list[np.ndarray]]:
    sess = open_session(graph)
    results = []
    for start in range(0, len(token_ids), window):
        chunk = token_ids[start:start + window]
        feeds = prefill_feeds(sess, chunk, [len(chunk) - 1])
        results.append(sess.run(outputs, feeds))
    return results


def calibrate(model: onnx.ModelProto, token_ids: list[int], max_seq: int,
              window: int = CALIBRATION_WINDOW, per_channel: bool = False) -> dict[str, np.ndarray]:
    """Largest |value| of every linear layer's input over prefills of token_ids (float32 graph only):
    a scalar per tensor, or one per channel (last axis) with per_channel.

    Each window starts from an empty cache at position 0, so every window looks like a prompt."""
    if model.graph.input[-1].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError("calibrate the float32 graph")
    if not token_ids:
        raise ValueError("the calibration text is empty")
    names = linear_inputs(model)
    extra = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    model.graph.output.extend(extra)  # temporarily: saving a copy would copy every weight
    try:
        with tempfile.TemporaryDirectory(prefix="edgellm-calib-") as tmp:
            path = Path(tmp) / "calib.onnx"
            save_graph(model, path)
            runs = _run_prefills(path, names, token_ids, min(window, max_seq))
    finally:
        del model.graph.output[-len(extra):]
    def amax(a: np.ndarray) -> np.ndarray:
        a = np.abs(a)
        return a.reshape(-1, a.shape[-1]).max(axis=0) if per_channel else a.max()

    return {name: np.max([amax(run[i]) for run in runs], axis=0) for i, name in enumerate(names)}


def smooth_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray], channel_amax: dict[str, np.ndarray],
                   alpha: float = 0.5) -> int:
    """SmoothQuant: move activation outliers into the weights, exactly (the graph's function is unchanged).

    For an input X feeding linear layers W (HF [out, in]), per input channel j:
    s_j = max|X_j|^alpha / max|W_.j|^(1-alpha); X_j is divided by s_j where X is made (the RMSNorm weight
    before q/k/v and gate/up, the up projection's rows before down) and W_.j multiplied by it. Inputs made
    elsewhere (o_proj's, out of attention) are left alone. Updates `weights` (by HF name); returns how
    many inputs were smoothed. Per-tensor INT8 activations need this: a few channels of an LLM's
    activations are 100x the rest."""
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in linear_nodes(model):
        consumers.setdefault(node.input[0], []).append(node.input[1].removesuffix(".T"))  # HF weight name
    linear_out = {node.output[0]: node.input[1].removesuffix(".T") for node in linear_nodes(model)}
    smoothed = 0
    for x, users in consumers.items():
        prod = producers.get(x)
        if prod is None:
            continue
        if prod.op_type == "RMSNormalization" and prod.input[1] in weights:
            source, source_axis = prod.input[1], None  # the norm's weight [in]
        elif prod.op_type == "Mul" and any(i in linear_out for i in prod.input):
            source, source_axis = linear_out[next(i for i in prod.input if i in linear_out)], 0  # up_proj rows
        else:
            continue
        w_amax = np.max([np.abs(np.asarray(weights[u], np.float32)).max(axis=0) for u in users], axis=0)
        a = np.asarray(channel_amax[x], np.float64)
        s = np.where((a > 0) & (w_amax > 0), a ** alpha / np.maximum(w_amax, 1e-8) ** (1 - alpha), 1.0)
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        for u in users:
            weights[u] = np.asarray(weights[u], np.float32) * s[None, :]
        src = np.asarray(weights[source], np.float32)
        weights[source] = src / s if source_axis is None else src / s[:, None]
        smoothed += 1
    return smoothed


def engine_scales(scale: np.ndarray | float, scale_dtype: type) -> np.ndarray:
    """Scales as the engine will hold them: in scale_dtype, clamped to its smallest positive normal value (and
    its largest), returned as float32. TensorRT's quantize layer needs strictly positive scales, and an fp16
    scale of a tiny range (after SmoothQuant) would otherwise round to a subnormal or to zero."""
    info = ml_dtypes.finfo(scale_dtype)
    clamped = np.clip(np.asarray(scale, np.float64), float(info.smallest_normal), float(info.max))
    return clamped.astype(scale_dtype).astype(np.float32)


def quantize_weight(w: np.ndarray, precision: str, scale_dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """[in, out] float weights -> (quantized [in, out], per-output-channel scales [out] as float32).

    The scales are those the engine holds (engine_scales in scale_dtype), and the weights are quantized
    with exactly those, so dequantizing in the engine gives back what was measured."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=0)
    scale = engine_scales(np.where(amax > 0, amax / _QMAX[precision], 1.0), scale_dtype)
    qmax = _QMAX[precision]
    scaled = np.clip(w / scale, -qmax, qmax)  # a scale rounded down may push a value just past the range
    if precision == "int8":
        return np.rint(scaled).astype(np.int8), scale
    return scaled.astype(ml_dtypes.float8_e4m3fn), scale  # |scaled| <= 448: round to nearest, no overflow


def _tensor(name: str, array: np.ndarray, data_type: int) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=data_type, dims=array.shape)
    t.raw_data = np.ascontiguousarray(array).tobytes()
    return t


def quantize_graph(model: onnx.ModelProto, precision: str, activation_amax: dict[str, np.ndarray],
                   scale_dtype: type | None = None) -> onnx.ModelProto:
    """Insert Q/DQ on every linear layer's weights and inputs, in place; returns model.

    Works on a graph of any float type (scales take the graph's type, as DequantizeLinear's output must).
    scale_dtype (default: the graph's type) is the type the engine's scales will have: the float32 graph
    the build measures gets the fp16 engine's scales, rounded and clamped the same way."""
    if precision not in QUANT_PRECISIONS:
        raise ValueError(f"precision {precision!r} not in {QUANT_PRECISIONS}")
    g = model.graph
    nodes = linear_nodes(model)
    missing = [n for n in dict.fromkeys(n.input[0] for n in nodes) if n not in activation_amax]
    if missing:
        raise ValueError(f"no calibrated range for {', '.join(missing[:3])}")
    qtype, qnp = _QTYPE[precision]
    inits = {t.name: t for t in g.initializer}
    float_type = inits[nodes[0].input[1]].data_type
    fnp = _FLOAT_TYPES[float_type]
    sdt = scale_dtype or fnp
    zero = f"q.{precision}.zero"
    g.initializer.append(_tensor(zero, np.zeros((), qnp), qtype))
    new_nodes: dict[str, list[onnx.NodeProto]] = {}  # node name -> Q/DQ nodes to put before it
    act_dq: dict[str, str] = {}
    for node in nodes:
        # Weight: quantized initializer -> DequantizeLinear (per output channel: axis 1 of [in, out]).
        w = inits[node.input[1]]
        array = np.frombuffer(w.raw_data, fnp).reshape(tuple(w.dims))
        wq, scale = quantize_weight(array, precision, sdt)
        qname, sname, dqname = w.name + ".q", w.name + ".scale", w.name + ".dq"
        w.CopyFrom(_tensor(qname, wq, qtype))
        g.initializer.append(_tensor(sname, scale.astype(fnp), float_type))
        # No zero point: per-axis DQ would need one per channel, and symmetric means zero anyway.
        before = [helper.make_node("DequantizeLinear", [qname, sname], [dqname], name=dqname, axis=1)]
        # Activation: one shared per-tensor Q/DQ pair per distinct input.
        x = node.input[0]
        if x not in act_dq:
            amax = float(activation_amax[x])
            sx = f"{x}.act_scale"
            scale_x = engine_scales(amax / _QMAX[precision] if amax > 0 else 1.0, sdt)
            g.initializer.append(_tensor(sx, scale_x.astype(fnp), float_type))
            act_dq[x] = f"{x}.dq"
            before += [helper.make_node("QuantizeLinear", [x, sx, zero], [f"{x}.q"], name=f"{x}.q"),
                       helper.make_node("DequantizeLinear", [f"{x}.q", sx, zero], [act_dq[x]], name=act_dq[x])]
        new_nodes[node.name] = before
        node.input[0], node.input[1] = act_dq[x], dqname
    # Keep the node list topologically sorted: each Q/DQ goes right before its first consumer.
    ordered = []
    for node in g.node:
        ordered.extend(new_nodes.get(node.name, ()))
        ordered.append(node)
    del g.node[:]
    g.node.extend(ordered)
    return model


def float32_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float32 (float16/bfloat16 initializers, inputs, outputs and casts widened), in place.

    Quantized weights and zero points keep their types, so Q/DQ rounding is unchanged; this is how
    `edgellm validate` gets a CPU reference for a TensorRT bundle's graph."""
    g = model.graph
    for t in g.initializer:
        if t.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            if t.data_location == TensorProto.EXTERNAL:
                raise ValueError("load the graph's external data first")
            array = np.frombuffer(t.raw_data, _FLOAT_TYPES[t.data_type]).astype(np.float32) if t.raw_data else \
                onnx.numpy_helper.to_array(t).astype(np.float32)
            t.CopyFrom(_tensor(t.name, array.reshape(tuple(t.dims)), TensorProto.FLOAT))
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
                a.i = TensorProto.FLOAT
    return model


SMOOTHING_ALPHA = {"int8": 0.75}  # per precision; FP8's range keeps outliers without smoothing


def quantize_for_target(spec, weights: dict[str, np.ndarray], precision: str, max_seq: int,
                        calibration_ids: list[int], heldout_ids: list[int], scale_dtype: type = np.float16):
    """Calibrate, smooth (INT8) and measure on the CPU: (weights to build the target graph from, activation
    ranges for quantize_graph, AccuracyReport of the quantized float32 graph against the float32 graph).

    The measured graph carries the scales the engine will get (scale_dtype: the target graph's type)."""
    from build_engine.accuracy import measure_accuracy
    from build_engine.trt_graph import build_graph

    with tempfile.TemporaryDirectory(prefix="edgellm-quant-") as tmp:
        ref_path, cand_path = Path(tmp) / "reference.onnx", Path(tmp) / "candidate.onnx"
        graph = build_graph(spec, weights, max_seq=max_seq)
        save_graph(graph, ref_path)
        if precision in SMOOTHING_ALPHA:
            channel_amax = calibrate(graph, calibration_ids, max_seq, per_channel=True)
            weights = dict(weights)  # the caller's dict stays the checkpoint's
            smooth_weights(graph, weights, channel_amax, SMOOTHING_ALPHA[precision])
            graph = build_graph(spec, weights, max_seq=max_seq)
        amax = calibrate(graph, calibration_ids, max_seq)
        save_graph(quantize_graph(graph, precision, amax, scale_dtype), cand_path)
        del graph
        report = measure_accuracy(ref_path, cand_path, heldout_ids[:max_seq - 1])
    return weights, amax, report
