"""Weight-only quantization of the linear layers for the CPU target: MatMul -> MatMulNBits (int8 or int4).

ONNX Runtime's `MatMulNBits` (com.microsoft domain, CPU target only: the TensorRT target keeps standard
ops) stores each weight matrix in blocks of input rows with one scale per block (symmetric, no zero point: the
layout of llama.cpp's Q8_0/Q4_0). For fp32 activations ONNX Runtime takes only fp32 scales (the scales' type is the
activations'), so the bits per weight are set by the block: 64 rows, 8.5 bits per weight at int8 and 4.5 at int4,
exactly what Q8_0 and Q4_0 stream (32 rows with an fp16 scale). Activations stay fp32 at the graph's edges; inside
the kernel, accuracy level 4 quantizes each activation row to int8 on the fly so that the dot products run as int8
(the same trade llama.cpp makes), which on a bandwidth-bound CPU is what makes the smaller weights pay.

8-bit weights are quantized by onnxruntime's `MatMulNBitsQuantizer` (round to nearest). 4-bit weights, where a
64-row block rounded that way loses too much, are quantized here: each block's scale is searched for the least
error weighted by the input channels' activation sizes on calibration text (int4_scales); the accuracy check on
held-out text then decides, as for every precision. docs/int4-and-comparisons.md has the measurements.
The vocabulary projection is a Gemm against the tied [vocab, hidden] embedding; it is the largest single matrix of a
small model, so it gets its own transposed [hidden, vocab] copy as a MatMul and is quantized too (at 8 bits
even at int4: LM_HEAD_FORMAT), while the embedding lookup (a Gather, reading only the rows of the input tokens) keeps
the fp32 table.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from build_engine.model_spec import ModelSpec

log = logging.getLogger("edgellm.build")

BITS = {"int8": 8, "int4": 4}
# bits -> rows of the input dimension per fp32 scale: 8.5 and 4.5 bits per weight, llama.cpp's Q8_0 and Q4_0.
BLOCK_SIZES = {8: 64, 4: 64}
# The vocabulary projection (bits, rows per block): 8.5 bits per weight at int4 too, as llama.cpp's Q4_0 files
# keep a tied output matrix at Q8_0: at 4 bits it alone costs most of the int4 loss (docs/benchmarks.md).
LM_HEAD_FORMAT = {"int8": (8, 64), "int4": (8, 64)}
LM_HEAD_NODE = "logits.gemm"
# int8 activations inside the kernel: ONNX Runtime has no fast fp32 path for 8-bit weights on AVX2, so level 1
# (fp32 compute) decodes many times slower (docs/benchmarks.md).
ACCURACY_LEVEL = 4


def _untie_lm_head(model: onnx.ModelProto) -> None:
    """Replace the Gemm(x, W, transB=1) vocabulary projection by MatMul(x, W.T) with its own initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB") != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        name = node.input[1] + ".T"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
        model.graph.node[i].CopyFrom(onnx.helper.make_node("MatMul", [node.input[0], name], list(node.output),
                                                           name=node.name))


def _quantize(model: onnx.ModelProto, bits: int, block: int, **select) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # Its INFO log is a line per graph node ("start to quantize ...", "skip to quantize ..."): noise in a build.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config, **select)
    quantizer.process()
    return quantizer.model.model


# 4-bit scale search: each block's scale starts from its largest weight magnitude divided by one of these (that
# weight then lands on level ±c, clipped to -8..7) and is refit by least squares to the levels it gives; the candidate
# with the least error wins. Errors are weighted by how large each input channel's activations are on calibration
# text (llama.cpp's "importance matrix" idea), so the rows that move the output most are kept best. It costs seconds
# of numpy per 100M weights at build time, nothing at run time.
# Scales stay positive: ONNX Runtime 1.32's one-row int8-activation kernel and its many-row one disagree on negative
# scales (a decode step then differs from a prefill of the same tokens), so Q4_0's trick of a negative scale that puts
# a positive extreme on level -8 is not used.
SCALE_DIVISORS = np.linspace(6.0, 9.0, 16)


