"""The first stage of a TensorRT build, which runs anywhere: the target graph, quantized, with its accuracy.

The second stage (build_engine/trt_compiler.py) compiles that graph into an engine on the target
device. Accuracy is measured here in ONNX Runtime on the CPU against the float32 graph, on held-out text:
int8/fp8 through a float32 twin carrying the same Q/DQ nodes (ONNX Runtime's CPU provider runs INT8 and
FP8 Q/DQ), fp16 with the float16 graph itself; bf16 is not measured (no bf16 kernels on the CPU).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from build_engine.accuracy import AccuracyReport, accuracy_record, default_text, measure_accuracy, token_ids
from build_engine.model_spec import ModelSpec

log = logging.getLogger("edgellm.build")


def _measure_float(spec: ModelSpec, weights: dict[str, np.ndarray], graph: onnx.ModelProto, max_seq: int,
                   heldout: list[int]) -> AccuracyReport:
    from build_engine.graph_builder import save_graph
    from build_engine.trt_graph import build_graph

    with tempfile.TemporaryDirectory(prefix="edgellm-acc-") as tmp:
        ref, cand = Path(tmp) / "reference.onnx", Path(tmp) / "candidate.onnx"
        save_graph(build_graph(spec, weights, max_seq=max_seq), ref)
        save_graph(graph, cand)
        return measure_accuracy(ref, cand, heldout[:max_seq - 1])


def prepare_tensorrt_graph(spec: ModelSpec, weights: dict[str, np.ndarray], tok_json: str, precision: str,
                           dtype: str, quantization: str | None, max_seq: int,
                           calibration_text: str | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The graph TensorRT compiles (static attention span, Q/DQ for int8/fp8) and manifest entries.

    Raises AccuracyError when the graph loses more than THRESHOLDS[precision] allows."""
    from build_engine.quantize import SMOOTHING_ALPHA, quantize_for_target, quantize_graph
    from build_engine.trt_graph import build_graph

    heldout = token_ids(tok_json, default_text("heldout"))
    manifest: dict[str, Any] = {}
    report: AccuracyReport | None = None
    if quantization:
        calib = token_ids(tok_json, calibration_text if calibration_text is not None else default_text("calibration"))
        if len(calib) < 16:
            raise ValueError(f"the calibration text has {len(calib)} tokens; give at least 16 (better: thousands)")
        from build_engine.graph_builder import DTYPES

        # Measure with the scales the engine gets: rounded to (and clamped in) the target graph's type.
        weights, amax, report = quantize_for_target(spec, weights, quantization, max_seq, calib, heldout,
                                                    scale_dtype=DTYPES[dtype][1])
        graph = quantize_graph(build_graph(spec, weights, max_seq=max_seq, dtype=dtype, live_kv_prefix=False),
                               quantization, amax)
        manifest["quantization"] = {
            "method": f"{quantization} Q/DQ: weights per output channel, linear-layer inputs per tensor",
            "calibration_tokens": len(calib),
            "calibration_text": "default" if calibration_text is None else "--calib",
            "smoothing_alpha": SMOOTHING_ALPHA.get(quantization),
            "not_quantized": "embedding, vocabulary projection, norms, attention, KV cache",
        }
    else:
        graph = build_graph(spec, weights, max_seq=max_seq, dtype=dtype, live_kv_prefix=False)
        if dtype == "float16":
            report = _measure_float(spec, weights, graph, max_seq, heldout)
    if report is None:
        log.warning("%s accuracy not measured: ONNX Runtime's CPU provider has no %s kernels", precision, precision)
        manifest["accuracy"] = {"measured": False, "reason": f"no {precision} kernels in ONNX Runtime's CPU provider"}
        return graph, manifest
    manifest["accuracy"] = accuracy_record(report, precision)
    return graph, manifest
