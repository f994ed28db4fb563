"""The second stage of a TensorRT build, run on the target device: the bundle's graph -> a serialized engine.

TensorRT's ONNX parser reads model.onnx (its Attention, TensorScatter and RotaryEmbedding nodes map to
TensorRT's attention, KV-cache update and rotary layers from 10.15 on) into a strongly typed network:
the graph's float type and its Q/DQ nodes decide every layer's precision (TensorRT 11 has no precision
flags; on 10.x the STRONGLY_TYPED flag asks for the same). Optimization profiles (bundle_format/trt_plan.py):
prefill (one row, 1..max_prefill_tokens tokens) and one static decode profile per decode batch size
(one token per row); the KV-cache dims are static but for the batch. A timing cache kept beside the bundle (or where
--timing-cache says) makes rebuilds fast. The engine and its record (TensorRT version, GPU name and
compute capability, profiles, slots) go into the bundle; engines are not portable across either.

Written against the TensorRT >= 10.15 / 11.x Python API; not run on this project's build machines
(no TensorRT, no GPU): tests/gpu/test_tensorrt.py exercises it where both exist.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from bundle_format.bundle import load_bundle
from bundle_format.decode_buckets import decode_buckets
from bundle_format.trt_plan import (ENGINE_FILE, check_precision_supported, default_max_prefill_tokens, format_cc,
                                     inspector_layers, optimization_profiles, precision_summary, profiles_to_manifest,
                                     tensorrt_version_key, unfused_quantized_gemms)

log = logging.getLogger("edgellm.compile")

MIN_TENSORRT = (10, 15)


class CompileError(Exception):
    """The engine cannot be compiled here; the message says why."""


def tensorrt_available() -> str | None:
    """None when TensorRT and a CUDA GPU can be used here, else why not (for the operator)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("TensorRT is not installed (on the target device: pip install 'edgellm[tensorrt-cu13]' for a "
                "CUDA 13 driver (R580+), 'edgellm[tensorrt-cu12]' for CUDA 12, or on Jetson JetPack's own TensorRT "
                "in a venv made with --system-site-packages; docs/gpu.md)")
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA GPU found"
    except Exception as e:  # noqa: BLE001 — ImportError, or the driver's own error without a GPU
        return f"CUDA is not usable here: {e}"
    return None


def gpu_identity(device: int = 0) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of a GPU, through pycuda (device queries need no context)."""
    import pycuda.driver as cuda

    cuda.init()
    dev = cuda.Device(device)
    return dev.name(), tuple(dev.compute_capability())


def default_timing_cache(bundle: Path, tensorrt_version: str, gpu_name: str) -> Path:
    """Beside the bundle, one per TensorRT version and GPU model (timings are valid for those only)."""
    gpu = "".join(c if c.isalnum() else "-" for c in gpu_name).strip("-")
    return Path(bundle).resolve().parent / f".edgellm-timing-trt{tensorrt_version}-{gpu}.cache"


def compile_bundle(path: Path, *, slots: int = 8, max_prefill_tokens: int | None = None,
                   timing_cache: Path | None = None, optimization_level: int = 3, force: bool = False) -> Path:
    """Compile the bundle's graph into model.engine for this GPU and record it in the manifest; returns its path."""
    import tensorrt as trt

    from build_engine.bundle_writer import update_bundle

    bundle = load_bundle(path)
    if bundle.manifest.get("target") != "tensorrt":
        raise CompileError(f"{path} was built for target {bundle.manifest.get('target')!r}; rebuild it with --target tensorrt")
    if bundle.manifest.get("engine") and not force:
        raise CompileError(f"{path} already holds an engine (use --force to compile again)")
    if tensorrt_version_key(trt.__version__)[:2] < MIN_TENSORRT:
        raise CompileError(f"TensorRT {trt.__version__} lacks the attention, KV-cache update and rotary layers the graph "
                           f"needs; install TensorRT >= {'.'.join(map(str, MIN_TENSORRT))} (JetPack 6's 10.3 is too old)")
    gpu_name, cc = gpu_identity()
    check_precision_supported(bundle.manifest["precision"], cc, gpu_name)
    layout = bundle.kv_cache
    max_prefill = max_prefill_tokens or default_max_prefill_tokens(bundle.context_length)
    profiles = optimization_profiles(layout, slots, max_prefill)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = parse_network(trt, builder, logger, bundle.graph_path)  # the parser must outlive the network
    decomposable = make_attention_decomposable(trt, network)
    log.info("%d attention layers made decomposable", decomposable)
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector's per-layer precisions
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(path, trt.__version__, gpu_name)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, False):  # False: refuse a cache from another GPU or TensorRT
        log.warning("timing cache %s does not match this GPU or TensorRT; starting a new one", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), False)

    t0 = time.monotonic()
    log.info("compiling %s for %s (compute capability %s) with TensorRT %s ...", path, gpu_name, format_cc(cc),
             trt.__version__)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompileError("TensorRT could not build the engine (see its messages above)")
    seconds = time.monotonic() - t0
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    engine_bytes = bytes(memoryview(serialized))

    try:  # a report about the engine: its failure must not cost the engine
        layers = inspector_layers(engine_information(trt, logger, engine_bytes, profiles[1]))
        warnings = unfused_quantized_gemms(layers, quantized_gemm_nodes(bundle.graph_path))
    except Exception as e:  # noqa: BLE001
        layers, warnings = [], [f"could not read the engine's layer information: {type(e).__name__}: {e}"]
    for w in warnings:
        log.warning("%s", w)

    record: dict[str, Any] = {
        "file": ENGINE_FILE,
        "tensorrt_version": trt.__version__,
        "gpu": {"name": gpu_name, "compute_capability": format_cc(cc)},
        "slots": slots,
        "max_prefill_tokens": max_prefill,
        "decode_batch_sizes": decode_buckets(slots),
        "profiles": profiles_to_manifest(profiles),
        "optimization_level": optimization_level,
        "build_seconds": round(seconds, 1),
        "layer_precisions": precision_summary(layers),  # layers per input datatype (decode batch 1)
        "unfused_quantized_gemms": warnings,
    }
    update_bundle(path, {ENGINE_FILE: engine_bytes}, {"engine": record})
    log.info("wrote %s (%.0f MiB) in %.0f s", ENGINE_FILE, len(engine_bytes) / (1 << 20), seconds)
    return Path(path) / ENGINE_FILE


