"""Tiny random-weight Hugging Face checkpoints (float32, with the tiny test tokenizer) for every supported variant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer

from tiny_tokenizer import write_tiny_tokenizer

# Small, but with grouped-query attention (4 query heads share 2 kv heads) and head_dim 16.
_BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
             tie_word_embeddings=False,
             # 0.15 instead of 0.02: peaked attention and spread-out logits, so a wrong rotation, mask slot
             # or bias changes the logits well beyond the parity tolerance.
             initializer_range=0.15)

# variant -> (config class, model class, config changes)
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama_linear_rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # original context 64 puts the 16 head dims' wavelengths (6 .. 20000) in all three llama3 bands.
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    # Mistral's default window, far beyond any test context: no effect, and the graph adds no window mask.
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    # A window smaller than the tested sequence, so the sliding mask matters.
    "mistral_swa": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),  # unsupported, for the error path
}


def make_tiny_checkpoint(folder: Path, arch: str, **config_overrides: Any) -> Path:
    """Write a random-weight model of variant `arch` (see ARCHS) plus the tiny tokenizer into folder."""
    folder = Path(folder)
    config_cls, model_cls, changes = ARCHS[arch]
    vocab_size = write_tiny_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    special = dict(vocab_size=vocab_size, bos_token_id=None, eos_token_id=tok.token_to_id("<|im_end|>"),
                   pad_token_id=tok.token_to_id("<|endoftext|>"))
    if arch == "gpt2":
        kwargs = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256) | special
    else:
        kwargs = _BASE | special | changes
    config = getattr(transformers, config_cls)(**(kwargs | config_overrides))
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():
        # Default init leaves norms at 1 and biases at 0, which would hide a missing norm or bias in the graph.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    return folder
