"""Both ONNX graphs (CPU and TensorRT, run in ONNX Runtime with an in-place KV cache) against transformers on
tiny random models.

Tolerance: float32 logits within atol 1e-4 of transformers (eager attention) at every step, and identical
greedy tokens. Random weights give logits of order 1, so 1e-4 is far above float32 noise (~1e-6) and far
below any real mistake (a wrong RoPE angle, mask slot or bias moves logits by > 1e-2).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers

from build_engine.hf_checkpoint import load_hf_checkpoint
from build_engine.model_spec import CheckpointError, ModelSpec, UnsupportedModelError, spec_from_hf_config
from build_engine.cpu_graph import build_cpu_graph
from build_engine.graph_builder import save_graph
from build_engine.trt_graph import build_graph
from tiny_models import make_tiny_checkpoint

ATOL = 1e-4
MAX_SEQ = 64
PROMPT_LEN = 7
DECODE_STEPS = 32
VARIANTS = ["llama", "llama3_rope", "llama_linear_rope", "llama_tied", "mistral", "mistral_swa", "qwen2", "qwen3"]


GRAPHS = ["cpu", "tensorrt"]  # build_cpu_graph (ONNX Runtime's fused ops) and build_graph (standard ops)


class Driver:
    """Minimal graph runner: numpy KV caches bound as both past_* and present_*, so ORT updates them in place.

    step() speaks in rows of new tokens, each row with its start position and count; it feeds either graph's
    inputs (the CPU graph's seqlens_k/query_lengths, the standard graph's position_ids/write_indices)."""

    def __init__(self, onnx_path: Path, spec: ModelSpec, rows: int) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.cpu_graph = "seqlens_k" in {i.name for i in self.sess.get_inputs()}
        shape = (rows, spec.num_kv_heads, MAX_SEQ, spec.head_dim)
        self.caches = {f"{kind}.{i}": np.zeros(shape, np.float32)
                       for i in range(spec.num_layers) for kind in ("key", "value")}

    def row(self, r: int) -> "Driver":
        """A driver over row r of this one's caches (the same buffers)."""
        view = object.__new__(Driver)
        view.sess, view.cpu_graph = self.sess, self.cpu_graph
        view.caches = {name: cache[r:r + 1] for name, cache in self.caches.items()}
        return view

    def step(self, input_ids: list[list[int]], starts: list[int], counts: list[int] | None,
             logits_indices) -> np.ndarray:
        """Row b's first counts[b] tokens (all of them if counts is None) go to positions starts[b]...; the rest
        of a row is padding (the standard graph writes it to the following slots, the CPU graph nowhere)."""
        width = len(input_ids[0])
        counts = counts or [width] * len(input_ids)
        feeds = {"input_ids": np.array(input_ids, np.int64), "logits_indices": np.array(logits_indices, np.int64)}
        if self.cpu_graph:  # packed: the rows' real tokens in one sequence, scattered to rows around attention
            offsets = np.cumsum([0, *counts])
            rows = [[offsets[b] + min(j, max(n - 1, 0)) for j in range(width)] for b, n in enumerate(counts)]
            feeds = {"input_ids": np.array([[t for ids, n in zip(input_ids, counts) for t in ids[:n]]], np.int64),
                     "token_rows": np.minimum(np.array(rows, np.int64), max(offsets[-1] - 1, 0)),
                     "token_places": np.array([[b * width + j for b, n in enumerate(counts) for j in range(n)]],
                                              np.int64),
                     "logits_indices": np.array([[offsets[b] + i for b, idx in enumerate(logits_indices)
                                                  for i in idx]], np.int64),
                     "seqlens_k": np.array([max(s + n - 1, 0) for s, n in zip(starts, counts)], np.int32),
                     "query_lengths": np.array(counts, np.int32)}
        else:
            feeds |= {"position_ids": np.array([range(s, s + width) for s in starts], np.int64),
                      "write_indices": np.array(starts, np.int64)}
        io = self.sess.io_binding()
        io.bind_output("logits")
        for name, value in feeds.items():  # (referenced until the run ends: the binding does not own them)
            io.bind_cpu_input(name, value)
        for name, cache in self.caches.items():
            ptr = cache.ctypes.data
            io.bind_input(f"past_{name}", "cpu", 0, np.float32, list(cache.shape), ptr)
            io.bind_output(f"present_{name}", "cpu", 0, np.float32, list(cache.shape), ptr)
        self.sess.run_with_iobinding(io)
        logits = io.get_outputs()[0].numpy()
        return logits.reshape(len(input_ids), -1, logits.shape[-1]) if self.cpu_graph else logits