def parse_network(trt: Any, builder: Any, logger: Any, graph_path: Path) -> tuple[Any, Any]:
    """The bundle's graph as a strongly typed TensorRT network (the parser is returned too: it must outlive the network)."""
    # Deprecated and ignored in TensorRT 11 (always strongly typed); required on 10.x to get the same.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(graph_path)):  # reads model.onnx.data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompileError(f"TensorRT's ONNX parser refused {Path(graph_path).name}: {errors}")
    return network, parser


def network_layer_types(network: Any) -> list[str]:
    """Each layer's TensorRT type name (KV_CACHE_UPDATE, ROTARY_EMBEDDING, ATTENTION_INPUT, QUANTIZE, ...)."""
    return [network.get_layer(i).type.name for i in range(network.num_layers)]


def make_attention_decomposable(trt: Any, network: Any) -> int:
    """Set IAttention.decomposable on every attention the parser made; returns how many.

    An IAttention is not a layer itself: the network holds its boundary layers (ATTENTION_INPUT /
    ATTENTION_OUTPUT), whose `attention` property is the IAttention."""
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.ATTENTION_INPUT:
            continue
        layer.__class__ = trt.IAttentionInputLayer  # get_layer returns the ILayer base: downcast to reach .attention
        layer.attention.decomposable = True
        count += 1
    return count


def engine_information(trt: Any, logger: Any, engine_bytes: bytes, decode_shapes: dict) -> str:
    """The engine inspector's JSON, with a decode profile's shapes set so every layer's format is resolved."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        return "{}"
    context = engine.create_execution_context()
    context.set_optimization_profile_async(1, 0)
    for name, (_lo, opt, _hi) in decode_shapes.items():
        context.set_input_shape(name, opt)
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


def quantized_gemm_nodes(graph_path: Path) -> list[str]:
    """Names of the graph's MatMul nodes whose weight comes through a DequantizeLinear (the quantized GEMMs)."""
    import onnx

    model = onnx.load(os.fspath(graph_path), load_external_data=False)
    return quantized_gemms(model.graph.node)


def quantized_gemms(nodes: Any) -> list[str]:
    dequantized = {out for n in nodes if n.op_type == "DequantizeLinear" for out in n.output}
    return [n.name for n in nodes if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in dequantized]


def engine_layer_report(path: Path) -> str:
    """What `edgellm compile` prints after a build: layers per input precision and unfused quantized GEMMs."""
    engine = load_bundle(path, verify=False).manifest.get("engine", {})
    summary = ", ".join(f"{k} {v}" for k, v in engine.get("layer_precisions", {}).items()) or "no detail"
    lines = [f"engine layers by input precision: {summary}"]
    lines += [f"warning: {w}" for w in engine.get("unfused_quantized_gemms", [])]
    return "\n".join(lines)
