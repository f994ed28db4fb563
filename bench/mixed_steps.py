"""Mixed steps through the daemon: one stream and 8 streams of 128-token prompts, new prompts arriving while
others decode, with engine.mixed_steps on and off and several prefill_chunk_tokens, in alternating rounds.

    python bench/mixed_steps.py BUNDLE [BUNDLE ...] [--rounds 2] [--variants off:32,on:16,on:32,on:64]

Each round starts a fresh daemon per (bundle, variant) and runs `edgellm bench`'s levels (edgellm/bench.py)
against it; the table gives each figure's median over the rounds with its min..max.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm.bench import run_level  # noqa: E402
from edgellm.client import NO_RETRIES, Client  # noqa: E402


def serve(bundle: str, mixed: bool, chunk: int, folder: Path, slots: int) -> tuple[subprocess.Popen, str]:
    sock = folder / "d.sock"
    cfg = folder / "config.yaml"
    cfg.write_text(f"engine:\n  slots: {slots}\n  prefill_chunk_tokens: {chunk}\n  mixed_steps: {str(mixed).lower()}\n")
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", "--bundle", bundle, "--config", str(cfg),
                             "--unix", str(sock), "--tcp", "", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="off:32,on:16,on:32,on:64")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per stream")
    args = ap.parse_args()
    variants = [(v.split(":")[0] == "on", int(v.split(":")[1])) for v in args.variants.split(",")]
    results: dict[tuple, list] = {}
    for rnd in range(args.rounds):
        for bundle in args.bundles:
            for mixed, chunk in variants:
                with tempfile.TemporaryDirectory() as tmp:
                    proc, address = serve(bundle, mixed, chunk, Path(tmp), 8)
                    try:
                        with Client(address, retry=NO_RETRIES) as c:
                            vocab = c.model(timeout=10).vocab_size
                        asyncio.run(run_level(address, 1, 8, 2, 1, vocab))  # warm-up
                        for streams in (1, 8):
                            r = asyncio.run(run_level(address, streams, args.prompt_tokens, args.new_tokens,
                                                      args.requests, vocab, 0))
                            results.setdefault((bundle, mixed, chunk, streams), []).append(r)
                            print(f"round {rnd} {Path(bundle).name} mixed={mixed} chunk={chunk} streams={streams}: "
                                  f"{r.total_tokens_per_s:.1f} tok/s, TTFT p50 {r.ttft_p50_ms:.0f} ms, "
                                  f"ITL p50 {r.itl_p50_ms:.1f} p99 {r.itl_p99_ms:.1f} ms", flush=True)
                    finally:
                        proc.terminate()
                        proc.wait(30)

    def fig(values: list[float], digits: int = 1) -> str:
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"

    print("\n| bundle | steps | chunk | 1-stream tok/s | 8-stream tok/s | 8 vs 1 | TTFT p50 (8) | ITL p50 (8) "
          "| ITL p99 (8) | p99/p50 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bundle in args.bundles:
        for mixed, chunk in variants:
            one, eight = results[(bundle, mixed, chunk, 1)], results[(bundle, mixed, chunk, 8)]
            ratio = [e.total_tokens_per_s / o.total_tokens_per_s for o, e in zip(one, eight)]
            tail = [e.itl_p99_ms / e.itl_p50_ms for e in eight]
            print(f"| {Path(bundle).name} | {'mixed' if mixed else 'two calls'} | {chunk} "
                  f"| {fig([o.total_tokens_per_s for o in one])} | {fig([e.total_tokens_per_s for e in eight])} "
                  f"| {fig(ratio, 2)}× | {fig([e.ttft_p50_ms for e in eight], 0)} ms "
                  f"| {fig([e.itl_p50_ms for e in eight])} ms | {fig([e.itl_p99_ms for e in eight])} ms "
                  f"| {fig(tail, 2)} |")


if __name__ == "__main__":
    main()
