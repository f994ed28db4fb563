"""Read a llama.cpp GGUF file into the same `(ModelSpec, weights)` pair the Hugging Face reader produces.

Weights come back as float32 numpy arrays named and oriented as in a Hugging Face checkpoint, whatever
GGML type they were stored in; the tokenizer is rebuilt as a `tokenizers` JSON from the file's
`tokenizer.ggml.*` metadata.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor, TokenType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from build_engine.graph_builder import check_weights
from build_engine.model_spec import CheckpointError, ModelSpec, UnsupportedModelError

# general.architecture -> (our family, Hugging Face architecture). llama.cpp writes Mistral models as "llama"
# (and, like llama.cpp, we then run them without a sliding window).
GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
# llama.cpp's converter reorders Q/K rows for these (its "normal" RoPE rotates adjacent pairs); Qwen uses NEOX RoPE.
_PERMUTED_QK = {"llama"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_SPECIAL_TYPES = (TokenType.CONTROL, TokenType.UNKNOWN)  # token types that become special added tokens

# Pre-tokenizer regexes, as the Hugging Face tokenizer.json of each family spells them (facts, from llama.cpp's
# llama-vocab.cpp and the transformers tokenizers). Keys are `tokenizer.ggml.pre` values.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")  # numbers in groups of up to three digits
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell"}  # each digit alone, then GPT-2's regex
_GPT2 = {"gpt-2", "gpt2", "olmo", "mpt", "jais"}
_SPLITS = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT}


@dataclass
class GgufCheckpoint:
    spec: ModelSpec
    weights: dict[str, np.ndarray]  # Hugging Face names and orientation, float32; empty if loaded without weights
    tokenizer_json: str  # a complete tokenizers JSON
    tokenizer_config: dict[str, Any] = field(default_factory=dict)  # as in a HF tokenizer_config.json


def read_gguf_spec(path: Path) -> ModelSpec:
    """The model's spec from the file's metadata, without touching the weights."""
    reader = GGUFReader(path)
    return _spec(_metadata(reader), {t.name: t for t in reader.tensors})


def load_gguf(path: Path, *, with_weights: bool = True) -> GgufCheckpoint:
    """Spec, float32 weights (dequantized one tensor at a time) and tokenizer of a GGUF file."""
    reader = GGUFReader(path)  # memory-maps the file; parsing the metadata takes seconds for a 50k vocabulary
    meta = _metadata(reader)
    spec = _spec(meta, {t.name: t for t in reader.tensors})
    tokenizer_json, tokenizer_config = _tokenizer(meta)
    weights = _weights(reader, spec) if with_weights else {}
    return GgufCheckpoint(spec, weights, tokenizer_json, tokenizer_config)


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    return {name: f.contents() for name, f in reader.fields.items()}


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


# ---------------------------------------------------------------------------------------------- spec


def _spec(meta: dict[str, Any], tensors: dict[str, ReaderTensor]) -> ModelSpec:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    family, hf_arch = GGUF_ARCHITECTURES[arch]

    def hp(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"GGUF file lacks the {arch}.{key} metadata")
        return value

    if int(hp("expert_count", 0)) > 0:
        raise UnsupportedModelError(f"unsupported GGUF model: mixture-of-experts {arch} ({hp('expert_count')} experts)")
    hidden = int(hp("embedding_length"))
    num_heads = int(hp("attention.head_count"))
    head_dim = int(hp("attention.key_length", hidden // num_heads))
    if int(hp("attention.value_length", head_dim)) != head_dim:
        raise UnsupportedModelError(f"unsupported GGUF model: {arch} with key and value head sizes that differ")
    if int(hp("rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModelError(f"unsupported GGUF model: {arch} with partial rotary embeddings")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab_size = len(tokens)
    elif f"{arch}.vocab_size" in meta:
        vocab_size = int(meta[f"{arch}.vocab_size"])
    else:
        vocab_size = int(tensors["token_embd.weight"].shape[1])
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and int(token_id) not in eos_ids:
            eos_ids.append(int(token_id))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    theta = _f32(hp("rope.freq_base", 10000.0))
    return ModelSpec(
        architecture=family,
        hf_architecture=hf_arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(hp("feed_forward_length")),
        num_layers=int(hp("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(hp("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=_f32(hp("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        max_position_embeddings=int(hp("context_length")),
        rope_scaling=_rope_scaling(meta, arch, tensors.get("rope_freqs.weight"), theta),
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm=family == "qwen3",
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=tuple(eos_ids),
    )


def _rope_scaling(
    meta: dict[str, Any], arch: str, rope_freqs: ReaderTensor | None, theta: float
) -> dict[str, Any] | None:
    linear = meta.get(f"{arch}.rope.scale_linear")  # the key older converters wrote
    kind = meta.get(f"{arch}.rope.scaling.type", "linear" if linear else "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(meta.get(f"{arch}.rope.scaling.factor") or linear)}
    if kind != "none":
        raise UnsupportedModelError(f"unsupported rope scaling type {kind!r} in GGUF {arch} model")
    if rope_freqs is None:
        return None
    # llama.cpp's converter does not write Llama 3's rope_scaling; it bakes the per-frequency divisors into a
    # `rope_freqs` tensor. Every Llama 3.x model uses low/high frequency factors 1 and 4 over an 8192 context,
    # so recover those and check that they reproduce the tensor exactly rather than guess.
    divisors = np.array(dequantize(rope_freqs.data, rope_freqs.tensor_type), dtype=np.float64).reshape(-1)
    scaling = {
        "rope_type": "llama3",
        "factor": float(round(divisors.max(), 4)),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if not np.allclose(_llama3_divisors(scaling, theta, 2 * divisors.size), divisors, rtol=1e-3):
        raise UnsupportedModelError(f"unsupported GGUF {arch} model: rope_freqs that are not Llama 3's scaling")
    return scaling


def _llama3_divisors(scaling: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """What each rotary frequency is divided by under Hugging Face's llama3 rope scaling."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = np.clip((old_context / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)


