"""edgellm's daemon beside llama.cpp's llama-server under concurrent streams: same model, same bit width, same load.

    bash bench/setup_comparisons.sh                     # once: .venv-bench with llama-server and llama-cpp-python
    .venv/bin/python bench/serve_compare.py              # the demo model, int8 (= Q8_0), 1, 2, 4, 8 streams
    .venv/bin/python bench/serve_compare.py --model .cache/bench/llama-360m --no-accuracy-gate

Both servers run at once on this machine, each with --slots parallel sequences (llama-server: `-np`, continuous
batching, `-c` = slots x the bundle's context so every slot gets the same context as the daemon's) and every core
for its threads. At each concurrency level, N client streams each send --requests-per-stream requests one after
the other: a fresh random --prompt-tokens prompt (token ids, the same list for both servers; no prefix is ever
reused), --new-tokens new tokens, greedy, end-of-sequence ignored, every token streamed as it is made. Each server
is driven over its own protocol from this one Python client: edgellm over gRPC on its Unix socket (edgellm.client,
through edgellm/bench.py's per-request timing), llama-server over HTTP (its /completion endpoint, server-sent
events, a thread per stream). Per level and round: total generated tokens/s (all streams, first request sent to
last token), time to first token and inter-token latency p50/p99 (a chunk of n tokens gives each 1/n of the gap
before it). Rounds alternate the order of the two servers; every figure is the median over rounds with its spread, and the
throughput ratio is the median of each round's ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare import CACHE, _cpu_name, cpu_flags, edgellm_bundle, gguf_file, spread  # noqa: E402
from daemon_overhead import serving  # noqa: E402

from bundle_format.bundle import load_bundle  # noqa: E402
from daemon.huge_pages import reexec_with_huge_pages  # noqa: E402

LLAMA_SERVER = ROOT / ".venv-bench" / "bin" / "llama-server"
RUNTIMES = ("edgellm", "llama-server")
# (time to first token, inter-token gaps, tokens) of one request, in seconds
Timing = tuple[float, list[float], int]


@contextlib.contextmanager
def llama_server(gguf: Path, slots: int, context: int, threads: int) -> Iterator[str]:
    """llama-server on a free loopback port with `slots` parallel sequences of `context` tokens each; yields its URL
    once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(LLAMA_SERVER), "-m", str(gguf), "-np", str(slots), "-c", str(slots * context), "-t", str(threads),
           "-tb", str(threads), "--cont-batching", "--host", "127.0.0.1", "--port", str(port)]
    print("  $", " ".join(cmd), flush=True)
    log = open(CACHE / "llama-server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"llama-server exited ({proc.returncode}): see {CACHE / 'llama-server.log'}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("llama-server did not answer /health within 300 s")
            time.sleep(0.2)
        # Warm-up, as `serving` warms the daemon: its weights are mmap-ed and paged in by the first request.
        body = json.dumps({"prompt": [101] * 8, "n_predict": 4}).encode()
        urllib.request.urlopen(urllib.request.Request(url + "/completion", body,
                                                      {"Content-Type": "application/json"}), timeout=300).read()
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


class Pace:
    """Times one stream: a chunk of n tokens gives each of them 1/n of the time since the previous chunk."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first = self.last = 0.0
        self.gaps: list[float] = []
        self.tokens = 0

    def chunk(self, n: int) -> None:
        if not n:
            return
        now = time.perf_counter()
        if self.tokens:
            self.gaps += [(now - self.last) / n] * n
        else:
            self.first, self.gaps = now, [0.0] * (n - 1)
        self.last, self.tokens = now, self.tokens + n

    def result(self) -> Timing:
        return self.first - self.t0, self.gaps, self.tokens


def llama_request(url: str, prompt: list[int], new_tokens: int) -> Timing:
    """One streamed /completion request, read on this thread (urllib: with aiohttp's client this llama-server build
    ended its main loop when a second stream's request arrived, in every run here; urllib's requests never did)."""
    body = json.dumps({"prompt": prompt, "n_predict": new_tokens, "stream": True, "ignore_eos": True,
                       "temperature": 0.0, "top_k": 1, "return_tokens": True}).encode()
    pace = Pace()
    request = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if event.get("stop"):
                # Tokens it held back (an incomplete UTF-8 character at the end) arrive with the last event
                # without being listed: count them from its own tally, at the time the client got them.
                predicted = int(event.get("tokens_predicted") or event.get("timings", {}).get("predicted_n") or 0)
                listed = len(event.get("tokens") or [])
                pace.chunk(listed + max(0, predicted - pace.tokens - listed))
                continue  # read the response to its end
            pace.chunk(len(event.get("tokens") or []))
    return pace.result()


async def timed_streams(prompts: list[list[list[int]]], one) -> tuple[list[Timing], float]:
    """prompts[stream][request]: every stream sends its requests one after the other (await one(prompt)), all
    streams at once; (each request's timing, wall seconds)."""
    async def stream(requests: list[list[int]]) -> list[Timing]:
        return [await one(p) for p in requests]

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(stream(s) for s in prompts)) for r in rs]
    return results, time.perf_counter() - t0


