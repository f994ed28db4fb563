"""The stages of bench/gpu_smoke.sh, one per subcommand, each a separate process so one failure (or a pycuda
abort) cannot hide the others. Exit status: 0 pass, 1 fail, 3 skipped (what it needs is missing).

  python bench/gpu_smoke.py STAGE WORK_DIR
STAGES: versions, parse, build, aliases, logits, graph-replay, throughput. Output goes to stdout (the report).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SKIP = 3
PRECISIONS = ("fp16", "int8")  # the tiny model's bundles (fp8 needs compute capability 8.9: see throughput)
SLOTS = 2
PROMPT = [5, 17, 33, 2, 9, 41, 12, 7, 19, 23, 4, 30]


def _need_tensorrt() -> None:
    from build_engine.trt_compiler import tensorrt_available

    missing = tensorrt_available()
    if missing:
        print(f"skipped: {missing}")
        sys.exit(SKIP)


def _bundles(work: Path) -> dict[str, Path]:
    return {p: work / f"tiny-{p}" for p in PRECISIONS}


def versions(work: Path) -> int:
    from edgellm.validate import probe_environment

    env = probe_environment()
    print(env.text())
    return 0 if not env.problems() else 1


def parse(work: Path) -> int:
    """Tiny bundles (head_dim 64) built on the CPU, then parsed by TensorRT: which layer types came out."""
    _need_tensorrt()
    import tensorrt as trt

    from build_engine import accuracy
    from build_engine.build import build_bundle
    from build_engine.trt_compiler import network_layer_types, parse_network
    from tiny_models import make_tiny_checkpoint

    ckpt = work / "tiny-checkpoint"
    if not ckpt.exists():
        make_tiny_checkpoint(ckpt, "llama", head_dim=64, hidden_size=128)
    accuracy.THRESHOLDS.update({k: (2.0, 0.0) for k in accuracy.THRESHOLDS})  # a random model: the engine is tested
    ok = True
    for precision, path in _bundles(work).items():
        if not path.exists():
            build_bundle(ckpt, path, target="tensorrt", precision=precision, context_length=64)
        logger = trt.Logger(trt.Logger.WARNING)
        network, _parser = parse_network(trt, trt.Builder(logger), logger, path / "model.onnx")
        types = network_layer_types(network)
        counts = {t: types.count(t) for t in sorted(set(types))}
        print(f"{precision}: {len(types)} layers: {json.dumps(counts)}")
        want = ["KV_CACHE", "ROTARY", "ATTENTION"] + (["QUANTIZE", "DEQUANTIZE"] if precision != "fp16" else [])
        missing = [w for w in want if not any(w in t for t in types)]
        if missing:
            print(f"{precision}: FAIL: no layer of kind {', '.join(missing)} (the parser decomposed the graph)")
            ok = False
    return 0 if ok else 1


def build(work: Path) -> int:
    _need_tensorrt()
    from build_engine.trt_compiler import compile_bundle, engine_layer_report

    for precision, path in _bundles(work).items():
        if not path.exists():
            print(f"skipped: {path} not built (the parse stage failed)")
            return SKIP
        t0 = time.monotonic()
        compile_bundle(path, slots=SLOTS, max_prefill_tokens=16, force=True)
        print(f"{precision}: compiled in {time.monotonic() - t0:.0f} s\n{engine_layer_report(path)}")
    return 0


def _engine_bundles(work: Path) -> dict:
    from bundle_format.bundle import load_bundle

    out = {}
    for precision, path in _bundles(work).items():
        if not (path / "model.engine").exists():
            print(f"skipped: {path} has no engine (the build stage failed)")
            sys.exit(SKIP)
        out[precision] = load_bundle(path)
    return out


def aliases(work: Path) -> int:
    _need_tensorrt()
    import tensorrt as trt

    from bundle_format.trt_plan import EngineRefused, check_kv_aliases, kv_cache_pairs

    ok = True
    for precision, bundle in _engine_bundles(work).items():
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            (bundle.path / "model.engine").read_bytes())
        answer = {out: engine.get_aliased_input_tensor(out) for out in kv_cache_pairs(bundle.kv_cache.num_layers)}
        try:
            check_kv_aliases(answer, bundle.kv_cache.num_layers)
            print(f"{precision}: every present_* output is aliased to its past_* input")
        except EngineRefused as e:
            print(f"{precision}: FAIL: {e}")
            ok = False
    return 0 if ok else 1


def _cpu_logits(bundle, ids: list[int]) -> np.ndarray:
    """ONNX Runtime on the CPU, the bundle's graph widened to float32: logits of every position of ids."""
    from build_engine.graph_session import prefill_feeds
    from edgellm.validate import _cpu_reference

    sess = _cpu_reference(bundle)
    return sess.run(["logits"], prefill_feeds(sess, ids, list(range(len(ids)))))[0][0]


