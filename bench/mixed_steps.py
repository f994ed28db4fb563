"""Mixed steps through the daemon: one stream and 8 streams of 128-token prompts, new prompts arriving while
others decode, with engine.mixed_steps on and off and several prefill_chunk_tokens, in alternating rounds.

    python bench/mixed_steps.py BUNDLE [BUNDLE ...] [--rounds 2] [--variants off:32,on:16,on:32,on:64]
        [--baseline TREE:BUNDLE:BUNDLE...]

A variant is STEPS:CHUNK[:nospec]: mixed steps on or off, engine.prefill_chunk_tokens, and ":nospec" for
speculative decoding off (it is on by default and speeds up a lone stream, which moves the 8-vs-1 ratio).

Each round starts a fresh daemon per (bundle, variant) and runs `edgellm bench`'s levels (edgellm/bench.py)
against it; the table gives each figure's median over the rounds with its min..max. --baseline adds, per bundle
in the same order, a daemon of another source tree (e.g. the code before mixed steps, with that tree's build of
the bundle) as the variant "base".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm.bench import run_level  # noqa: E402
from edgellm.client import NO_RETRIES, Client  # noqa: E402


def serve(bundle: str, mixed: bool | None, chunk: int, folder: Path, slots: int,
          tree: str | None = None, speculative: bool = True) -> tuple[subprocess.Popen, str]:
    """A daemon of this tree (or of `tree`, whose config knows no mixed_steps: mixed is None) on a socket."""
    sock = folder / "d.sock"
    cfg = folder / "config.yaml"
    text = f"engine:\n  slots: {slots}\n  prefill_chunk_tokens: {chunk}\n"
    if mixed is not None:
        text += f"  mixed_steps: {str(mixed).lower()}\n"
    if not speculative:
        text += "speculative:\n  enabled: false\n"
    cfg.write_text(text)
    env = dict(os.environ, PYTHONPATH=tree or str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", "--bundle", bundle, "--config", str(cfg),
                             "--unix", str(sock), "--tcp", "", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tree)
    address = f"unix:{sock}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode}")
        try:
            with Client(address, retry=NO_RETRIES) as c:
                c.model(timeout=2)
            return proc, address
        except Exception:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the daemon did not start")


STEPS = {None: "before (base tree)", False: "two calls", True: "mixed"}


def step_times(bundle: str, chunks: list[int], rounds: int, position: int = 200) -> None:
    """The backend alone, alternating within each round: 8 decode rows, 8 decode rows + a chunk in one forward
    pass, and the same as two calls (the chunk, then the decode batch); median ms with min..max over rounds."""
    from bundle_format.bundle import load_bundle
    from daemon.backend import StepRow
    from daemon.backend_onnx import create_cpu_backend

    backend = create_cpu_backend(load_bundle(bundle, verify=False), 9)
    decode = (list(range(8)), [5] * 8, [position] * 8)
    cases = {"decode 8": lambda c: backend.decode(*decode)}
    for c in chunks:
        tokens = list(range(100, 100 + c))
        rows = [StepRow(s, [5], position) for s in range(8)] + [StepRow(8, tokens, position)]
        cases[f"8 + {c}, one pass"] = lambda c, rows=rows: backend.forward(rows)
        cases[f"8 + {c}, two calls"] = lambda c, t=tokens: (backend.prefill(8, t, position), backend.decode(*decode))
    times: dict[str, list[float]] = {name: [] for name in cases}
    for f in cases.values():
        f(0)
    for _ in range(rounds):
        for name, f in cases.items():
            t = time.perf_counter()
            f(0)
            times[name].append((time.perf_counter() - t) * 1e3)
    print(f"{Path(bundle).name}, backend step times (ms), median (min..max) of {rounds} alternating rounds")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} ({min(ts):.1f}..{max(ts):.1f}) |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="off:32,on:16,on:32,on:64")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per stream")
    ap.add_argument("--stream-interval-ms", type=int, default=0,
                    help="what the requests ask for (0: every token at once; -1: the server's default)")
    ap.add_argument("--baseline", help="TREE:BUNDLE[:BUNDLE...]: another tree's daemon, its bundles in order")
    ap.add_argument("--step-times", action="store_true", help="time the backend's steps alone (no daemon)")
    args = ap.parse_args()
    if args.step_times:
        for bundle in args.bundles:
            step_times(bundle, [16, 32, 64], max(args.rounds, 5))
        return
    variants: list[tuple[bool | None, int, bool]] = [
        ({"on": True, "off": False}[v.split(":")[0]], int(v.split(":")[1]), not v.endswith(":nospec"))
        for v in args.variants.split(",")]
    tree, base_bundles = None, {}
    if args.baseline:
        tree, *others = args.baseline.split(":")
        base_bundles = dict(zip(args.bundles, others))
        variants.insert(0, (None, 32, True))
    results: dict[tuple, list] = {}
    for rnd in range(args.rounds):
        for bundle in args.bundles:
            for mixed, chunk, spec in variants:
                with tempfile.TemporaryDirectory() as tmp:
                    if mixed is None:
                        proc, address = serve(base_bundles[bundle], None, chunk, Path(tmp), 8, tree)
                    else:
                        proc, address = serve(bundle, mixed, chunk, Path(tmp), 8, speculative=spec)
                    try:
                        with Client(address, retry=NO_RETRIES) as c:
                            vocab = c.model(timeout=10).vocab_size
                        asyncio.run(run_level(address, 1, 8, 2, 1, vocab))  # warm-up
                        for streams in (1, 8):
                            r = asyncio.run(run_level(address, streams, args.prompt_tokens, args.new_tokens,
                                                      args.requests, vocab,
                                                      None if args.stream_interval_ms < 0 else args.stream_interval_ms))
                            results.setdefault((bundle, mixed, chunk, spec, streams), []).append(r)
                            print(f"round {rnd} {Path(bundle).name} {STEPS[mixed]} chunk={chunk} "
                                  f"{'' if spec else 'no speculation '}streams={streams}: "
                                  f"{r.total_tokens_per_s:.1f} tok/s, TTFT p50 {r.ttft_p50_ms:.0f} ms, "
                                  f"ITL p50 {r.itl_p50_ms:.1f} p99 {r.itl_p99_ms:.1f} ms", flush=True)
                    finally:
                        proc.terminate()
                        proc.wait(30)

    def fig(values: list[float], digits: int = 1) -> str:
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"

    # "decode" is the streams' pace once they decode: streams x 1000 / mean ITL (prompts' time left out), where
    # "tok/s" is every generated token over the wall time, prefills and the last stragglers included.
    print("\n| bundle | steps | chunk | 1-stream tok/s | 8-stream tok/s | 8 vs 1 | decode 8 vs 1 | TTFT p50 (8) "
          "| ITL p50 (8) | ITL p99 (8) | p99/p50 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for bundle in args.bundles:
        for mixed, chunk, spec in variants:
            one, eight = results[(bundle, mixed, chunk, spec, 1)], results[(bundle, mixed, chunk, spec, 8)]
            ratio = [e.total_tokens_per_s / o.total_tokens_per_s for o, e in zip(one, eight)]
            pace = [8 * o.itl_mean_ms / e.itl_mean_ms for o, e in zip(one, eight)]
            tail = [e.itl_p99_ms / e.itl_p50_ms for e in eight]
            print(f"| {Path(bundle).name} | {STEPS[mixed]}{'' if spec else ', no speculation'} | {chunk} "
                  f"| {fig([o.total_tokens_per_s for o in one])} | {fig([e.total_tokens_per_s for e in eight])} "
                  f"| {fig(ratio, 2)}× | {fig(pace, 2)}× | {fig([e.ttft_p50_ms for e in eight], 0)} ms "
                  f"| {fig([e.itl_p50_ms for e in eight])} ms | {fig([e.itl_p99_ms for e in eight])} ms "
                  f"| {fig(tail, 2)} |")


if __name__ == "__main__":
    main()
