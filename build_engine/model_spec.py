"""The architecture-neutral description of a decoder-only transformer that the graph builder needs.

Both checkpoint readers (Hugging Face folders and GGUF files) produce a `ModelSpec` plus a dict of
numpy weights named as in Hugging Face checkpoints (``model.layers.0.self_attn.q_proj.weight``, with
linear weights shaped [out_features, in_features]), so everything after loading is shared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Hugging Face `architectures` entry -> our family name. SmolLM checkpoints are LlamaForCausalLM.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# config.json without `architectures`: fall back to model_type.
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class CheckpointError(ValueError):
    """The checkpoint cannot be read: missing or inconsistent files, config keys or tensors."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint describes a model this build step cannot turn into a graph."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # family: llama | mistral | qwen2 | qwen3
    hf_architecture: str  # e.g. LlamaForCausalLM
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling dict with rope_type linear|llama3
    # q/k/v projections carry a bias (Qwen2); for Llama/Qwen3 config.attention_bias also biases o_proj.
    attention_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)


def _rope_from_config(config: dict[str, Any], hf_arch: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None for plain RoPE) from either config layout."""
    rope_theta = config.get("rope_theta")
    rope_scaling = config.get("rope_scaling")
    # transformers >= 5 writes rope_theta and the scaling into one `rope_parameters` dict.
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        rope_theta = params.get("rope_theta", rope_theta)
        rope_scaling = dict(params)
    if not rope_scaling:
        return float(rope_theta if rope_theta is not None else 10000.0), None
    rope_type = rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported rope scaling type {rope_type!r} in {hf_arch}")
    partial = rope_scaling.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UnsupportedModelError(f"unsupported partial_rotary_factor {partial} in {hf_arch}")
    theta = float(rope_theta if rope_theta is not None else 10000.0)
    if rope_type == "default":
        return theta, None
    drop = ("rope_theta", "type", "partial_rotary_factor")
    return theta, {k: v for k, v in rope_scaling.items() if k not in drop} | {"rope_type": rope_type}


def _sliding_window(config: dict[str, Any], family: str, num_layers: int, hf_arch: str) -> int | None:
    """The one sliding window every layer uses, or None; refuses per-layer mixes (one mask serves all layers)."""
    window = config.get("sliding_window")
    if family == "mistral":  # Mistral applies its window in every layer
        return int(window) if window else None
    if family not in ("qwen2", "qwen3") or not config.get("use_sliding_window") or not window:
        return None
    # Qwen: layers from max_window_layers on use the window (transformers writes this out as layer_types).
    layer_types = config.get("layer_types") or [
        "sliding_attention" if i >= config.get("max_window_layers", num_layers) else "full_attention"
        for i in range(num_layers)
    ]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return int(window)
    raise UnsupportedModelError(f"{hf_arch} with sliding-window attention in only some layers is not supported")


def spec_from_hf_config(config: dict[str, Any]) -> ModelSpec:
    """Read a Hugging Face config.json dict; refuse anything we do not support, by name."""
    archs = config.get("architectures") or []
    hf_arch = archs[0] if archs else _MODEL_TYPES.get(config.get("model_type"), config.get("model_type", "<none>"))
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {hf_arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    family = SUPPORTED_ARCHITECTURES[hf_arch]
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"unsupported activation {act!r} in {hf_arch} (only silu)")
    if config.get("mlp_bias"):
        raise UnsupportedModelError(f"{hf_arch} with mlp_bias is not supported")
    try:
        num_heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        num_layers = int(config["num_hidden_layers"])
        vocab_size = int(config["vocab_size"])
        intermediate = int(config["intermediate_size"])
    except KeyError as e:
        raise CheckpointError(f"config.json of {hf_arch} lacks {e.args[0]!r}") from None
    head_dim = config.get("head_dim") or hidden // num_heads
    rope_theta, rope_scaling = _rope_from_config(config, hf_arch)
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    sliding = _sliding_window(config, family, num_layers, hf_arch)
    return ModelSpec(
        architecture=family,
        hf_architecture=hf_arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        rope_scaling=rope_scaling,
        # Qwen2 always has q/k/v biases (its config has no switch); Llama/Qwen3 follow attention_bias.
        attention_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=family == "qwen3",
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        sliding_window=sliding,
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )
