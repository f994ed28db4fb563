"""Run a bundle graph once in ONNX Runtime from an empty cache: what the build's calibration and accuracy checks need.

(The daemon's backend keeps a cache across steps and binds buffers in place; a build-time check needs none of that.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_CACHE_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


def open_session(graph: Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.log_severity_level = 3
    return ort.InferenceSession(os.fspath(graph), so, providers=["CPUExecutionProvider"])


def prefill_feeds(session, token_ids: list[int], logits_indices: list[int]) -> dict[str, np.ndarray]:
    """Inputs of one row prefilling token_ids at positions 0.. into an empty cache."""
    n = len(token_ids)
    feeds = {"input_ids": np.array([token_ids], np.int64), "logits_indices": np.array([logits_indices], np.int64)}
    inputs = session.get_inputs()
    if any(inp.name == "seqlens_k" for inp in inputs):  # the CPU graph (build_engine/cpu_graph.py)
        feeds |= {"seqlens_k": np.array([n - 1], np.int32), "query_lengths": np.array([n], np.int32),
                  "token_rows": np.arange(n, dtype=np.int64)[None], "token_places": np.arange(n, dtype=np.int64)[None]}
    else:  # the TensorRT graph (build_engine/trt_graph.py)
        feeds |= {"position_ids": np.arange(n, dtype=np.int64)[None], "write_indices": np.zeros(1, np.int64)}
    for inp in inputs:
        if inp.name.startswith("past_"):
            feeds[inp.name] = np.zeros([1, *inp.shape[1:]], _CACHE_DTYPES[inp.type])
    return feeds
