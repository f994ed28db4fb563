"""`edgellm bench`: a load generator against a running daemon.

Each concurrency level runs that many streams at once; each stream sends `rounds` requests one after
another, with a fixed prompt length and a fixed output length (end-of-sequence ignored). Times are
taken where the client sees tokens arrive.

Decode on a CPU is bound by memory bandwidth: a step reads every weight once (`ModelInfo.weight_bytes_per_token`)
plus each row's KV cache in use. The bench measures this machine's read bandwidth (numpy streaming over a
large array, one thread per core) and reports, per level, the bandwidth the daemon achieved and its
fraction of that roofline. (Run the bench on the daemon's machine for this to mean anything.)
"""

from __future__ import annotations

import asyncio
import secrets
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from edgellm.client import NO_RETRIES, AsyncClient, Client


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    total_tokens_per_s: float
    per_stream_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    achieved_gb_s: float = 0.0  # bytes the decode steps read per second (weights + KV cache in use)
    roofline_fraction: float = 0.0  # achieved / measured read bandwidth
    roofline_tokens_per_s: float = 0.0  # total tokens/s the measured read bandwidth would allow at this level
    itl_mean_ms: float = 0.0  # each stream's pace once it decodes: 1000 / this is its tokens/s


@dataclass
class BenchReport:
    levels: list[LevelResult]
    read_bandwidth_gb_s: float  # this machine's, measured
    weight_bytes_per_token: int
    kv_bytes_per_position: int
    prompt_tokens: int
    new_tokens: int
    model: dict = field(default_factory=dict)
    stream_interval_ms: int = 0  # the requests' tokens came in chunks this far apart (0: every token at once)
    stream_interval_default: bool = True  # ... because the requests left it to the server's default


def measure_read_bandwidth(nbytes: int = 1 << 29, threads: int = 0, repeats: int = 3) -> float:
    """Bytes/s this machine streams from memory: one numpy reduction per core over its part of a large array."""
    threads = threads or os.cpu_count() or 1
    data = np.ones(nbytes // 8, np.float64)  # written once: the pages exist before timing
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL in reductions
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return data.nbytes / best


def decode_bytes_per_step(weight_bytes: int, kv_bytes_per_position: int, rows: int, prompt_tokens: int,
                          new_tokens: int) -> float:
    """Mean bytes a decode step of `rows` requests reads: weights once, each row's cache up to its position."""
    mean_positions = prompt_tokens + new_tokens / 2
    return weight_bytes + rows * kv_bytes_per_position * mean_positions


async def _one_request(client: AsyncClient, prompt: list[int], new_tokens: int,
                       stream_interval_ms: int | None, cache_salt: str = "") -> tuple[float, list[float], int]:
    """(time to first token, inter-token gaps, tokens) of one request. A chunk of n tokens (stream_interval_ms)
    gives each of them 1/n of the time since the previous chunk: the pace, not the zeros within a chunk."""
    t0 = time.perf_counter()
    first, last, tokens = 0.0, 0.0, 0
    gaps: list[float] = []
    async for chunk in client.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True,
                                       stream_interval_ms=stream_interval_ms, cache_salt=cache_salt):
        if n := len(chunk.token_ids):
            now = time.perf_counter()
            if tokens:
                gaps += [(now - last) / n] * n
            else:
                first, gaps = now, [0.0] * (n - 1)
            last, tokens = now, tokens + n
    return first - t0, gaps, tokens


async def run_level(address: str | None, concurrency: int, prompt_tokens: int, new_tokens: int, rounds: int,
                    vocab_size: int, stream_interval_ms: int | None = None) -> LevelResult:
    rng = np.random.default_rng(concurrency)
    # The prompts repeat from run to run (a fixed seed): a fresh prefix-cache scope keeps every run's prefill cold.
    salt = secrets.token_hex(8)
    # No retries: a request the daemon refused would be timed as if it were slow.
    async with AsyncClient(address, retry=NO_RETRIES) as client:

        async def stream(i: int) -> list[tuple[float, list[float], int]]:
            out = []
            for _ in range(rounds):
                prompt = rng.integers(100, vocab_size - 100, prompt_tokens).tolist()
                out.append(await _one_request(client, prompt, new_tokens, stream_interval_ms, salt))
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(stream(i) for i in range(concurrency))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = np.array([r[0] for r in results]) * 1000
    gaps = np.array([g for r in results for g in r[1]]) * 1000
    tokens = sum(r[2] for r in results)
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else 0.0  # noqa: E731
    return LevelResult(concurrency, len(results), tokens / wall, tokens / wall / concurrency,
                       pct(ttft, 50), pct(ttft, 99), pct(gaps, 50), pct(gaps, 99),
                       itl_mean_ms=float(gaps.mean()) if len(gaps) else 0.0)


