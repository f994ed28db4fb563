"""`edgellm validate BUNDLE`: check a TensorRT bundle on its target device against ONNX Runtime on the CPU.

Compiles the engine if the bundle has none; runs fixed prompts greedily on the CPU (the bundle's graph
widened to float32, Q/DQ rounding unchanged) and feeds the same tokens to the engine (teacher forcing,
so one early difference does not derail the rest): top-1 agreement must reach the precision's
threshold. Checks that a CUDA-graph replay gives the same logits as a plain enqueue, lists the engine's
layers by input precision (warning about quantized GEMMs that did not fuse), and times prefill and decode
with and without CUDA graphs. Needs TensorRT and an NVIDIA GPU; before anything else it prints what it
found of them (probe_environment: TensorRT and its CUDA flavour, pycuda, the driver, the GPU) and what is
missing, never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MIN_TENSORRT = (10, 15)
# pip distributions of TensorRT's Python package by the CUDA major version they were built for.
_TENSORRT_WHEELS = {"tensorrt-cu13": 13, "tensorrt-cu12": 12, "tensorrt-cu13-bindings": 13, "tensorrt-cu12-bindings": 12}


@dataclass
class Environment:
    """What this machine has of the GPU path (None: not found; errors: why, by item)."""

    tensorrt: str | None = None
    tensorrt_cuda: int | None = None  # the CUDA major of a pip wheel; None for JetPack's (system) TensorRT
    pycuda: str | None = None
    driver_cuda: str | None = None  # the CUDA version the driver supports (cuDriverGetVersion)
    gpu: str | None = None
    compute_capability: tuple[int, int] | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What stops the GPU path here, each with what to do."""
        out = []
        if self.tensorrt is None:
            out.append(f"TensorRT: {self.errors.get('tensorrt', 'not installed')}; install it with "
                       f"pip install '.[tensorrt-cu13]' (driver R580+) or '.[tensorrt-cu12]', or on Jetson use "
                       f"JetPack's TensorRT from a venv made with --system-site-packages (docs/gpu.md)")
        else:
            from bundle_format.trt_plan import tensorrt_version_key

            if tensorrt_version_key(self.tensorrt)[:2] < MIN_TENSORRT:
                out.append(f"TensorRT {self.tensorrt} is older than {'.'.join(map(str, MIN_TENSORRT))}, which added "
                           f"the KV-cache update, rotary and attention layers the graph needs (JetPack 6 ships 10.3)")
            if self.tensorrt_cuda and self.driver_cuda and int(self.driver_cuda.split(".")[0]) < self.tensorrt_cuda:
                out.append(f"TensorRT's wheel is built for CUDA {self.tensorrt_cuda} but the driver supports CUDA "
                           f"{self.driver_cuda}: update the driver or install '.[tensorrt-cu{self.driver_cuda.split('.')[0]}]'")
        if self.pycuda is None:
            out.append(f"pycuda: {self.errors.get('pycuda', 'not installed')}; pip install pycuda (it has no wheels: "
                       f"it compiles against the CUDA toolkit, so nvcc and the CUDA headers must be installed)")
        if self.driver_cuda is None:
            out.append(f"NVIDIA driver: {self.errors.get('driver', 'libcuda.so.1 not found')}")
        if self.gpu is None and self.pycuda is not None and self.driver_cuda is not None:
            out.append(f"GPU: {self.errors.get('gpu', 'none found')}")
        return out

    def text(self) -> str:
        def show(value: object | None, what: str) -> str:
            return str(value) if value is not None else f"missing ({self.errors.get(what, 'not found')})"

        flavour = {None: "system package (JetPack) or unknown wheel", 12: "CUDA 12 wheel", 13: "CUDA 13 wheel"}
        cc = ".".join(map(str, self.compute_capability)) if self.compute_capability else None
        lines = [f"tensorrt: {show(self.tensorrt, 'tensorrt')}"
                 + (f" ({flavour.get(self.tensorrt_cuda, '?')})" if self.tensorrt else ""),
                 f"pycuda: {show(self.pycuda, 'pycuda')}",
                 f"NVIDIA driver (libcuda): {'CUDA ' + self.driver_cuda if self.driver_cuda else show(None, 'driver')}",
                 f"GPU: {show(self.gpu, 'gpu')}" + (f", compute capability {cc}" if cc else "")]
        problems = self.problems()
        lines += [f"missing or wrong: {p}" for p in problems] or ["all found"]
        return "\n".join(lines)