# ------------------------------------------------------------------------------------------- weights


def _weights(reader: GGUFReader, spec: ModelSpec) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue  # already folded into spec.rope_scaling
        name = _hf_name(tensor.name)
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UnsupportedModelError(
                f"unsupported GGML type {tensor.tensor_type.name} for tensor {tensor.name}"
            ) from None
        if tensor.tensor_type == GGMLQuantizationType.F32:
            array = np.array(array)  # F32 "dequantizes" to a view of the memory-mapped file: own the data
        # GGUF lists dimensions innermost first, so reversed they are numpy's (and Hugging Face's) shape.
        array = array.astype(np.float32, copy=False).reshape([int(d) for d in reversed(tensor.shape)])
        if spec.architecture in _PERMUTED_QK and ".q_proj." in name:
            array = _unpermute_rows(array, spec.num_heads)
        elif spec.architecture in _PERMUTED_QK and ".k_proj." in name:
            array = _unpermute_rows(array, spec.num_kv_heads)
        weights[name] = array
    check_weights(spec, weights)  # every tensor the graph needs is there, in Hugging Face shape
    return weights


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_TENSOR_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_TENSORS:
        raise UnsupportedModelError(f"unsupported GGUF tensor {gguf_name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (each head's two rotary halves interleaved) back to HF's half-split order."""
    half = w.shape[0] // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# ----------------------------------------------------------------------------------------- tokenizer


def _tokenizer(meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens)
        add_bos_default = False
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, types)
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    elif kind is None:
        raise CheckpointError("GGUF file has no tokenizer (no tokenizer.ggml.model metadata)")
    else:
        raise UnsupportedModelError(f"unsupported GGUF tokenizer model {kind!r}; supported: gpt2, llama")
    if len(set(tokens)) != len(tokens):
        raise UnsupportedModelError("unsupported GGUF tokenizer: its token list repeats tokens")

    # CONTROL (and UNKNOWN) tokens are special (skipped when decoding); USER_DEFINED ones are plain added tokens
    # that llama.cpp still matches whole. Both must be added, or the text they appear in would be cut into pieces.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in _SPECIAL_TYPES]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == TokenType.USER_DEFINED]
    )

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(token_id)] if token_id is not None and int(token_id) < len(tokens) else None

    config: dict[str, Any] = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    # As in a Hugging Face tokenizer.json, the post-processor adds what add_bos_token/add_eos_token promise.
    bos = [config["bos_token"]] if config["add_bos_token"] and config["bos_token"] is not None else []
    eos = [config["eos_token"]] if config["add_eos_token"] and config["eos_token"] is not None else []
    if bos or eos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=[*bos, "$A", *eos],
            pair=[*bos, "$A", *eos, *bos, "$B:1", *eos],
            special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(bos + eos)],
        )
    return tokenizer.to_str(), config


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str]) -> Tokenizer:
    """GPT-2 style byte-level BPE; the tokens are already spelled in the byte-to-unicode alphabet."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLITS)
    if pre in _DIGITS_THEN_GPT2:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2:
        pre_tokenizer = byte_level
    elif pre in _SPLITS:
        split = pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated")
        pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        raise UnsupportedModelError(f"unsupported GGUF pre-tokenizer {pre!r} for a byte-level BPE vocabulary")
    # Llama 3's tokenizer looks a whole pre-token up in the vocabulary before merging (so does llama.cpp).
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in ("llama-bpe", "llama3")))
    if pre in ("qwen2", "deepseek-r1-qwen"):
        tokenizer.normalizer = normalizers.NFC()  # as in Qwen2's own tokenizer.json
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    """SentencePiece BPE (Llama 2, Mistral, TinyLlama): "▁" for spaces, unknown characters as <0xXX> byte tokens."""
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise CheckpointError("GGUF SentencePiece tokenizer lacks tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, types, scores), unk_token=unk, fuse_unk=True,
                   byte_fallback=True)
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        # llama.cpp puts a space before the text and before text that follows a special token, as the
        # "legacy" Hugging Face Llama/Mistral tokenizer.json does with this normalizer.
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a normal token into two normal tokens,
    best-scored result first (SentencePiece merges the pair whose result scores highest)."""
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TokenType.NORMAL}
    ranked = []
    for token, i in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, normal[left], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]