def run_bench(address: str | None, concurrency: list[int], prompt_tokens: int, new_tokens: int, rounds: int,
              stream_interval_ms: int | None = None) -> BenchReport:
    """address: as Client takes it (None: the default socket); stream_interval_ms: what the requests ask for
    (None: the server's default). Raises EdgeLLMError when a call fails."""
    with Client(address, retry=NO_RETRIES) as client:
        info = client.model(timeout=10)
    if prompt_tokens + new_tokens > info.context_length:
        raise ValueError(f"prompt {prompt_tokens} + new {new_tokens} tokens exceed the context of {info.context_length}")
    bandwidth = measure_read_bandwidth()
    kv_per_position = info.kv_cache_bytes // max(1, info.slots * (info.context_length + 1))
    asyncio.run(run_level(address, 1, min(prompt_tokens, 8), 2, 1, info.vocab_size))  # warm-up
    levels = [asyncio.run(run_level(address, c, prompt_tokens, new_tokens, rounds, info.vocab_size, stream_interval_ms))
              for c in concurrency]
    for r in levels:
        rows = min(r.concurrency, info.slots)
        step_bytes = decode_bytes_per_step(info.weight_bytes_per_token, kv_per_position, rows, prompt_tokens, new_tokens)
        r.achieved_gb_s = r.total_tokens_per_s / rows * step_bytes / 1e9
        r.roofline_fraction = r.achieved_gb_s * 1e9 / bandwidth
        r.roofline_tokens_per_s = bandwidth / step_bytes * rows
    model = {"architecture": info.hf_architecture, "precision": info.precision, "backend": info.backend,
             "slots": info.slots, "source": info.source}
    return BenchReport(levels, bandwidth / 1e9, info.weight_bytes_per_token, kv_per_position, prompt_tokens, new_tokens,
                       model, info.stream_interval_ms if stream_interval_ms is None else stream_interval_ms,
                       stream_interval_ms is None)


def format_results(report: BenchReport, as_json: bool) -> str:
    results = report.levels
    if as_json:
        return json.dumps({**asdict(report), "levels": [asdict(r) for r in results]}, indent=1)
    m = report.model
    lines = [f"{m.get('architecture', '?')} {m.get('precision', '?')} on {m.get('backend', '?')}; prompt "
             f"{report.prompt_tokens}, {report.new_tokens} new tokens; weights read per step "
             f"{report.weight_bytes_per_token / 1e6:.0f} MB, KV cache {report.kv_bytes_per_position / 1e3:.1f} kB per "
             f"position; this machine reads {report.read_bandwidth_gb_s:.1f} GB/s"
             + (f"; tokens in chunks every {report.stream_interval_ms} ms" if report.stream_interval_ms else "; every token streamed")
             + (" (the server's default)" if report.stream_interval_default else ""),
             f"{'streams':>7} {'requests':>8} {'total tok/s':>11} {'per stream':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
             f"{'ITL p50':>8} {'ITL p99':>8} {'GB/s':>6} {'roofline':>8}"]
    for r in results:
        bw = f"{r.achieved_gb_s:>6.1f} {r.roofline_fraction:>7.0%}" if report.weight_bytes_per_token else f"{'-':>6} {'-':>8}"
        lines.append(f"{r.concurrency:>7} {r.requests:>8} {r.total_tokens_per_s:>11.1f} {r.per_stream_tokens_per_s:>10.1f} "
                     f"{r.ttft_p50_ms:>7.0f}ms {r.ttft_p99_ms:>7.0f}ms {r.itl_p50_ms:>6.1f}ms {r.itl_p99_ms:>6.1f}ms {bw}")
    base = results[0]
    for r in results[1:]:
        lines.append(f"throughput at {r.concurrency} streams: {r.total_tokens_per_s / base.total_tokens_per_s:.2f}x "
                     f"that at {base.concurrency}; ITL p99/p50 {r.itl_p99_ms / max(r.itl_p50_ms, 1e-9):.2f}")
    if not report.weight_bytes_per_token:
        lines.append("(the bundle predates weight_bytes_per_token: rebuild it for the bandwidth columns)")
    return "\n".join(lines)


def plot_results(report: BenchReport, path: str) -> None:
    """Throughput and latency against concurrency, as a PNG (needs the `plot` extra: matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'edgellm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r.concurrency for r in report.levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(c, [r.total_tokens_per_s for r in report.levels], "o-", label="total")
    ax1.plot(c, [r.per_stream_tokens_per_s for r in report.levels], "s--", label="per stream")
    if report.weight_bytes_per_token:
        ax1.plot(c, [r.roofline_tokens_per_s for r in report.levels], ":", color="gray",
                 label=f"bandwidth roofline ({report.read_bandwidth_gb_s:.1f} GB/s)")
    ax1.set(xlabel="concurrent streams", ylabel="decode tokens/s", xscale="log", xticks=c, xticklabels=c,
            title="Throughput")
    ax1.legend()
    for attr, style, label in (("itl_p50_ms", "o-", "ITL p50"), ("itl_p99_ms", "o--", "ITL p99"),
                               ("ttft_p50_ms", "s-", "TTFT p50")):
        ax2.plot(c, [getattr(r, attr) for r in report.levels], style, label=label)
    ax2.set(xlabel="concurrent streams", ylabel="ms", xscale="log", yscale="log", xticks=c, xticklabels=c,
            title="Latency")
    ax2.legend()
    m = report.model
    fig.suptitle(f"edgellm bench: {m.get('architecture', '')} {m.get('precision', '')}, prompt {report.prompt_tokens}, "
                 f"{report.new_tokens} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