def probe_environment() -> Environment:
    """Look for TensorRT, pycuda, the driver and a GPU; never raises (what fails goes into errors)."""
    env = Environment()
    try:
        env.tensorrt = importlib.import_module("tensorrt").__version__
        env.tensorrt_cuda = next((cuda for dist, cuda in _TENSORRT_WHEELS.items() if _installed(dist)), None)
    except Exception as e:  # noqa: BLE001 - ImportError, or a TensorRT that cannot load its libraries
        env.errors["tensorrt"] = _why(e)
    try:
        from daemon.cuda_graph import driver_version

        env.driver_cuda = driver_version()
    except Exception as e:  # noqa: BLE001 - CudaGraphError: no libcuda.so.1
        env.errors["driver"] = ("libcuda.so.1 not found: no NVIDIA driver installed" if "cannot load" in str(e)
                                else _why(e))
    try:
        env.pycuda = importlib.import_module("pycuda").VERSION_TEXT
    except Exception as e:  # noqa: BLE001
        env.errors["pycuda"] = _why(e)
    if env.pycuda is None or env.driver_cuda is None:
        env.errors["gpu"] = "not checked: needs pycuda and the driver"
    else:
        try:
            import pycuda.driver as cuda

            cuda.init()
            if cuda.Device.count():
                dev = cuda.Device(0)
                env.gpu, env.compute_capability = dev.name(), tuple(dev.compute_capability())
            else:
                env.errors["gpu"] = "the driver sees no GPU"
        except Exception as e:  # noqa: BLE001
            env.errors["gpu"] = _why(e)
    return env


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _why(e: BaseException) -> str:
    return "not installed" if isinstance(e, ModuleNotFoundError) else f"{type(e).__name__}: {e}"


PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Water boils at a temperature of"]


@dataclass
class ValidationReport:
    precision: str
    agreement: float = 0.0
    min_agreement: float = 0.0
    greedy_identical: int = 0  # prompts whose free-running greedy tokens match the CPU's exactly
    prompts: int = 0
    graph_max_diff: float = 0.0
    timings_ms: dict[str, float] = field(default_factory=dict)
    cuda_graphs: str = ""
    layer_precisions: dict[str, int] = field(default_factory=dict)  # layers per input datatype
    layer_warnings: list[str] = field(default_factory=list)  # quantized GEMMs that did not fuse

    @property
    def ok(self) -> bool:
        return self.agreement >= self.min_agreement and self.graph_max_diff <= 1e-3

    def text(self) -> str:
        lines = [f"precision {self.precision}; CUDA graphs: {self.cuda_graphs}",
                 f"top-1 agreement with ONNX Runtime CPU (teacher-forced): {self.agreement:.1%} "
                 f"(threshold {self.min_agreement:.0%}); identical greedy output on {self.greedy_identical}/{self.prompts} prompts",
                 f"CUDA graph vs plain enqueue: max logit difference {self.graph_max_diff:.2e}",
                 "engine layers by input precision: "
                 + (", ".join(f"{k} {v}" for k, v in self.layer_precisions.items()) or "no detail")]
        lines += [f"warning: {w}" for w in self.layer_warnings]
        lines += [f"{name}: {ms:.2f} ms" for name, ms in self.timings_ms.items()]
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def _cpu_reference(bundle):
    """An ONNX Runtime session over the bundle's graph widened to float32."""
    import onnx

    from build_engine.graph_session import open_session
    from build_engine.graph_builder import save_graph
    from build_engine.quantize import float32_twin

    model = onnx.load(str(bundle.graph_path), load_external_data=True)
    with tempfile.TemporaryDirectory(prefix="edgellm-validate-") as tmp:
        save_graph(float32_twin(model), Path(tmp) / "model.onnx")
        return open_session(Path(tmp) / "model.onnx")


