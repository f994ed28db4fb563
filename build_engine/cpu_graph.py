"""ModelSpec + Hugging Face-named weights -> the CPU graph: ONNX Runtime's fused decoder ops over an in-place KV cache.

The TensorRT graph (trt_graph.py) keeps to standard ONNX ops. On a CPU a decode step of a small model is
bound less by its matrices than by the number of kernels it dispatches, so this graph uses ONNX Runtime's
`com.microsoft` ops made for decoders: one `GroupQueryAttention` per layer takes the packed q/k/v projection,
rotates q and k, appends k/v to the cache in place (past and present bound to one buffer) and attends over
each row's own cached length; `SkipSimplifiedLayerNormalization` adds the residual and normalizes in one
kernel. A layer is ~10 kernels instead of ~25.

Packed tokens: a step's new tokens, of every row, lie in one sequence [1, tokens] for everything but attention
(embedding, projections, MLP, norms), so a step that mixes decode rows with a prompt chunk computes each real
token once, with no padding in any MatMul. Only around GroupQueryAttention are they scattered to the per-row
layout [batch, max_q] (padded to the longest row of the step) and gathered back.

Graph contract (the CPU backend relies on it):
  inputs   input_ids int64 [1, tokens]: the step's new tokens, row after row,
           seqlens_k int32 [batch]: each row's cached length after this step, minus one,
           query_lengths int32 [batch]: each row's new tokens (0 = idle row),
           token_rows int64 [batch, max_q]: where row b's new token j lies in `tokens` (any valid index past
             query_lengths[b]: padding, computed and dropped),
           token_places int64 [1, tokens]: b * max_q + j for the token that is row b's new token j,
           logits_indices int64 [1, n_logits] (positions in `tokens` that get logits),
           past_key.{i} / past_value.{i}  float32 [batch, num_kv_heads, max_seq, head_dim]
  outputs  logits float32 [1, n_logits, vocab], present_key.{i} / present_value.{i} (bind them to the past
           buffers: the new tokens are written at positions [seqlens_k + 1 - query_lengths, seqlens_k + 1)).
A row's new token j sits at position seqlens_k + 1 - query_lengths + j (its RoPE angle and causal horizon).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from build_engine.graph_builder import GraphBuilder, check_weights, finish_graph, has_o_bias, logits_output, rope_cache
from build_engine.model_spec import ModelSpec

CONTRIB = "com.microsoft"


def build_cpu_graph(spec: ModelSpec, weights: dict[str, np.ndarray], *, max_seq: int) -> onnx.ModelProto:
    """The whole decoder as one float32 graph for ONNX Runtime's CPU provider, batched, prefill and decode."""
    if max_seq < 1:
        raise ValueError(f"max_seq must be positive, got {max_seq}")
    check_weights(spec, weights)
    g = GraphBuilder(TensorProto.FLOAT, np.float32)
    d, nh, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    eps = float(spec.rms_norm_eps)

    def linear(x: str, names: list[str], out: str, bias: bool = False) -> str:
        """One MatMul over the columns of several projections of x (q/k/v, gate/up): one kernel reads them all."""
        # Stored [in, out] so the MatMul needs no transpose; weight-only quantization blocks run along `in`.
        w = np.concatenate([weights[n + ".weight"].T for n in names], axis=1)
        y = g.op("MatMul", [x, g.weight("+".join(names) + ".weight.T", w)], out)
        if bias:
            b = np.concatenate([weights[n + ".bias"] for n in names])
            y = g.op("Add", [y, g.weight("+".join(names) + ".bias", b)], out + ".bias")
        return y

    def rms_norm(x: str, name: str, out: str) -> str:
        return g.op("SimplifiedLayerNormalization", [x, g.weight(name, weights[name])], out, axis=-1, epsilon=eps,
                    stash_type=1)

    def skip_norm(x: str, residual: str, name: str, out: str) -> tuple[str, str]:
        """(RMSNorm(x + residual), x + residual) in one kernel."""
        g.graph.node.append(helper.make_node(
            "SkipSimplifiedLayerNormalization", [x, residual, g.weight(name, weights[name])],
            [out, "", "", out + ".sum"], name=out, domain=CONTRIB, epsilon=eps))
        return out, out + ".sum"

    def to_rows(x: str, out: str) -> str:
        """[1, tokens, n] -> [batch, max_q, n]: each row's new tokens, for attention."""
        rows = g.op("Gather", [x, "token_rows"], out + ".gather", axis=1)  # [1, batch, max_q, n]
        return g.op("Squeeze", [rows, g.ints("axes.first", [0])], out)

    cos, sin = rope_cache(spec, max_seq)
    cos_cache, sin_cache = g.weight("rope.cos", cos), g.weight("rope.sin", sin)
    # With query_lengths given, GroupQueryAttention takes this only as an upper bound of the cached lengths.
    total_len = g.int32("kv.capacity", max_seq)
    window = spec.sliding_window if spec.sliding_window and spec.sliding_window < max_seq else -1

    embed = g.weight("model.embed_tokens.weight", weights["model.embed_tokens.weight"])
    residual = g.op("Gather", [embed, "input_ids"], "embed")
    x = None  # the previous layer's MLP output, not yet added to the residual stream
    for i in range(spec.num_layers):
        p, o = f"model.layers.{i}.", f"l{i}."
        if x is None:
            a = rms_norm(residual, p + "input_layernorm.weight", o + "attn_norm")
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
                heads = g.op("Reshape", [q_k_v[j], g.ints(f"shape.heads{n}", [0, 0, n, d])], o + kind + ".heads")
                heads = rms_norm(heads, p + f"self_attn.{kind}_norm.weight", o + kind + "_norm")
                q_k_v[j] = g.op("Reshape", [heads, g.ints(f"shape.merge{n}", [0, 0, n * d])], o + kind + "_normed")
        q_k_v = [to_rows(t, o + f"rows{j}") if t else t for j, t in enumerate(q_k_v)]
        inputs = [*q_k_v, f"past_key.{i}", f"past_value.{i}", "seqlens_k", total_len, cos_cache, sin_cache,
                  "", "", "", "", "", "", "", "query_lengths"]
        g.graph.node.append(helper.make_node(
            "GroupQueryAttention", inputs, [o + "attn", f"present_key.{i}", f"present_value.{i}"], name=o + "attn",
            domain=CONTRIB, num_heads=nh, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0,
            scale=1.0 / math.sqrt(d), local_window_size=window))
        flat = g.op("Reshape", [o + "attn", g.ints("shape.attn_flat", [-1, nh * d])], o + "attn.flat")
        packed = g.op("Gather", [flat, "token_places"], o + "attn.packed", axis=0)  # [1, tokens, nh * d]
        attn = linear(packed, [p + "self_attn.o_proj"], o + "o_proj", has_o_bias(spec))
        m, residual = skip_norm(attn, residual, p + "post_attention_layernorm.weight", o + "mlp_norm")
        gate_up = linear(m, [p + "mlp.gate_proj", p + "mlp.up_proj"], o + "gate_up")
        gate, up = o + "gate", o + "up"
        g.graph.node.append(helper.make_node("Split", [gate_up, g.ints("split.mlp", [spec.intermediate_size] * 2)],
                                             [gate, up], name=o + "gate_up.split", axis=-1))
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], o + "gate.sigmoid")], o + "silu")
        x = linear(g.op("Mul", [silu, up], o + "gated"), [p + "mlp.down_proj"], o + "down")

    head = embed if spec.tie_word_embeddings else g.weight("lm_head.weight", weights["lm_head.weight"])
    logits_output(g, spec, g.op("Add", [x, residual], "hidden"), head,
                  lambda rows: rms_norm(rows, "model.norm.weight", "final_norm"))
    step_inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "tokens"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("query_lengths", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("token_rows", TensorProto.INT64, ["batch", "max_q"]),
        helper.make_tensor_value_info("token_places", TensorProto.INT64, [1, "tokens"]),
        helper.make_tensor_value_info("logits_indices", TensorProto.INT64, [1, "n_logits"]),
    ]
    return finish_graph(g, spec, max_seq, step_inputs, f"edgellm_{spec.architecture}_cpu", extra_opsets=(CONTRIB,),
                        logits_batch=1)