def build(folder: Path, arch: str, graph: str = "tensorrt", **overrides) -> tuple[ModelSpec, Path]:
    """Tiny checkpoint -> graph file (the standard-op graph checked with the full ONNX checker)."""
    make_tiny_checkpoint(folder, arch, **overrides)
    spec, weights = load_hf_checkpoint(folder)
    if graph == "cpu":
        model = build_cpu_graph(spec, weights, max_seq=MAX_SEQ)
    else:
        model = build_graph(spec, weights, max_seq=MAX_SEQ)
        onnx.checker.check_model(model, full_check=True)
    files = save_graph(model, folder / "model.onnx")
    assert files == [folder / "model.onnx", folder / "model.onnx.data"] and all(f.is_file() for f in files)
    return spec, files[0]


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """transformers' logits for every position of ids (causal, so row t is the logits of prefix ids[:t+1])."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("arch", VARIANTS)
def test_greedy_decode_matches_transformers(tmp_path: Path, arch: str, graph: str) -> None:
    spec, path = build(tmp_path, arch, graph)
    assert spec.num_kv_heads < spec.num_heads  # grouped-query attention is exercised
    driver = Driver(path, spec, rows=1)
    prompt = np.random.default_rng(1).integers(3, spec.vocab_size, PROMPT_LEN).tolist()

    # Prefill asks for logits at every prompt position, decode at the one new token.
    steps = [driver.step([prompt], [0], None, [range(PROMPT_LEN)])[0]]
    # The bound numpy caches were written in place, exactly at slots 0..PROMPT_LEN-1.
    written = np.abs(driver.caches["value.0"][0]).sum(axis=(0, 2)) > 0
    assert written.tolist() == [True] * PROMPT_LEN + [False] * (MAX_SEQ - PROMPT_LEN)
    ids = prompt + [int(steps[0][-1].argmax())]
    for _ in range(DECODE_STEPS):
        pos = len(ids) - 1
        steps.append(driver.step([[ids[-1]]], [pos], None, [[0]])[0])
        ids.append(int(steps[-1][-1].argmax()))
    ours = np.concatenate(steps)  # logits for positions 0 .. len(ids)-2
    assert ours.shape == (len(ids) - 1, spec.vocab_size) and ours.dtype == np.float32

    # One causal forward over the final sequence yields transformers' logits for each growing prefix.
    ref = hf_logits(tmp_path, ids[:-1])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)
    # Greedy tokens: transformers' argmax after each prefix is the token the graph picked.
    assert ref[PROMPT_LEN - 1:].argmax(-1).tolist() == ids[PROMPT_LEN:]


@pytest.mark.parametrize("graph", GRAPHS)
def test_padded_batch_rows_match_single_rows(tmp_path: Path, graph: str) -> None:
    """Right-padded batched prefill and batched decode give each row exactly its solo logits."""
    spec, path = build(tmp_path, "qwen2", graph)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, spec.vocab_size, n).tolist() for n in (7, 4)]

    def run(rows: list[int], steps: int) -> list[list[np.ndarray]]:
        """Batch of the given prompt indices; returns per-row logits after prefill and each decode step."""
        driver = Driver(path, spec, rows=len(rows))
        width = max(len(prompts[r]) for r in rows)
        lens = [len(prompts[r]) for r in rows]
        ids = [prompts[r] + [0] * (width - n) for r, n in zip(rows, lens)]
        logits = driver.step(ids, [0] * len(rows), lens, [[n - 1] for n in lens])
        out = [[logits[b, 0]] for b in range(len(rows))]
        for _ in range(steps):
            nxt = [[int(o[-1].argmax())] for o in out]
            logits = driver.step(nxt, lens, None, [[0]] * len(rows))
            lens = [n + 1 for n in lens]
            for b in range(len(rows)):
                out[b].append(logits[b, 0])
        return out

    batched = run([0, 1], steps=4)
    for b in (0, 1):
        np.testing.assert_allclose(np.stack(batched[b]), np.stack(run([b], steps=4)[0]), rtol=0, atol=1e-5)


def test_cpu_graph_chunked_prefill_and_idle_rows(tmp_path: Path) -> None:
    """What the daemon's CPU backend relies on: a prompt prefilled in chunks equals one prefill, and an idle
    row of a batched decode step (no new token) leaves its cache untouched and its neighbours' logits exact."""
    spec, path = build(tmp_path, "llama", "cpu")
    prompt = np.random.default_rng(3).integers(3, spec.vocab_size, 12).tolist()
    whole = Driver(path, spec, rows=1).step([prompt], [0], None, [[11]])[0, 0]
    driver = Driver(path, spec, rows=3)
    for row in range(3):  # each row prefilled on its own, as the daemon does; row 1 keeps a 5-token cache
        alone = driver.row(row)
        alone.step([prompt[:5]], [0], None, [[4]])
        if row != 1:
            chunked = alone.step([prompt[5:]], [5], None, [[6]])[0, 0]
            np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5)
    before = {name: cache[1].copy() for name, cache in driver.caches.items()}
    nxt = int(whole.argmax())
    logits = driver.step([[nxt], [0], [nxt]], [12, 0, 12], [1, 0, 1], [[0]] * 3)
    assert all(np.array_equal(driver.caches[name][1], before[name]) for name in before)
    ref = hf_logits(tmp_path, prompt + [nxt])[-1]
    for row in (0, 2):
        np.testing.assert_allclose(logits[row, 0], ref, rtol=0, atol=ATOL)


