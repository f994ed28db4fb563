"""ModelSpec + Hugging Face-named weights -> the CPU graph: ONNX Runtime's fused decoder ops over an in-place KV cache.

The TensorRT graph (onnx_graph.py) keeps to standard ONNX ops. On a CPU a decode step of a small model is
bound less by its matrices than by the number of kernels it dispatches, so this graph uses ONNX Runtime's
`com.microsoft` ops made for decoders: one `GroupQueryAttention` per layer takes the packed q/k/v projection,
rotates q and k, appends k/v to the cache in place (past and present bound to one buffer) and attends over
each row's own cached length; `SkipSimplifiedLayerNormalization` adds the residual and normalizes in one
kernel. A layer is ~10 kernels instead of ~25.

Graph contract (the CPU backend relies on it):
  inputs   input_ids int64 [batch, tokens],
           seqlens_k int32 [batch]: each row's cached length after this step, minus one,
           query_lengths int32 [batch]: each row's new tokens (the first query_lengths of `tokens`; 0 = idle row),
           logits_indices int64 [batch, n_logits] (token positions of each row that get logits),
           past_key.{i} / past_value.{i}  float32 [batch, num_kv_heads, max_seq, head_dim]
  outputs  logits float32 [batch, n_logits, vocab], present_key.{i} / present_value.{i} (bind them to the past
           buffers: the new tokens are written at positions [seqlens_k + 1 - query_lengths, seqlens_k + 1)).
A row's new token j sits at position seqlens_k + 1 - query_lengths + j (its RoPE angle and causal horizon).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from build_engine.model_spec import ModelSpec
from build_engine.onnx_graph import OPSET, GraphBuilder, check_weights, has_o_bias, rope_cache

CONTRIB = "com.microsoft"
ATTENTION_OP = "GroupQueryAttention"  # recorded in the manifest: the CPU backend checks it


def build_cpu_graph(spec: ModelSpec, weights: dict[str, np.ndarray], *, max_seq: int) -> onnx.ModelProto:
    """The whole decoder as one float32 graph for ONNX Runtime's CPU provider, batched, prefill and decode."""
    if max_seq < 1:
        raise ValueError(f"max_seq must be positive, got {max_seq}")
    check_weights(spec, weights)
    g = GraphBuilder(TensorProto.FLOAT, np.float32)
    h, d, nh, nkv = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    eps = float(spec.rms_norm_eps)

    def weight(name: str) -> np.ndarray:
        return weights[name]

    def linear(x: str, names: list[str], out: str, bias: bool = False) -> str:
        """One MatMul over the columns of several projections of x (q/k/v, gate/up): one kernel reads them all."""
        # Stored [in, out] so the MatMul needs no transpose; weight-only quantization blocks run along `in`.
        w = np.concatenate([weight(n + ".weight").T for n in names], axis=1) if len(names) > 1 else weight(names[0] + ".weight").T
        y = g.op("MatMul", [x, g.weight("+".join(names) + ".weight.T", w)], out)
        if bias:
            b = np.concatenate([weight(n + ".bias") for n in names])
            y = g.op("Add", [y, g.weight("+".join(names) + ".bias", b)], out + ".bias")
        return y

    def skip_norm(x: str, residual: str, name: str, out: str) -> tuple[str, str]:
        """(RMSNorm(x + residual), x + residual) in one kernel."""
        g.graph.node.append(helper.make_node(
            "SkipSimplifiedLayerNormalization", [x, residual, g.weight(name, weight(name))],
            [out, "", "", out + ".sum"], name=out, domain=CONTRIB, epsilon=eps))
        return out, out + ".sum"

    cos, sin = rope_cache(spec, max_seq)
    cos_cache, sin_cache = g.weight("rope.cos", cos), g.weight("rope.sin", sin)
    # With query_lengths given, GroupQueryAttention takes this only as an upper bound of the cached lengths.
    total_len = g._init("kv.capacity", np.array(max_seq, np.int32), TensorProto.INT32)
    window = spec.sliding_window if spec.sliding_window and spec.sliding_window < max_seq else -1

    embed = g.weight("model.embed_tokens.weight", weight("model.embed_tokens.weight"))
    residual = g.op("Gather", [embed, "input_ids"], "embed")
    x = None  # the previous layer's MLP output, not yet added to the residual stream
    for i in range(spec.num_layers):
        p, o = f"model.layers.{i}.", f"l{i}."
        if x is None:
            norm = p + "input_layernorm.weight"
            a = g.op("SimplifiedLayerNormalization", [residual, g.weight(norm, weight(norm))], o + "attn_norm",
                     axis=-1, epsilon=eps, stash_type=1)
        else:
            a, residual = skip_norm(x, residual, p + "input_layernorm.weight", o + "attn_norm")
        qkv = linear(a, [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"], o + "qkv",
                     spec.attention_bias)
        q_k_v = [qkv, "", ""]
        if spec.qk_norm:  # Qwen3: RMSNorm over each head of q and k (ONNX Runtime's CPU GQA cannot do it inside)
            q_k_v = [o + "q", o + "k", o + "v"]
            g.graph.node.append(helper.make_node("Split", [qkv, g.ints("split.qkv", [nh * d, nkv * d, nkv * d])],
                                                 q_k_v, name=o + "qkv.split", axis=-1))
            for j, (n, kind) in enumerate(((nh, "q"), (nkv, "k"))):
                norm = p + f"self_attn.{kind}_norm.weight"
                heads = g.op("Reshape", [q_k_v[j], g.ints(f"shape.heads{n}", [0, 0, n, d])], o + kind + ".heads")
                heads = g.op("SimplifiedLayerNormalization", [heads, g.weight(norm, weight(norm))],
                             o + kind + "_norm", axis=-1, epsilon=eps, stash_type=1)
                q_k_v[j] = g.op("Reshape", [heads, g.ints(f"shape.merge{n}", [0, 0, n * d])], o + kind + "_normed")
        inputs = [*q_k_v, f"past_key.{i}", f"past_value.{i}", "seqlens_k", total_len, cos_cache, sin_cache,
                  "", "", "", "", "", "", "", "query_lengths"]
        g.graph.node.append(helper.make_node(
            "GroupQueryAttention", inputs, [o + "attn", f"present_key.{i}", f"present_value.{i}"], name=o + "attn",
            domain=CONTRIB, num_heads=nh, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0,
            scale=1.0 / math.sqrt(d), local_window_size=window))
        attn = linear(o + "attn", [p + "self_attn.o_proj"], o + "o_proj", has_o_bias(spec))
        m, residual = skip_norm(attn, residual, p + "post_attention_layernorm.weight", o + "mlp_norm")
        gate_up = linear(m, [p + "mlp.gate_proj", p + "mlp.up_proj"], o + "gate_up")
        gate, up = o + "gate", o + "up"
        g.graph.node.append(helper.make_node("Split", [gate_up, g.ints("split.mlp", [spec.intermediate_size] * 2)],
                                             [gate, up], name=o + "gate_up.split", axis=-1))
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], o + "gate.sigmoid")], o + "silu")
        x = linear(g.op("Mul", [silu, up], o + "gated"), [p + "mlp.down_proj"], o + "down")

    # Only the rows that get logits are normalized and projected onto the vocabulary.
    hidden = g.op("Add", [x, residual], "hidden")
    idx = g.op("Unsqueeze", ["logits_indices", g.ints("axes.last", [-1])], "logits.idx")  # [batch, n, 1]
    idx_shape = g.op("Shape", ["logits_indices"], "logits.idx_shape")
    idx = g.op("Expand", [idx, g.op("Concat", [idx_shape, g.ints("shape.hidden", [h])], "logits.gather_shape", axis=0)],
               "logits.idx_expanded")
    hidden = g.op("GatherElements", [hidden, idx], "logits.hidden", axis=1)
    norm = "model.norm.weight"
    hidden = g.op("SimplifiedLayerNormalization", [hidden, g.weight(norm, weight(norm))], "final_norm",
                  axis=-1, epsilon=eps, stash_type=1)
    # Gemm against the [vocab, hidden] matrix (transB) so tied models store the embedding once.
    head = embed if spec.tie_word_embeddings else g.weight("lm_head.weight", weight("lm_head.weight"))
    hidden = g.op("Reshape", [hidden, g.ints("shape.rows", [-1, h])], "logits.rows")
    logits = g.op("Gemm", [hidden, head], "logits.gemm", transB=1)
    out_shape = g.op("Concat", [idx_shape, g.ints("shape.vocab", [spec.vocab_size])], "logits.shape", axis=0)
    g.op("Reshape", [logits, out_shape], "logits")

    cache_shape = ["batch", nkv, max_seq, d]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("query_lengths", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("logits_indices", TensorProto.INT64, ["batch", "n_logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "n_logits", spec.vocab_size])]
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", TensorProto.FLOAT, cache_shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", TensorProto.FLOAT, cache_shape))
    g.graph.name = f"edgellm_{spec.architecture}_cpu"
    g.graph.input.extend(inputs)
    g.graph.output.extend(outputs)
    g.model.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid(CONTRIB, 1)])
    g.model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", OPSET)])
    g.model.producer_name = "edgellm"
    return g.model
