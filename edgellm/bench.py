"""`edgellm bench`: a load generator against a running daemon.

Each concurrency level runs that many streams at once; each stream sends `rounds` requests one after
another, with a fixed prompt length and a fixed output length (end-of-sequence ignored). Times are
taken where the client sees tokens arrive.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass

import grpc
import numpy as np

from edgellm.client import grpc_target
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc


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


async def _one_request(stub: pb_grpc.InferenceStub, prompt: list[int], new_tokens: int) -> tuple[float, list[float], int]:
    """(time to first token, inter-token gaps, tokens) of one request."""
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    arrivals: list[float] = []
    async for msg in stub.Generate(req):
        if msg.HasField("tokens") and msg.tokens.token_ids:
            arrivals += [time.perf_counter()] * len(msg.tokens.token_ids)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return arrivals[0] - t0, gaps, len(arrivals)


async def run_level(address: str, concurrency: int, prompt_tokens: int, new_tokens: int, rounds: int,
                    vocab_size: int) -> LevelResult:
    rng = np.random.default_rng(concurrency)
    async with grpc.aio.insecure_channel(grpc_target(address)) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def stream(i: int) -> list[tuple[float, list[float], int]]:
            out = []
            for _ in range(rounds):
                prompt = rng.integers(100, vocab_size - 100, prompt_tokens).tolist()
                out.append(await _one_request(stub, prompt, new_tokens))
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(stream(i) for i in range(concurrency))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = np.array([r[0] for r in results]) * 1000
    gaps = np.array([g for r in results for g in r[1]]) * 1000
    tokens = sum(r[2] for r in results)
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else 0.0  # noqa: E731
    return LevelResult(concurrency, len(results), tokens / wall, tokens / wall / concurrency,
                       pct(ttft, 50), pct(ttft, 99), pct(gaps, 50), pct(gaps, 99))


def run_bench(address: str, concurrency: list[int], prompt_tokens: int, new_tokens: int, rounds: int) -> list[LevelResult]:
    channel = grpc.insecure_channel(grpc_target(address))
    info = pb_grpc.InferenceStub(channel).GetModel(pb.GetModelRequest(), timeout=10)
    channel.close()
    if prompt_tokens + new_tokens > info.context_length:
        raise ValueError(f"prompt {prompt_tokens} + new {new_tokens} tokens exceed the context of {info.context_length}")
    asyncio.run(run_level(address, 1, min(prompt_tokens, 8), 2, 1, info.vocab_size))  # warm-up
    return [asyncio.run(run_level(address, c, prompt_tokens, new_tokens, rounds, info.vocab_size)) for c in concurrency]


def format_results(results: list[LevelResult], as_json: bool) -> str:
    if as_json:
        return json.dumps([asdict(r) for r in results], indent=1)
    lines = [f"{'streams':>7} {'requests':>8} {'total tok/s':>11} {'per stream':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
             f"{'ITL p50':>8} {'ITL p99':>8}"]
    for r in results:
        lines.append(f"{r.concurrency:>7} {r.requests:>8} {r.total_tokens_per_s:>11.1f} {r.per_stream_tokens_per_s:>10.1f} "
                     f"{r.ttft_p50_ms:>7.0f}ms {r.ttft_p99_ms:>7.0f}ms {r.itl_p50_ms:>6.1f}ms {r.itl_p99_ms:>6.1f}ms")
    base = results[0]
    for r in results[1:]:
        lines.append(f"throughput at {r.concurrency} streams: {r.total_tokens_per_s / base.total_tokens_per_s:.2f}x "
                     f"that at {base.concurrency}; ITL p99/p50 {r.itl_p99_ms / max(r.itl_p50_ms, 1e-9):.2f}")
    return "\n".join(lines)
