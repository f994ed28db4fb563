"""The build step end to end: checkpoint -> ONNX graph -> bundle."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from build_engine.bundle_writer import describe_io, weight_bytes_per_token, write_bundle
from build_engine.model_spec import ModelSpec

log = logging.getLogger("edgellm.build")

# What each (target, precision) builds: the graph's float type (also the KV cache's) and the quantization
# applied to it. TensorRT int8/fp8: Q/DQ nodes from build_engine/quantize.py on a float16 graph.
# CPU: ONNX Runtime's fused decoder graph (build_engine/cpu_graph.py) in float32; int8/int4 make its linear
# layers weight-only MatMulNBits (build_engine/weight_quant.py).
BUILD_PLANS: dict[tuple[str, str], tuple[str, str | None]] = {
    ("cpu", "fp32"): ("float32", None),
    ("cpu", "int8"): ("float32", "weights-int8"),
    ("cpu", "int4"): ("float32", "weights-int4"),
    ("tensorrt", "fp16"): ("float16", None),
    ("tensorrt", "bf16"): ("bfloat16", None),
    ("tensorrt", "int8"): ("float16", "int8"),
    ("tensorrt", "fp8"): ("float16", "fp8"),
}
TARGETS = tuple(dict.fromkeys(t for t, _ in BUILD_PLANS))
DEFAULT_CONTEXT_LENGTH = 2048
GRAPH_FILE = "model.onnx"


class BuildError(Exception):
    """The build cannot go on; the message says why (and, where possible, what to do)."""


def _hf_tokenizer_files(folder: Path) -> tuple[str, dict[str, Any]]:
    """tokenizer.json text and a tokenizer_config dict holding the chat template, from an HF folder."""
    tok = folder / "tokenizer.json"
    if not tok.is_file():
        raise BuildError(f"{folder}: no tokenizer.json (a fast tokenizer file is required)")
    cfg_path = folder / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    # Newer transformers keep the chat template in its own file.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file() and not config.get("chat_template"):
        config["chat_template"] = jinja.read_text()
    return tok.read_text(), config


def _generation_eos(folder: Path, spec: ModelSpec) -> ModelSpec:
    """Add the eos ids of generation_config.json (chat models often end turns with another token)."""
    gen = folder / "generation_config.json"
    if not gen.is_file():
        return spec
    eos = json.loads(gen.read_text()).get("eos_token_id")
    extra = eos if isinstance(eos, list) else [eos] if eos is not None else []
    ids = tuple(dict.fromkeys([*spec.eos_token_ids, *extra]))
    return dataclasses.replace(spec, eos_token_ids=ids)


def load_checkpoint(model: Path) -> tuple[ModelSpec, dict, str, dict[str, Any], str]:
    """Read a HF folder or a GGUF file: (spec, weights, tokenizer.json text, tokenizer config, format)."""
    model = Path(model)
    if model.is_file() and model.suffix == ".gguf":
        from build_engine.gguf_checkpoint import load_gguf

        ckpt = load_gguf(model)
        return ckpt.spec, ckpt.weights, ckpt.tokenizer_json, ckpt.tokenizer_config, "gguf"
    if model.is_dir():
        from build_engine.hf_checkpoint import load_hf_checkpoint

        spec, weights = load_hf_checkpoint(model)
        tok_json, tok_config = _hf_tokenizer_files(model)
        return _generation_eos(model, spec), weights, tok_json, tok_config, "huggingface"
    raise BuildError(f"{model}: expected a Hugging Face checkpoint folder or a .gguf file")


def build_bundle(model: Path, out: Path, *, target: str = "cpu", precision: str = "fp32",
                 context_length: int = DEFAULT_CONTEXT_LENGTH, force: bool = False,
                 calibration_text: str | None = None, signing_key: Path | None = None, signer: str = "",
                 kv_cache: str | None = None) -> Path:
    """Build the bundle for `model` into folder `out`; returns its path.

    kv_cache: "int8" keeps the KV cache in 8 bits (CPU int8/int4 builds, build_engine/kv_quant.py); None keeps it
    in the graph's float type.

    calibration_text: text whose activations set INT8/FP8 scales (default: the project's calibration text).
    signing_key: a PEM Ed25519 private key that signs the bundle (bundle_format/signature.py), read before the build."""
    from build_engine.graph_builder import save_graph

    if target not in TARGETS:
        raise BuildError(f"unknown target {target!r}; this build supports: {', '.join(TARGETS)}")
    if (target, precision) not in BUILD_PLANS:
        choices = [p for t, p in BUILD_PLANS if t == target]
        raise BuildError(f"precision {precision!r} is not available for target {target}; choose from: {', '.join(choices)}")
    if kv_cache is not None:
        from build_engine.kv_quant import KV_CACHE_DTYPES

        if kv_cache not in KV_CACHE_DTYPES:
            raise BuildError(f"KV cache {kv_cache!r} is not available; choose from: {', '.join(KV_CACHE_DTYPES)}")
        if BUILD_PLANS[(target, precision)][1] is None or target != "cpu":
            raise BuildError(f"an {kv_cache} KV cache is built for the cpu target's int8 and int4 precisions (their "
                             f"accuracy check covers it), not for {target} {precision}")
    if context_length < 16:
        raise BuildError(f"context length {context_length} is too small (at least 16)")
    if Path(out).exists() and not force:
        raise BuildError(f"{out} already exists (use --force to replace it)")
    sign = None
    if signing_key is not None:  # a bad key fails now, not after a long build
        from bundle_format.signature import load_private_key, sign_bundle

        key = load_private_key(Path(signing_key))
        sign = lambda folder: sign_bundle(folder, key, signer)  # noqa: E731
    t0 = time.monotonic()
    spec, weights, tok_json, tok_config, source_format = load_checkpoint(model)
    log.info("read %s checkpoint %s (%s, %d layers) in %.1fs", source_format, model, spec.hf_architecture,
             spec.num_layers, time.monotonic() - t0)
    # One extra position: the TensorRT graph's idle rows of a batched step write there (the CPU graph's idle
    # rows write nothing, but both keep one cache layout).
    max_seq = context_length + 1
    dtype, quantization = BUILD_PLANS[(target, precision)]
    if target == "tensorrt":  # every slot's cache row must start on a 256-byte boundary (setTensorAddress)
        from bundle_format.trt_plan import aligned_max_seq

        max_seq = aligned_max_seq(max_seq, spec.num_kv_heads, spec.head_dim, 4 if dtype == "float32" else 2)
    extra_manifest: dict[str, Any] = {}
    if target == "tensorrt":
        from build_engine.trt_build import prepare_tensorrt_graph

        graph, extra_manifest = prepare_tensorrt_graph(spec, weights, tok_json, precision, dtype, quantization,
                                                       max_seq, calibration_text)
    elif quantization:
        from build_engine.weight_quant import prepare_cpu_graph

        graph, extra_manifest = prepare_cpu_graph(spec, weights, tok_json, precision, max_seq, kv_cache)
    else:
        from build_engine.cpu_graph import build_cpu_graph

        graph = build_cpu_graph(spec, weights, max_seq=max_seq)
    del weights

    def payload(folder: Path) -> None:
        save_graph(graph, folder / GRAPH_FILE)
        (folder / "tokenizer.json").write_text(tok_json)
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1, ensure_ascii=False))

    manifest = {
        "source": {"path": str(Path(model).resolve()), "name": Path(model).name, "format": source_format},
        "target": target,
        "precision": precision,
        "model": spec.to_dict(),
        "graph": {
            "file": GRAPH_FILE,
            "format": "onnx",
            "opset": next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
            "weight_bytes_per_token": weight_bytes_per_token(graph),
            "inputs": describe_io(graph.graph.input),
            "outputs": describe_io(graph.graph.output),
            "kv_cache": {"num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads, "max_seq": max_seq,
                         "head_dim": spec.head_dim, "dtype": kv_cache or dtype,
                         "inputs": [f"past_{kv}.{i}" for i in range(spec.num_layers) for kv in ("key", "value")],
                         "outputs": [f"present_{kv}.{i}" for i in range(spec.num_layers) for kv in ("key", "value")]},
        },
        "tokenizer": {"file": "tokenizer.json", "config": "tokenizer_config.json"},
        **extra_manifest,
    }
    path = write_bundle(out, payload, manifest, force=force, sign=sign)
    log.info("wrote bundle %s in %.1fs", path, time.monotonic() - t0)
    return path
