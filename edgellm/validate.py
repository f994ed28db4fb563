"""`edgellm validate BUNDLE`: check a TensorRT bundle on its target device against ONNX Runtime on the CPU.

Compiles the engine if the bundle has none; runs fixed prompts greedily on the CPU (the bundle's graph
widened to float32, Q/DQ rounding unchanged) and feeds the same tokens to the engine (teacher forcing,
so one early difference does not derail the rest): top-1 agreement must reach the precision's
threshold. Checks that a CUDA-graph replay gives the same logits as a plain enqueue, and times prefill
and decode with and without CUDA graphs. Needs TensorRT and an NVIDIA GPU.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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

    @property
    def ok(self) -> bool:
        return self.agreement >= self.min_agreement and self.graph_max_diff <= 1e-3

    def text(self) -> str:
        lines = [f"precision {self.precision}; CUDA graphs: {self.cuda_graphs}",
                 f"top-1 agreement with ONNX Runtime CPU (teacher-forced): {self.agreement:.1%} "
                 f"(threshold {self.min_agreement:.0%}); identical greedy output on {self.greedy_identical}/{self.prompts} prompts",
                 f"CUDA graph vs plain enqueue: max logit difference {self.graph_max_diff:.2e}"]
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
    report.cuda_graphs = gpu.cuda_graphs
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
        report.timings_ms[f"decode batch {rows}, plain enqueue"] = _median_ms(lambda: gpu.decode_plain(b), 50)
    prompt = list(range(1, min(128, gpu.max_prefill_tokens) + 1))
    report.timings_ms[f"prefill {len(prompt)} tokens"] = _median_ms(lambda: gpu.prefill(0, prompt, 0), 10)
    gpu.close()
    return report
