"""Decode tokens/s at batch 1 and time to first token: through the daemon vs ONNX Runtime driven directly.

Both run the same bundle in the same run, in rounds (each row once per round, every other round in
reverse order), so the ratios show what the daemon (scheduler, sampler, detokenizer, gRPC over a Unix
socket) costs on top of the graph itself. A ratio is the median of the rounds' ratios, with quartiles.

    python bench/daemon_overhead.py [--bundle B] [--prompt-tokens 128] [--new-tokens 128] [--repeats 15]
                                    [--threads N] [--stream-interval-ms MS]

Without --bundle it uses the demo model's bundle (built once if needed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np

from bundle_format.bundle import load_bundle
from daemon.backend_onnx import create_cpu_backend
from daemon.huge_pages import reexec_with_huge_pages
from daemon.thread_placement import default_placement, pin_current_thread
from edgellm.client import NO_RETRIES, Client

T = TypeVar("T")


def bundle_path(arg: str | None) -> Path:
    """--bundle, else the demo model's bundle (built once if needed)."""
    if arg:
        return Path(arg)
    from edgellm.cli import demo_bundle

    return demo_bundle()


def random_prompt(bundle, n: int) -> list[int]:
    """n token ids away from the special ones, the same for every runtime of a run."""
    return np.random.default_rng(0).integers(100, int(bundle.model["vocab_size"]) - 100, n).tolist()


