"""ModelSpec + Hugging Face-named weights -> the TensorRT graph (opset 24) with a static, in-place KV cache.

Graph contract (the daemon and the TensorRT compiler rely on it):
  inputs   input_ids int64 [batch, tokens], position_ids int64 [batch, tokens],
           write_indices int64 [batch] (cache slot of each row's first new token),
           logits_indices int64 [batch, n_logits] (token positions of each row that get logits),
           past_key.{i} / past_value.{i}  dtype [batch, num_kv_heads, max_seq, head_dim]
  outputs  logits float32 [batch, n_logits, vocab], present_key.{i} / present_value.{i} (same shape as past;
           bind them to the past buffers and TensorScatter updates the cache in place).
Key slot s is visible to a query at position p iff s <= p (and s > p - sliding_window), so whatever padded or idle
rows write beyond their real positions is never read before it is overwritten. Every position_ids value must lie
in [0, max_seq): it indexes the RoPE tables.
Standard ONNX ops only (RMSNormalization, RotaryEmbedding, Attention, TensorScatter), no contrib ops.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from build_engine.graph_builder import (DTYPES, GraphBuilder, check_weights, finish_graph, has_o_bias, logits_output,
                                        rope_cache)
from build_engine.model_spec import ModelSpec


def build_graph(spec: ModelSpec, weights: dict[str, np.ndarray], *, max_seq: int,
                dtype: str = "float32", live_kv_prefix: bool = True) -> onnx.ModelProto:
    """The whole decoder as one graph: prefill and decode, batched, with a static KV cache of max_seq slots.

    live_kv_prefix=False attends over all max_seq slots (the mask hides the unused ones): every shape then
    follows from the input shapes alone, which TensorRT's CUDA-graph capture needs (a shape computed from
    position_ids' values would be data-dependent)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {', '.join(DTYPES)}")
    if max_seq < 1:
        raise ValueError(f"max_seq must be positive, got {max_seq}")
    check_weights(spec, weights)
    onnx_dtype, np_dtype = DTYPES[dtype]
    g = GraphBuilder(onnx_dtype, np_dtype)
    d, nh, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    eps = float(spec.rms_norm_eps)

    def linear(x: str, name: str, out: str, bias: bool = False) -> str:
        # Weights stored [in, out] (".weight.T") so the MatMul needs no transpose at run time.
        y = g.op("MatMul", [x, g.weight(name + ".weight.T", weights[name + ".weight"].T)], out)
        if bias:
            y = g.op("Add", [y, g.weight(name + ".bias", weights[name + ".bias"])], out + ".bias")
        return y

    def rms_norm(x: str, name: str, out: str) -> str:
        # stash_type=1: mean of squares in float32 whatever the activation dtype, as transformers does.
        return g.op("RMSNormalization", [x, g.weight(name, weights[name])], out, axis=-1, epsilon=eps, stash_type=1)

    def heads(x: str, n: int, out: str) -> str:
        """[batch, tokens, n*d] -> [batch, n, tokens, d]"""
        x = g.op("Reshape", [x, g.ints(f"shape.heads{n}", [0, 0, n, d])], out + ".split")
        return g.op("Transpose", [x], out, perm=[0, 2, 1, 3])

    cos, sin = rope_cache(spec, max_seq)
    cos_cache, sin_cache = g.weight("rope.cos", cos), g.weight("rope.sin", sin)

    # Attention reads only the cache prefix [0, kv_len) that some query can see, kv_len = max position + 1:
    # the cache stays static, but a step costs what the longest live sequence needs, not max_seq.
    # (Idle rows of a batch sit at position 0; their writes go to the scratch slot, outside the prefix.)
    if live_kv_prefix:
        max_pos = g.op("ReduceMax", ["position_ids"], "kv.max_pos", keepdims=0)
        kv_len = g.op("Add", [max_pos, g.ints("one", 1)], "kv.len")  # a scalar
        kv_end = g.op("Unsqueeze", [kv_len, g.ints("axes.0", [0])], "kv.end")  # [1]
    else:
        kv_len = g.ints("kv.len", max_seq)
    # Attention mask from positions, shared by all layers: [batch, 1, tokens, kv_len] bool.
    slots = g.op("Range", [g.ints("zero", 0), kv_len, g.ints("one", 1)], "mask.slots")
    pos = g.op("Unsqueeze", ["position_ids", g.ints("axes.last", [-1])], "mask.pos")  # [batch, tokens, 1]
    mask = g.op("LessOrEqual", [slots, pos], "mask.causal")
    if spec.sliding_window and spec.sliding_window < max_seq:
        lowest = g.op("Sub", [pos, g.ints("mask.window", [spec.sliding_window])], "mask.lowest")
        mask = g.op("And", [mask, g.op("Greater", [slots, lowest], "mask.in_window")], "mask.sliding")
    mask = g.op("Unsqueeze", [mask, g.ints("axes.1", [1])], "mask")

    embed = g.weight("model.embed_tokens.weight", weights["model.embed_tokens.weight"])
    x = g.op("Gather", [embed, "input_ids"], "embed")
    for i in range(spec.num_layers):
        p, o = f"model.layers.{i}.", f"l{i}."
        a = rms_norm(x, p + "input_layernorm.weight", o + "attn_norm")
        qkv_bias = spec.attention_bias
        q = heads(linear(a, p + "self_attn.q_proj", o + "q_proj", qkv_bias), nh, o + "q")
        k = heads(linear(a, p + "self_attn.k_proj", o + "k_proj", qkv_bias), nkv, o + "k")
        v = heads(linear(a, p + "self_attn.v_proj", o + "v_proj", qkv_bias), nkv, o + "v")
        if spec.qk_norm:  # Qwen3: RMSNorm over each head before RoPE
            q = rms_norm(q, p + "self_attn.q_norm.weight", o + "q_norm")
            k = rms_norm(k, p + "self_attn.k_norm.weight", o + "k_norm")
        q = g.op("RotaryEmbedding", [q, cos_cache, sin_cache, "position_ids"], o + "q_rope", interleaved=0)
        k = g.op("RotaryEmbedding", [k, cos_cache, sin_cache, "position_ids"], o + "k_rope", interleaved=0)
        # axis -2 (the sequence axis of [batch, kv_heads, max_seq, head_dim]): onnx-tensorrt maps TensorScatter to
        # its in-place KV-cache update layer only for 4-D caches with axis = -2.
        k_all = g.op("TensorScatter", [f"past_key.{i}", k, "write_indices"], f"present_key.{i}", axis=-2)
        v_all = g.op("TensorScatter", [f"past_value.{i}", v, "write_indices"], f"present_value.{i}", axis=-2)
        if live_kv_prefix:
            k_all = g.op("Slice", [k_all, g.ints("kv.start", [0]), kv_end, g.ints("axes.2", [2])], o + "k_live")
            v_all = g.op("Slice", [v_all, g.ints("kv.start", [0]), kv_end, g.ints("axes.2", [2])], o + "v_live")
        y = g.op("Attention", [q, k_all, v_all, mask], o + "attn", q_num_heads=nh, kv_num_heads=nkv,
                 scale=1.0 / math.sqrt(d))
        y = g.op("Transpose", [y], o + "attn.t", perm=[0, 2, 1, 3])
        y = g.op("Reshape", [y, g.ints("shape.merge_heads", [0, 0, nh * d])], o + "attn.merged")
        x = g.op("Add", [x, linear(y, p + "self_attn.o_proj", o + "o_proj", has_o_bias(spec))], o + "attn_out")

        m = rms_norm(x, p + "post_attention_layernorm.weight", o + "mlp_norm")
        gate = linear(m, p + "mlp.gate_proj", o + "gate")
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], o + "gate.sigmoid")], o + "silu")
        up = g.op("Mul", [silu, linear(m, p + "mlp.up_proj", o + "up")], o + "gate_up")
        x = g.op("Add", [x, linear(up, p + "mlp.down_proj", o + "down")], o + "out")

    head = embed if spec.tie_word_embeddings else g.weight("lm_head.weight", weights["lm_head.weight"])
    logits_output(g, spec, x, head, lambda rows: rms_norm(rows, "model.norm.weight", "final_norm"))
    step_inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "tokens"]),
        helper.make_tensor_value_info("write_indices", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("logits_indices", TensorProto.INT64, ["batch", "n_logits"]),
    ]
    return finish_graph(g, spec, max_seq, step_inputs, f"edgellm_{spec.architecture}")