def int4_scales(blocks: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """[..., block] float32 weights (importance: [block]-broadcastable error weights) -> [...] positive scales."""
    imp = np.ones(blocks.shape[-1], np.float32) if importance is None else importance
    amax = np.abs(blocks).max(-1)
    amax = np.where(amax == 0, 1.0, amax).astype(np.float32)
    best_scale = amax / 8.0
    best_err = np.full(amax.shape, np.inf, np.float32)
    for c in SCALE_DIVISORS:
        start = amax / c
        q = np.clip(np.rint(blocks / start[..., None]), -8, 7)
        # Least-squares scale for these levels; it stays positive as the levels follow the weights' signs.
        fit = (imp * q * blocks).sum(-1) / np.maximum((imp * q * q).sum(-1), 1e-30)
        scale = np.where(fit > 0, fit, start).astype(np.float32)
        err = (imp * np.square(np.clip(np.rint(blocks / scale[..., None]), -8, 7) * scale[..., None] - blocks)).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
    return best_scale


def int4_blocks(w: np.ndarray, block: int, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] weights (importance: [K], the error weight of each input row) -> MatMulNBits' B (uint8 [N, K/block,
    block/2], low nibble first) and scales (float32 [N * K/block]).

    Symmetric, no zero point: stored level q in 0..15 means (q - 8) * scale. K is padded with zeros to whole blocks."""
    k, n = w.shape
    n_blocks = -(-k // block)
    imp = np.ones(n_blocks * block, np.float32)
    if importance is not None:
        imp[:k] = np.maximum(importance, 1e-12)
    imp = imp.reshape(n_blocks, block)
    packed = np.empty((n, n_blocks, block // 2), np.uint8)
    scales = np.empty((n, n_blocks), np.float32)
    step = max(1, (1 << 22) // (n_blocks * block))  # output columns per chunk: ~16 MB of float32 at a time
    for c0 in range(0, n, step):
        cols = np.zeros((min(step, n - c0), n_blocks * block), np.float32)
        cols[:, :k] = w[:, c0:c0 + step].T
        blocks = cols.reshape(len(cols), n_blocks, block)
        scale = int4_scales(blocks, imp)
        q = (np.clip(np.rint(blocks / scale[..., None]), -8, 7) + 8).astype(np.uint8)
        packed[c0:c0 + len(cols)] = q[..., 0::2] | (q[..., 1::2] << 4)
        scales[c0:c0 + len(cols)] = scale
    return packed, scales.reshape(-1)


def activation_importance(graph_path: Path, model: onnx.ModelProto, ids: list[int],
                          window: int) -> dict[str, np.ndarray]:
    """Mean square of every weight MatMul's input, per channel, over prefills of ids (model: graph_path's graph)."""
    from build_engine.graph_session import open_session, prefill_feeds

    inits = {t.name for t in model.graph.initializer}
    linear = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    names = list(dict.fromkeys(n.input[0] for n in linear))
    probe = onnx.ModelProto()
    probe.CopyFrom(onnx.load(str(graph_path), load_external_data=False))
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    probe_path = graph_path.with_name("importance.onnx")
    onnx.save(probe, str(probe_path))  # same folder: its weights stay in the graph's .data file
    sess = open_session(probe_path)
    sums = {n: 0.0 for n in names}
    count = 0
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        outs = sess.run(names, prefill_feeds(sess, chunk, [len(chunk) - 1]))
        for n, x in zip(names, outs):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            sums[n] = sums[n] + np.square(x).sum(0)
        count += len(chunk)
    return {n: (sums[n] / count).astype(np.float32) for n in names}


def _quantize_int4(model: onnx.ModelProto, block: int, importance: dict[str, np.ndarray] | None = None,
                   skip: str | None = None) -> None:
    """Every MatMul with an initializer weight but the node named `skip` -> 4-bit MatMulNBits, in place."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    replaced = set()
    for i, node in enumerate(g.node):
        if node.op_type != "MatMul" or node.input[1] not in inits or node.name == skip:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        k, n = w.shape
        packed, scales = int4_blocks(w, block, (importance or {}).get(node.input[0]))
        name = node.input[1]
        g.initializer.extend([numpy_helper.from_array(packed, name + ".q4"),
                              numpy_helper.from_array(scales, name + ".q4_scales")])
        g.node[i].CopyFrom(onnx.helper.make_node(
            "MatMulNBits", [node.input[0], name + ".q4", name + ".q4_scales"], list(node.output), name=node.name,
            domain="com.microsoft", K=k, N=n, bits=4, block_size=block, accuracy_level=ACCURACY_LEVEL))
        replaced.add(name)
    kept = [t for t in g.initializer if t.name not in replaced]
    del g.initializer[:]
    g.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def quantize_weights(model: onnx.ModelProto, precision: str,
                     importance: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """The graph with every weight MatMul (lm_head included) as MatMulNBits; `model` must hold its weights.

    importance (int4): activation_importance() of the float32 graph, to weight each 4-bit block's scale search."""
    if precision not in BITS:
        raise ValueError(f"weight-only quantization is {', '.join(BITS)}, not {precision!r}")
    _untie_lm_head(model)
    bits, head = BITS[precision], LM_HEAD_FORMAT[precision]
    if bits == 4:
        _quantize_int4(model, BLOCK_SIZES[4], importance, skip=LM_HEAD_NODE)
    else:
        model = _quantize(model, bits, BLOCK_SIZES[bits], nodes_to_exclude=[LM_HEAD_NODE])
    model = _quantize(model, *head, nodes_to_include=[LM_HEAD_NODE])
    count = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    log.info("quantized %d linear layers to %s (blocks of %d; vocabulary projection %d-bit in blocks of %d)", count,
             precision, BLOCK_SIZES[bits], *head)
    return model


def bits_per_weight(model: onnx.ModelProto) -> dict[str, float]:
    """Bits a decode step reads per weight (levels, scales and zero points) of the linear layers and of the
    vocabulary projection, from the MatMulNBits nodes' own initializers."""
    sizes = {t.name: math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
             for t in model.graph.initializer}
    totals = {"layers": [0, 0], "vocabulary_projection": [0, 0]}  # [bytes, weights]
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        head = LM_HEAD_NODE in (node.name, node.output[0])  # onnxruntime's quantizer renames the node it replaces
        part = totals["vocabulary_projection" if head else "layers"]
        part[0] += sum(sizes.get(name, 0) for name in node.input[1:])
        part[1] += attrs["K"] * attrs["N"]
    return {part: round(8 * b / n, 3) for part, (b, n) in totals.items() if n}


def prepare_cpu_graph(spec: ModelSpec, weights: dict[str, np.ndarray], tok_json: str, precision: str,
                      max_seq: int, kv_cache: str | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The CPU graph for int8/int4 (weight-only MatMulNBits) and its manifest entries, accuracy included.

    kv_cache "int8": the KV cache in 8 bits too (build_engine/kv_quant.py), inside the same accuracy check.
    Raises AccuracyError when the graph loses more than THRESHOLDS[precision] allows against fp32."""
    from build_engine.accuracy import accuracy_record, default_text, measure_accuracy, token_ids
    from build_engine.cpu_graph import build_cpu_graph
    from build_engine.graph_builder import save_graph

    heldout = token_ids(tok_json, default_text("heldout"))[:max_seq - 1]
    with tempfile.TemporaryDirectory(prefix="edgellm-acc-") as tmp:
        ref, cand = Path(tmp) / "reference.onnx", Path(tmp) / "candidate.onnx"
        graph = build_cpu_graph(spec, weights, max_seq=max_seq)
        save_graph(graph, ref)  # before quantize_weights, which changes the graph in place
        importance = None
        calibration = token_ids(tok_json, default_text("calibration"))  # not the held-out text of the check
        if BITS[precision] == 4:
            importance = activation_importance(ref, graph, calibration, max(1, max_seq - 1))
        graph = quantize_weights(graph, precision, importance)
        if kv_cache == "int8":
            from build_engine.kv_quant import kv_cache_scales, quantize_kv_cache

            quantize_kv_cache(graph, kv_cache_scales(ref, calibration, max(1, max_seq - 1)))
        save_graph(graph, cand)
        report = measure_accuracy(ref, cand, heldout)
    block = BLOCK_SIZES[BITS[precision]]
    search = ", scales searched for least activation-weighted error on calibration text" if importance else ""
    manifest = {
        "quantization": {"method": f"weight-only {precision} (ONNX Runtime MatMulNBits, symmetric round-to-nearest, "
                                   f"blocks of {block} input rows with an fp32 scale{search}, accuracy level "
                                   f"{ACCURACY_LEVEL})",
                         "quantized": "every linear layer; the vocabulary projection at {} bits in blocks of {}".format(
                             *LM_HEAD_FORMAT[precision]),
                         "not_quantized": "embedding lookup, norms, attention"
                                          + ("" if kv_cache else ", KV cache (fp32)"),
                         "bits_per_weight": bits_per_weight(graph)},
        "accuracy": accuracy_record(report, precision),  # raises AccuracyError past the thresholds
    }
    if kv_cache:
        manifest["quantization"]["kv_cache"] = ("int8, one fixed scale per KV head and channel (its largest magnitude "
                                                "on calibration text), quantized as written by GroupQueryAttention")
    return graph, manifest