def test_float16_graph_runs_close_to_float32(tmp_path: Path) -> None:
    make_tiny_checkpoint(tmp_path, "llama")
    spec, weights = load_hf_checkpoint(tmp_path)
    logits = {}
    for dtype in ("float32", "float16"):
        model = build_graph(spec, weights, max_seq=MAX_SEQ, dtype=dtype)
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        cache_dtype = np.float16 if dtype == "float16" else np.float32
        cache = np.zeros((1, spec.num_kv_heads, MAX_SEQ, spec.head_dim), cache_dtype)
        feeds = {"input_ids": np.array([[5, 9, 77, 300, 12]]), "position_ids": np.arange(5)[None],
                 "write_indices": np.zeros(1, np.int64), "logits_indices": np.array([[4]])}
        feeds |= {f"past_{k}.{i}": cache for i in range(spec.num_layers) for k in ("key", "value")}
        logits[dtype] = sess.run(["logits"], feeds)[0]
    assert logits["float16"].dtype == np.float32  # logits are float32 whatever the graph dtype
    # Half precision keeps ~3 decimal digits of logits of order 1 (observed max error ~1e-2).
    np.testing.assert_allclose(logits["float16"], logits["float32"], rtol=0, atol=5e-2)


def test_bfloat16_graph_is_valid(tmp_path: Path) -> None:
    make_tiny_checkpoint(tmp_path, "qwen3")
    spec, weights = load_hf_checkpoint(tmp_path)
    model = build_graph(spec, weights, max_seq=MAX_SEQ, dtype="bfloat16")
    onnx.checker.check_model(model, full_check=True)
    cache_type = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}["past_key.0"]
    assert cache_type == onnx.TensorProto.BFLOAT16


def test_graph_uses_only_standard_ops_and_stores_tied_embedding_once(tmp_path: Path) -> None:
    make_tiny_checkpoint(tmp_path, "llama_tied")
    spec, weights = load_hf_checkpoint(tmp_path)
    model = build_graph(spec, weights, max_seq=MAX_SEQ)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 24)]
    assert all(n.domain == "" for n in model.graph.node)
    vocab_sized = [t.name for t in model.graph.initializer if spec.vocab_size in t.dims]
    assert vocab_sized == ["model.embed_tokens.weight"]


def test_bfloat16_checkpoint_loads_as_float32(tmp_path: Path) -> None:
    make_tiny_checkpoint(tmp_path / "fp32", "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    _, weights = load_hf_checkpoint(tmp_path / "bf16")
    w = weights["model.layers.0.self_attn.q_proj.weight"]
    expected = model.model.layers[0].self_attn.q_proj.weight.float().detach().numpy()
    assert w.dtype == np.float32 and np.array_equal(w, expected)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    make_tiny_checkpoint(tmp_path, "gpt2")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_hf_checkpoint(tmp_path)


def test_checkpoint_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_checkpoint(tmp_path)
    make_tiny_checkpoint(tmp_path, "llama")
    files = list(tmp_path.glob("*.safetensors"))
    for f in files:
        f.rename(f.with_suffix(".bak"))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_hf_checkpoint(tmp_path)
    for f in files:
        f.with_suffix(".bak").rename(f)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="model.layers.2.input_layernorm.weight"):
        load_hf_checkpoint(tmp_path)


def test_spec_reads_old_rope_format_and_refuses_what_the_graph_cannot_do() -> None:
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    # transformers 4 layout: rope_theta and rope_scaling {"type": ...} at the top level.
    spec = spec_from_hf_config(base | {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (spec.rope_theta, spec.rope_scaling) == (5e5, {"factor": 2.0, "rope_type": "linear"})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        spec_from_hf_config(base | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    # Qwen2 with the window in only its upper layers would need a mask per layer.
    qwen = base | {"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 8,
                   "max_window_layers": 1}
    with pytest.raises(UnsupportedModelError, match="only some layers"):
        spec_from_hf_config(qwen)
    assert spec_from_hf_config(qwen | {"max_window_layers": 0}).sliding_window == 8


def test_save_graph_puts_weights_in_one_data_file_and_keeps_the_model(tmp_path: Path) -> None:
    make_tiny_checkpoint(tmp_path, "qwen3")
    model = build_graph(*load_hf_checkpoint(tmp_path), max_seq=MAX_SEQ)
    before = model.SerializeToString()
    (tmp_path / "out").mkdir()
    onnx_path, data_path = save_graph(model, tmp_path / "out" / "model.onnx")
    assert model.SerializeToString() == before  # the in-memory model still holds its weights
    assert onnx_path.stat().st_size < 64 * 1024 < data_path.stat().st_size
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    loaded = onnx.load(onnx_path)  # reads the data file back
    assert loaded.graph.node == model.graph.node
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert [t.name for t in loaded.graph.initializer] == list(arrays)
    assert all(np.array_equal(onnx.numpy_helper.to_array(t), arrays[t.name]) for t in loaded.graph.initializer)
