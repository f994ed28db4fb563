"""Read a local Hugging Face checkpoint folder (config.json + *.safetensors) into a ModelSpec and numpy weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from build_engine.graph_builder import check_weights
from build_engine.model_spec import CheckpointError, ModelSpec, spec_from_hf_config


def load_hf_checkpoint(folder: Path) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """(spec, weights) with Hugging Face tensor names and shapes; bfloat16 tensors come back as float32."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    spec = spec_from_hf_config(config)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files (other weight formats are not supported)")
    weights: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                # numpy cannot compute in bfloat16 (safetensors hands out ml_dtypes.bfloat16); float32 is exact.
                weights[name] = t.astype(np.float32) if t.dtype.name == "bfloat16" else t
    if spec.tie_word_embeddings:
        # Some tied checkpoints still carry a copy of the embedding as lm_head; the graph uses the embedding.
        weights.pop("lm_head.weight", None)
    check_weights(spec, weights)
    return spec, weights
