"""Weight-only quantization of the linear layers for the CPU target: MatMul -> MatMulNBits (int8 or int4).

ONNX Runtime's `MatMulNBits` (com.microsoft domain, CPU target only: the TensorRT target keeps standard
ops) stores each weight matrix in blocks of input rows with one fp32 scale per block (symmetric, no zero
point: the layout of llama.cpp's Q8_0/Q4_0). 8-bit blocks are 64 rows: 8.5 bits per weight, exactly Q8_0's
(32 rows with an fp16 scale), faster than 32-row blocks at the same accuracy. 4-bit blocks stay at 32 rows
(5 bits per weight, Q4_0 has 4.5): 64 rows cost too much accuracy. docs/benchmarks.md ("CPU precisions") has
the measurements behind each choice. Activations stay fp32 at the graph's edges; inside the kernel, accuracy
level 4 quantizes each activation row to int8 on the fly so that the dot products run as int8 (the same trade
llama.cpp makes), which on a bandwidth-bound CPU is what makes the smaller weights pay.

The quantizing itself is onnxruntime's `MatMulNBitsQuantizer` (round to nearest). The vocabulary
projection is a Gemm against the tied [vocab, hidden] embedding; it is the largest single matrix of a
small model, so it gets its own transposed [hidden, vocab] copy as a MatMul and is quantized too (at 8 bits
even at int4: LM_HEAD_FORMAT), while the embedding lookup (a Gather, reading only the rows of the input tokens) keeps the fp32 table.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from build_engine.model_spec import ModelSpec

log = logging.getLogger("edgellm.build")

BITS = {"int8": 8, "int4": 4}
BLOCK_SIZES = {8: 64, 4: 32}  # bits -> rows of the input dimension per scale
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


def quantize_weights(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """The graph with every weight MatMul (lm_head included) as MatMulNBits; `model` must hold its weights."""
    if precision not in BITS:
        raise ValueError(f"weight-only quantization is {', '.join(BITS)}, not {precision!r}")
    _untie_lm_head(model)
    bits, head = BITS[precision], LM_HEAD_FORMAT[precision]
    model = _quantize(model, bits, BLOCK_SIZES[bits], nodes_to_exclude=[LM_HEAD_NODE])
    model = _quantize(model, *head, nodes_to_include=[LM_HEAD_NODE])
    count = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    log.info("quantized %d linear layers to %s (blocks of %d; vocabulary projection %d-bit in blocks of %d)", count,
             precision, BLOCK_SIZES[bits], *head)
    return model


def prepare_cpu_graph(spec: ModelSpec, weights: dict[str, np.ndarray], tok_json: str, precision: str,
                      max_seq: int) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The CPU graph for int8/int4 (weight-only MatMulNBits) and its manifest entries, accuracy included.

    Raises AccuracyError when the graph loses more than THRESHOLDS[precision] allows against fp32."""
    from build_engine.accuracy import accuracy_record, default_text, measure_accuracy, token_ids
    from build_engine.cpu_graph import build_cpu_graph
    from build_engine.graph_builder import save_graph

    heldout = token_ids(tok_json, default_text("heldout"))[:max_seq - 1]
    with tempfile.TemporaryDirectory(prefix="edgellm-acc-") as tmp:
        ref, cand = Path(tmp) / "reference.onnx", Path(tmp) / "candidate.onnx"
        graph = build_cpu_graph(spec, weights, max_seq=max_seq)
        save_graph(graph, ref)  # before quantize_weights, which changes the graph in place
        graph = quantize_weights(graph, precision)
        save_graph(graph, cand)
        report = measure_accuracy(ref, cand, heldout)
    manifest = {
        "quantization": {"method": f"weight-only {precision} (ONNX Runtime MatMulNBits, symmetric round-to-nearest, "
                                   f"blocks of {BLOCK_SIZES[BITS[precision]]} input rows, accuracy level {ACCURACY_LEVEL})",
                         "quantized": "every linear layer; the vocabulary projection at {} bits in blocks of {}".format(
                             *LM_HEAD_FORMAT[precision]),
                         "not_quantized": "embedding lookup, norms, attention, KV cache (fp32)"},
        "accuracy": accuracy_record(report, precision),  # raises AccuracyError past the thresholds
    }
    return graph, manifest