def logits(work: Path) -> int:
    """Prefill slots 0 and 1 (slot 1: the odd row whose address alignment issue 19 fixed), decode batch 1 with
    plain enqueue, and compare each with ONNX Runtime on the CPU."""
    _need_tensorrt()
    from daemon.backend_trt import TrtBackend

    ok = True
    for precision, bundle in _engine_bundles(work).items():
        ref = _cpu_logits(bundle, PROMPT + [PROMPT[0]])
        backend = TrtBackend(bundle, SLOTS)
        try:
            for slot in (0, 1):
                got = {"prefill": backend.prefill(slot, PROMPT, 0).copy(),
                       "decode": backend.decode_plain([slot], [PROMPT[0]], [len(PROMPT)])[slot].copy()}
                for what, want in (("prefill", ref[len(PROMPT) - 1]), ("decode", ref[len(PROMPT)])):
                    diff = float(np.abs(got[what] - want).max() / np.abs(want).max())
                    same = int(np.argmax(got[what])) == int(np.argmax(want))
                    good = diff < (0.02 if precision == "fp16" else 0.1) and same
                    ok &= good
                    print(f"{precision} slot {slot} {what}: max |diff| / max |logit| {diff:.2e}, "
                          f"top-1 {'same' if same else 'DIFFERENT'}: {'ok' if good else 'FAIL'}")
        finally:
            backend.close()
    return 0 if ok else 1


def graph_replay(work: Path) -> int:
    _need_tensorrt()
    from daemon.backend_trt import TrtBackend

    ok = True
    for precision, bundle in _engine_bundles(work).items():
        backend = TrtBackend(bundle, SLOTS)
        try:
            print(f"{precision}: CUDA graphs {backend.cuda_graphs}")
            ok &= all(s == "captured" for s in backend.graph_status.values())
            backend.prefill(0, PROMPT, 0)
            backend.prefill(1, PROMPT, 0)
            for rows in sorted(backend.graph_status):
                step = (list(range(rows)), [PROMPT[0]] * rows, [len(PROMPT)] * rows)
                replay = backend.decode(*step).copy()
                plain = backend.decode_plain(*step).copy()
                diff = float(np.abs(replay - plain).max())
                ok &= diff <= 1e-3
                print(f"{precision} decode batch {rows}: graph replay vs plain enqueue max |diff| {diff:.2e}")
        finally:
            backend.close()
    return 0 if ok else 1


def throughput(work: Path) -> int:
    """The demo model's decode tokens/s per precision against the memory-bandwidth roofline (weights read once
    per token). Needs the demo model's GGUF (installed edgellm-demo-model, or EDGELLM_DEMO_WHEEL_DIR)."""
    _need_tensorrt()
    import os

    import pycuda.driver as cuda

    from build_engine.build import build_bundle
    from build_engine.demo_model import demo_gguf_path
    from build_engine.trt_compiler import compile_bundle, gpu_identity
    from bundle_format.bundle import load_bundle
    from daemon.backend_trt import TrtBackend

    try:
        wheel_dir = os.environ.get("EDGELLM_DEMO_WHEEL_DIR")
        gguf = demo_gguf_path(REPO / ".cache" / "demo_model", wheel_dir=Path(wheel_dir) if wheel_dir else None)
    except Exception as e:  # noqa: BLE001 - offline machine without the demo model
        print(f"skipped: no demo model ({type(e).__name__}: {e})")
        return SKIP
    cuda.init()
    dev = cuda.Device(0)
    attr = cuda.device_attribute
    bandwidth = 2 * dev.get_attribute(attr.MEMORY_CLOCK_RATE) * 1e3 * dev.get_attribute(attr.GLOBAL_MEMORY_BUS_WIDTH) / 8
    name, cc = gpu_identity()
    print(f"{name}: peak memory bandwidth {bandwidth / 1e9:.0f} GB/s (from clock and bus width)")
    deadline = time.monotonic() + float(os.environ.get("EDGELLM_SMOKE_THROUGHPUT_S", "360"))
    for precision in ("fp16", "fp8", "int8"):
        if precision == "fp8" and tuple(cc) < (8, 9):
            print(f"fp8: skipped (compute capability {cc[0]}.{cc[1]} < 8.9)")
            continue
        if time.monotonic() > deadline:
            print(f"{precision}: skipped (out of time)")
            continue
        path = work / f"demo-{precision}"
        if not (path / "model.engine").exists():
            build_bundle(gguf, path, target="tensorrt", precision=precision, context_length=1024, force=True)
            compile_bundle(path, slots=1, max_prefill_tokens=128, force=True)
        bundle = load_bundle(path)
        backend = TrtBackend(bundle, 1)
        try:
            backend.prefill(0, PROMPT, 0)
            n, pos = 200, len(PROMPT)
            t0 = time.perf_counter()
            for i in range(n):
                backend.decode([0], [PROMPT[0]], [pos + i])
            tps = n / (time.perf_counter() - t0)
        finally:
            backend.close()
        weights = (path / "model.engine").stat().st_size
        if bandwidth > 0:
            roofline = bandwidth / weights
            print(f"{precision}: decode batch 1 {tps:.0f} tokens/s; roofline {roofline:.0f} tokens/s "
                  f"(engine {weights / 2**20:.0f} MiB read per token); {tps / roofline:.0%} of it")
        else:  # some drivers (integrated GPUs) report no memory clock
            print(f"{precision}: decode batch 1 {tps:.0f} tokens/s; roofline unknown (no memory clock reported)")
    return 0


STAGES = {"versions": versions, "parse": parse, "build": build, "aliases": aliases, "logits": logits,
          "graph-replay": graph_replay, "throughput": throughput}

if __name__ == "__main__":
    stage, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    sys.exit(STAGES[stage](work))
