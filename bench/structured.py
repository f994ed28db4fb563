"""Structured output's cost: per-token mask time, and decode tokens/s with and without a JSON-schema constraint.

Drives the engine directly (no gRPC) on the demo model's bundle at batch 1 and 8. Each round runs the constrained
requests first (temperature 1.0, fixed seeds; each ends where its JSON is complete), then the same number of free
requests with exactly the lengths the constrained ones had (ignore_eos), so both decode the same batch shapes for the
same number of steps. Only steps without a prefill count. On a shared machine the tokens/s of single runs swing
with the load; the json/free column is the median of each round's own ratio. Also: compile time of every schema of the test suite
(tests/test_structured.py) and of the largest one, the tokenizer's one-time conversion, and a cache hit.

    python bench/structured.py [--bundle B] [--new-tokens 96] [--rounds 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from bundle_format.bundle import load_bundle  # noqa: E402
from daemon.backend_onnx import create_cpu_backend  # noqa: E402
from daemon.engine import Engine  # noqa: E402
from daemon.lifecycle import warm_up  # noqa: E402
from daemon.sampling import SamplingParams  # noqa: E402
from daemon.sequence import Sequence  # noqa: E402
from daemon.structured_output import GrammarCompiler, GrammarSpec, GrammarState  # noqa: E402
from daemon.tokenizer import Tokenizer  # noqa: E402

# The in-vehicle example's schema (docs/structured-output.md): a climate command.
CLIMATE = {"type": "object", "properties": {
    "zone": {"enum": ["front", "rear", "driver", "passenger"]},
    "celsius": {"type": "integer", "minimum": 16, "maximum": 30},
    "fan": {"type": "integer", "minimum": 0, "maximum": 7},
    "reason": {"type": "string", "maxLength": 60},
    "seats": {"type": "array", "maxItems": 4, "items": {
        "type": "object", "properties": {"seat": {"enum": ["driver", "passenger", "rear-left", "rear-right"]},
                                          "heat": {"type": "integer", "minimum": 0, "maximum": 3}},
        "required": ["seat", "heat"], "additionalProperties": False}}},
    "required": ["zone", "celsius", "fan", "reason", "seats"], "additionalProperties": False}
PROMPT = ("Reply with a JSON object for the climate system: zone, celsius, fan, reason, seats. "
          "The driver says: make it warmer in the back and heat the rear seats.")


class MaskClock:
    """Time spent in GrammarState.mask and .advance (the whole per-token cost of a constraint)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._mask, self._advance = GrammarState.mask, GrammarState.advance
        clock = self

        def mask(state, logits):
            t = time.perf_counter()
            clock._mask(state, logits)
            clock.seconds += time.perf_counter() - t
            clock.calls += 1

        def advance(state, token):
            t = time.perf_counter()
            clock._advance(state, token)
            clock.seconds += time.perf_counter() - t

        GrammarState.mask, GrammarState.advance = mask, advance


def run(engine: Engine, seqs: list[Sequence], clock: MaskClock) -> dict:
    """Submit seqs together and step the engine until they end: decode-only steps' time, tokens and mask time."""
    for s in seqs:
        s.sink = lambda ev: None
        engine.submit(s)
    step_s = tokens = mask_s = 0.0
    while any(s in engine.running or s in engine.scheduler.waiting for s in seqs):
        mask_before = clock.seconds
        t = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - t
        stats = engine.runner.stats
        if stats.prefilled == 0 and stats.decoded:
            step_s += elapsed
            tokens += stats.decoded
            mask_s += clock.seconds - mask_before
    return {"step_s": step_s, "tokens": tokens, "mask_s": mask_s, "lengths": [len(s.output_ids) for s in seqs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.bundle:
        path = Path(args.bundle)
    else:
        from edgellm.cli import demo_bundle
        path = demo_bundle()
    bundle = load_bundle(path)
    tokenizer = Tokenizer.from_dir(bundle.path, extra_eos_ids=bundle.model["eos_token_ids"])
    compiler = GrammarCompiler(bundle.path / "tokenizer.json", tokenizer.eos_token_ids, tokenizer.vocab_size, 256)

    # ---- compile -----------------------------------------------------------------------------------------------
    t = time.perf_counter()
    compiler.tokenizer()
    print(f"tokenizer conversion (once per daemon, on the first constrained request): {(time.perf_counter() - t) * 1e3:.0f} ms")
    from test_structured import SCHEMAS

    suite = {**SCHEMAS, "climate (the docs' example)": CLIMATE}
    times = {}
    for name, schema in suite.items():
        t = time.perf_counter()
        compiler.compile(GrammarSpec("json_schema", json.dumps(schema)))
        times[name] = time.perf_counter() - t
    largest = max(suite, key=lambda n: len(json.dumps(suite[n])))
    print(f"compile, {len(suite)} schemas: median {statistics.median(times.values()) * 1e3:.2f} ms, "
          f"max {max(times.values()) * 1e3:.2f} ms; largest ({largest!r}, {len(json.dumps(suite[largest]))} bytes): "
          f"{times[largest] * 1e3:.2f} ms")
    spec = GrammarSpec("json_schema", json.dumps(suite[largest]))
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        compiler.state(compiler.compile(spec)).release()
    print(f"cache hit (lookup + a fresh state): {(time.perf_counter() - t) / n * 1e6:.1f} us")

    # ---- decode ------------------------------------------------------------------------------------------------
    backend = create_cpu_backend(bundle, 8, threads=args.threads)
    warm_up(backend, 8)
    engine = Engine(backend, tokenizer, bundle.context_length)
    clock = MaskClock()
    prompt = tokenizer.encode_chat([("user", PROMPT)])
    climate = compiler.compile(GrammarSpec("json_schema", json.dumps(CLIMATE)))
    print(f"{'batch':>5} {'free tok/s':>10} {'json tok/s':>10} {'json/free':>10} {'mask us/token':>13} {'mask/step':>9} "
          f"{'tokens':>6}")
    for batch in (1, 8):
        rows = []
        for r in range(-1, args.rounds):  # round -1 warms up this batch's shapes and is not counted
            seqs = [Sequence(list(prompt), SamplingParams(temperature=1.0, seed=1000 * (r + 1) + i), args.new_tokens,
                             grammar=compiler.state(climate)) for i in range(batch)]
            bound = run(engine, seqs, clock)
            free = run(engine, [Sequence(list(prompt), SamplingParams(temperature=1.0, seed=i), n, ignore_eos=True)
                                for i, n in enumerate(bound["lengths"])], clock)
            if r < 0:
                continue
            free_rate, bound_rate = free["tokens"] / free["step_s"], bound["tokens"] / bound["step_s"]
            rows.append((free_rate, bound_rate, bound_rate / free_rate, bound["mask_s"] / bound["tokens"],
                         bound["mask_s"] / bound["step_s"], bound["tokens"]))
        med = [statistics.median(col) for col in zip(*rows)]
        print(f"{batch:>5} {med[0]:>10.1f} {med[1]:>10.1f} {med[2]:>10.2f} {med[3] * 1e6:>13.1f} {med[4] * 100:>8.2f}% "
              f"{int(med[5]):>6}")


if __name__ == "__main__":
    main()