def _cpu_greedy(session, ids: list[int], n: int) -> list[int]:
    """Greedy tokens, each from a whole forward pass over the prompt and the tokens so far (no cache to trust)."""
    from build_engine.graph_session import prefill_feeds

    out: list[int] = []
    for _ in range(n):
        seq = ids + out
        logits = session.run(["logits"], prefill_feeds(session, seq, [len(seq) - 1]))[0]
        out.append(int(np.argmax(logits[0, 0])))
    return out


def greedy(backend, ids: list[int], n: int, forced: list[int] | None = None) -> list[int]:
    """n greedy tokens of `backend` (slot 0) after prompt ids. With `forced` (teacher forcing), decode step i
    takes forced[i] as its input instead of the backend's own last token, so one difference does not derail the rest."""
    out = [int(np.argmax(backend.prefill(0, ids, 0)))]
    for i in range(n - 1):
        token = out[-1] if forced is None else forced[i]
        out.append(int(np.argmax(backend.decode([0], [token], [len(ids) + i])[0])))
    return out


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def validate_bundle(path: Path, slots: int = 4, new_tokens: int = 16) -> ValidationReport:
    from build_engine.accuracy import THRESHOLDS
    from build_engine.trt_compiler import compile_bundle
    from daemon.backend_trt import TrtBackend
    from bundle_format.bundle import load_bundle
    from daemon.tokenizer import Tokenizer

    bundle = load_bundle(path)
    if not bundle.manifest.get("engine"):
        compile_bundle(path, slots=slots)
        bundle = load_bundle(path, verify=False)  # update_bundle just wrote the checksums from the bytes it wrote
    slots = min(slots, bundle.manifest["engine"]["slots"])
    precision = bundle.manifest["precision"]
    report = ValidationReport(precision, min_agreement=THRESHOLDS[precision][1], prompts=len(PROMPTS))
    tokenizer = Tokenizer.from_dir(bundle.path)
    cpu = _cpu_reference(bundle)
    gpu = TrtBackend(bundle, slots)
    try:
        _check(report, gpu, cpu, tokenizer, bundle, new_tokens)
    finally:
        gpu.close()
    return report


def _check(report: ValidationReport, gpu, cpu, tokenizer, bundle, new_tokens: int) -> None:
    from build_engine.trt_compiler import quantized_gemm_nodes
    from bundle_format.trt_plan import inspector_layers, precision_summary, unfused_quantized_gemms

    report.cuda_graphs = gpu.cuda_graphs
    layers = inspector_layers(gpu.layer_information())
    report.layer_precisions = precision_summary(layers)
    report.layer_warnings = unfused_quantized_gemms(layers, quantized_gemm_nodes(bundle.graph_path))
    agree = total = 0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        want = _cpu_greedy(cpu, ids, new_tokens)
        report.greedy_identical += greedy(gpu, ids, new_tokens) == want
        got = greedy(gpu, ids, len(want), forced=want)  # teacher forcing: the CPU's tokens go in
        agree += sum(a == w for a, w in zip(got, want))
        total += len(want)
    report.agreement = agree / total

    # Graph replay against plain enqueue on the same inputs (the step rewrites the same cache slot).
    for rows in sorted(gpu.graph_status):
        step = (list(range(rows)), [1] * rows, [3] * rows)  # slots, token ids, positions
        with_graph = gpu.decode(*step).copy()
        plain = gpu.decode_plain(*step).copy()
        report.graph_max_diff = max(report.graph_max_diff, float(np.abs(with_graph - plain).max()))
        report.timings_ms[f"decode batch {rows}, CUDA graph"] = _median_ms(lambda: gpu.decode(*step), 50)
        report.timings_ms[f"decode batch {rows}, plain enqueue"] = _median_ms(lambda: gpu.decode_plain(*step), 50)
    prompt = list(range(1, min(128, gpu.max_prefill_tokens) + 1))
    report.timings_ms[f"prefill {len(prompt)} tokens"] = _median_ms(lambda: gpu.prefill(0, prompt, 0), 10)
