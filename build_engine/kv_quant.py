"""An 8-bit KV cache for the CPU graph: GroupQueryAttention's own int8 cache, with per-channel scales calibrated here.

ONNX Runtime's CPU `GroupQueryAttention` can keep K and V as int8 (`k_quant_type`/`v_quant_type` PER_CHANNEL,
`kv_cache_bit_width` 8): it quantizes each new token's K and V with one fixed scale per (KV head, channel) as it
writes them, and attends over the dequantized cache, the new tokens included, so a prefill and the decode steps
over the same tokens read the same values. The scales are static, so they are set at build time: each channel's
largest magnitude on the calibration text (K after RoPE, as the cache holds it) maps to level 127; a larger value
later saturates. The cache takes a quarter of the memory of fp32 and attention reads a quarter of the bytes;
the build's accuracy check on held-out text then decides, as for the weights (docs/bundles.md has the figures).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

KV_CACHE_DTYPES = ("int8",)  # what `edgellm build --kv-cache` offers; without it the cache is the graph's float type
_LEVELS = 127.0
_MIN_SCALE = 1e-8  # a channel that stayed 0 on the calibration text: any tiny scale keeps it exact at 0


def kv_cache_scales(reference: Path, token_ids: list[int], window: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, the (K, V) scales [kv_heads, head_dim] that map each channel's largest magnitude, over prefills
    of token_ids in windows of `window` tokens in the float graph `reference`, to level 127."""
    from build_engine.graph_session import open_session, prefill_feeds

    sess = open_session(reference)
    outputs = [o.name for o in sess.get_outputs() if o.name.startswith("present_")]
    peak = {name: 0.0 for name in outputs}
    for start in range(0, len(token_ids), window):
        ids = token_ids[start:start + window]
        for name, cache in zip(outputs, sess.run(outputs, prefill_feeds(sess, ids, [len(ids) - 1]))):
            peak[name] = np.maximum(peak[name], np.abs(cache[0, :, :len(ids)]).max(axis=1))  # [kv_heads, head_dim]
    return [tuple(np.maximum(peak[f"present_{kind}.{i}"] / _LEVELS, _MIN_SCALE).astype(np.float32)
                  for kind in ("key", "value")) for i in range(len(outputs) // 2)]


def quantize_kv_cache(model: onnx.ModelProto, scales: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Make the CPU graph's cache int8 in place: each GroupQueryAttention gets its layer's scales and the int8
    cache attributes, and the past_*/present_* tensors become int8."""
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        layer = int(node.input[3].rsplit(".", 1)[1])  # past_key.{layer}
        while len(node.input) < 14:
            node.input.append("")
        for slot, kind, scale in ((12, "key", scales[layer][0]), (13, "value", scales[layer][1])):
            name = f"kv.{kind}_scale.{layer}"
            model.graph.initializer.append(numpy_helper.from_array(scale, name))
            node.input[slot] = name
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
    for value in (*model.graph.input, *model.graph.output):
        if value.name.startswith(("past_", "present_")):
            value.type.tensor_type.elem_type = TensorProto.INT8