async def run_level(runtime: str, address: str, prompts: list[list[list[int]]], new_tokens: int,
                    stream_interval_ms: int) -> dict[str, float]:
    if runtime == "edgellm":
        from edgellm.bench import _one_request  # the client library's timing loop, as `edgellm bench` runs it
        from edgellm.client import NO_RETRIES, AsyncClient

        async with AsyncClient(address, retry=NO_RETRIES) as client:
            results, wall = await timed_streams(
                prompts, lambda p: _one_request(client, p, new_tokens, stream_interval_ms))
    else:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(len(prompts)) as pool:  # a thread per stream
            results, wall = await timed_streams(
                prompts, lambda p: loop.run_in_executor(pool, llama_request, address, p, new_tokens))
    tokens = sum(r[2] for r in results)
    if tokens != sum(len(s) for s in prompts) * new_tokens:
        raise SystemExit(f"{runtime} streamed {tokens} tokens, expected {new_tokens} per request")
    ttft = np.array([r[0] for r in results]) * 1000
    gaps = np.array([g for r in results for g in r[1]]) * 1000
    return {"total_tokens_per_s": tokens / wall, "ttft_p50_ms": float(np.percentile(ttft, 50)),
            "ttft_p99_ms": float(np.percentile(ttft, 99)), "itl_p50_ms": float(np.percentile(gaps, 50)),
            "itl_p99_ms": float(np.percentile(gaps, 99))}


def main() -> None:
    reexec_with_huge_pages([os.path.abspath(__file__), *sys.argv[1:]])  # as `edgellm serve` runs; children inherit
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint folder or GGUF file (default: the demo model's GGUF)")
    ap.add_argument("--precision", default="int8", choices=["int8", "int4"], help="int8 = Q8_0, int4 = Q4_0")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--slots", type=int, default=8, help="parallel sequences of both servers")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prefill-chunk-tokens", type=int, help="edgellm's engine.prefill_chunk_tokens (default: its own)")
    ap.add_argument("--stream-interval-ms", type=int, default=0,
                    help="what edgellm's requests ask for (0: every token at once, as llama-server streams)")
    ap.add_argument("--no-accuracy-gate", action="store_true", help="random-weight models (see compare.py)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if not LLAMA_SERVER.exists():
        sys.exit("no .venv-bench/bin/llama-server: run bash bench/setup_comparisons.sh first")
    if args.model:
        model = Path(args.model).resolve()
    else:
        from build_engine.demo_model import demo_gguf_path
        from edgellm.cli import cache_dir

        model = demo_gguf_path(cache_dir())
    name = model.stem if model.is_file() else model.name
    CACHE.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    if max(levels) > args.slots:
        sys.exit(f"--concurrency {max(levels)} needs --slots >= {max(levels)}")
    bundle_path = edgellm_bundle(model, name, args.precision, not args.no_accuracy_gate)
    bundle = load_bundle(bundle_path, verify=False)
    if args.prompt_tokens + args.new_tokens > bundle.context_length:
        sys.exit(f"prompt + new tokens exceed the bundle's context ({bundle.context_length})")
    gguf = gguf_file(model, name, args.precision)
    vocab = int(bundle.model["vocab_size"])
    rng = np.random.default_rng(0)
    results: dict[str, dict[int, list[dict[str, float]]]] = {rt: {c: [] for c in levels} for rt in RUNTIMES}
    with serving(bundle_path, slots=args.slots, threads=args.threads,
                 prefill_chunk_tokens=args.prefill_chunk_tokens) as daemon, \
            llama_server(gguf, args.slots, bundle.context_length, args.threads) as server:
        addresses = {"edgellm": daemon, "llama-server": server}
        for r in range(args.rounds):
            for c in levels:
                # Fresh prompts per level and round, the same for both servers.
                prompts = [[rng.integers(100, vocab - 100, args.prompt_tokens).tolist()
                            for _ in range(args.requests_per_stream)] for _ in range(c)]
                for rt in RUNTIMES if (r + c) % 2 == 0 else RUNTIMES[::-1]:
                    res = asyncio.run(run_level(rt, addresses[rt], prompts, args.new_tokens, args.stream_interval_ms))
                    results[rt][c].append(res)
                    print(f"  round {r + 1} {rt:12s} {c} streams: {res['total_tokens_per_s']:.1f} tok/s", flush=True)
    flags = cpu_flags()
    print(f"\nmachine: {platform.machine()} {os.cpu_count()} cores ({_cpu_name()}); "
          f"CPU flags: {' '.join(flags) or '?'}")
    gguf_type = "Q8_0" if args.precision == "int8" else "Q4_0"
    print(f"model {name}, edgellm {args.precision} beside llama-server {gguf_type}; {args.slots} slots each, "
          f"{args.threads} threads; prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"{args.requests_per_stream} requests per stream; medians of {args.rounds} alternating rounds, "
          f"spread in brackets")
    table = {}
    for c in levels:
        print(f"{c} streams:")
        for rt in RUNTIMES:
            rows = results[rt][c]
            cols = {k: [row[k] for row in rows] for k in rows[0]}
            table.setdefault(rt, {})[c] = cols
            print(f"  {rt:12s} total {spread(cols['total_tokens_per_s'], '{:.1f}')} tok/s   "
                  f"TTFT p50 {spread(cols['ttft_p50_ms'], '{:.0f}')} p99 {spread(cols['ttft_p99_ms'], '{:.0f}')} ms   "
                  f"ITL p50 {spread(cols['itl_p50_ms'], '{:.1f}')} p99 {spread(cols['itl_p99_ms'], '{:.1f}')} ms")
        ratio = [e["total_tokens_per_s"] / s["total_tokens_per_s"]
                 for e, s in zip(results["edgellm"][c], results["llama-server"][c])]
        print(f"  edgellm / llama-server total tokens/s: {spread(ratio)}x")
        table.setdefault("edgellm/llama-server", {})[c] = ratio
    if args.json:
        Path(args.json).write_text(json.dumps({"model": name, "precision": args.precision, "cpu": _cpu_name(),
                                               "cpu_flags": flags, "cores": os.cpu_count(), "rounds": args.rounds,
                                               "table": table}, indent=1))


if __name__ == "__main__":
    main()