@contextlib.contextmanager
def serving(path: Path, slots: int = 1, threads: int = 0, prefill_chunk_tokens: int | None = None) -> Iterator[str]:
    """`edgellm serve` on a temporary Unix socket (ONNX Runtime on `threads` threads, 0: one per allowed
    CPU; engine.prefill_chunk_tokens if given); yields its address once ready and warmed up."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "bench.sock")
        config = os.path.join(tmp, "config.yaml")
        # The prefix cache off: every round sends the same prompt, which would otherwise come from the cache.
        chunk = f"  prefill_chunk_tokens: {prefill_chunk_tokens}\n" if prefill_chunk_tokens else ""
        Path(config).write_text(f"engine:\n  threads: {threads}\n{chunk}prefix_cache:\n  enabled: false\n")
        cmd = [sys.executable, "-m", "edgellm", "serve", "--bundle", str(path), "--config", config, "--unix", sock,
               "--slots", str(slots), "--log-level", "warning"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            for line in proc.stdout:
                if "ready on" in line:
                    break
            through_daemon(f"unix:{sock}", [101] * 8, 4)  # warm-up
            yield f"unix:{sock}"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


class DirectLoop:
    """ONNX Runtime driven by a bare greedy loop on one backend kept for the whole run (as the daemon keeps
    its own), its threads placed as the daemon places them (daemon/thread_placement.py)."""

    def __init__(self, bundle, threads: int = 0):
        self.placement = default_placement(threads)
        self.backend = create_cpu_backend(bundle, slots=1, threads=threads, placement=self.placement)
        self.backend.prefill(0, [101], 0)  # warm-up

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        """(time to first token s, decode tokens/s)."""
        backend = self.backend
        before = os.sched_getaffinity(0)
        if self.placement:
            pin_current_thread(self.placement.engine_cpu)
        try:
            t0 = time.perf_counter()
            token = int(np.argmax(backend.prefill(0, prompt, 0)))
            ttft = time.perf_counter() - t0
            t1 = time.perf_counter()
            for i in range(new_tokens - 1):
                token = int(np.argmax(backend.decode([0], [token], [len(prompt) + i])[0]))
            return ttft, (new_tokens - 1) / (time.perf_counter() - t1)
        finally:
            os.sched_setaffinity(0, before)


def daemon_rows(stream_interval_ms: int) -> dict[str, dict]:
    """The daemon's rows of a comparison: name -> what its requests ask for: the server's defaults, every token at
    once, no speculative decoding (the other runtimes have none: it is the like-for-like row, since how much
    speculation gains depends on the text), and tokens this far apart when asked."""
    return {"daemon": {}, "daemon per token": {"stream_interval_ms": 0},
            "daemon, no speculation": {"stream_interval_ms": 0, "speculative": False},
            **({f"daemon {stream_interval_ms}ms": {"stream_interval_ms": stream_interval_ms}}
               if stream_interval_ms else {})}


def default_interval_line(address: str) -> str:
    """What the "daemon" row's requests get: the server's default stream interval (ModelInfo)."""
    with Client(address, retry=NO_RETRIES) as client:
        ms = client.model(timeout=10).stream_interval_ms
    return f"daemon = the server's default: {f'tokens in chunks every {ms} ms' if ms else 'every token at once'}"


def through_daemon(address: str, prompt: list[int], new_tokens: int, **options) -> tuple[float, float]:
    """(time to first token s, decode tokens/s) as a client sees them: a new connection each time, its setup
    included in the time to first token (as docs/benchmarks.md's figures were taken). options: the request's
    (daemon_rows)."""
    with Client(address, retry=NO_RETRIES) as client:
        t0 = time.perf_counter()
        arrivals = []
        for chunk in client.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, timeout=600, **options):
            if chunk.token_ids:
                arrivals += [time.perf_counter()] * len(chunk.token_ids)
    assert len(arrivals) == new_tokens, len(arrivals)
    return arrivals[0] - t0, (new_tokens - 1) / (arrivals[-1] - arrivals[0])


def main() -> None:
    # Huge pages as the daemon runs with them, for every runtime of the run alike (children inherit them).
    reexec_with_huge_pages([os.path.abspath(__file__), *sys.argv[1:]])
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime's threads, both sides (0: one per allowed CPU)")
    ap.add_argument("--stream-interval-ms", type=int, default=0,
                    help="also measure the daemon with its requests asking for tokens batched this far apart")
    args = ap.parse_args()
    path = bundle_path(args.bundle)
    bundle = load_bundle(path, verify=False)
    prompt = random_prompt(bundle, args.prompt_tokens)

    daemons = daemon_rows(args.stream_interval_ms)
    loop = DirectLoop(bundle, args.threads)
    with serving(path, threads=args.threads) as address:
        default_line = default_interval_line(address)
        # Each side idles while the other runs.
        results = alternating_rounds([*daemons, "direct"], args.repeats, lambda row: (
            loop.run(prompt, args.new_tokens) if row == "direct" else
            through_daemon(address, prompt, args.new_tokens, **daemons[row])))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; bundle {path.name} "
          f"({bundle.model['hf_architecture']}, {bundle.manifest['precision']}); prompt {args.prompt_tokens}, "
          f"new {args.new_tokens}, {args.repeats} rounds; {default_line}")
    for row, runs in results.items():
        print(f"  {row:16s} time to first token {statistics.median(r[0] for r in runs) * 1000:8.1f} ms   "
              f"decode {statistics.median(r[1] for r in runs):7.1f} tokens/s   (medians)")
    for row in daemons:
        pairs = list(zip(results[row], results["direct"]))  # (daemon, direct) of each round
        print(f"  {row}/direct: decode tokens/s {spread([d[1] / x[1] for d, x in pairs])}; "
              f"time to first token {spread([d[0] / x[0] for d, x in pairs])}")


def alternating_rounds(rows: list[str], rounds: int, run_once: Callable[[str], T]) -> dict[str, list[T]]:
    """run_once(row) for every row once per round, seconds apart, every other round in reverse order (the
    machine's speed drifts over minutes on a shared host; this way a drift favours no row): each row's
    results, round by round."""
    results: dict[str, list[T]] = {row: [] for row in rows}
    for r in range(rounds):
        for row in rows if r % 2 == 0 else rows[::-1]:
            results[row].append(run_once(row))
    return results


def spread(ratios: list[float]) -> str:
    """The median of per-round ratios, with the quartiles where there are enough rounds to have them."""
    if len(ratios) < 4:
        return f"{statistics.median(ratios):.3f}"
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return f"{q2:.3f} (quartiles {q1:.3f}-{q3:.3f})"


if __name__ == "__main__":
    main()
