"""The prefix cache through the daemon: time to first token with a long system prompt cold, warm, and warm after a
restart (the snapshot restored), with the restarted daemon's time to SERVING.

    python bench/prefix_cache.py [--bundle B] [--system-tokens 1000] [--question-tokens 20] [--rounds 7]

A request is a system prompt of --system-tokens random token ids plus a question of --question-tokens, greedy, one
new token. Each round asks, through one `edgellm serve` (prefix cache on, shared scope), in alternating order:
  cold   a system prompt never seen before (a miss: the whole prompt prefilled, its blocks then kept)
  warm   the round's fixed system prompt again with a new question (a hit: only the question and the tail of the
         system prompt that fills no whole block are prefilled)
Then the daemon is restarted --restarts times (SIGTERM writes the snapshot; the new one loads it before SERVING):
each time its start to SERVING and the first request's time to first token (the fixed system prompt, a new question),
against a daemon with the cache off started the same way. Also checks that 16 greedy tokens are the same with and
without the cache. Without --bundle it uses the demo model's bundle.
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
from typing import Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bundle_format.bundle import load_bundle
from daemon.config import parse_config
from daemon.prefix_cache import create_prefix_cache
from daemon_overhead import alternating_rounds, bundle_path, spread  # bench/ is on sys.path
from edgellm.client import NO_RETRIES, Client
from edgellm.v1 import edgellm_pb2 as pb


class Prompts:
    """Random token ids away from the special ones: one fixed system prompt, fresh ones and fresh questions."""

    def __init__(self, vocab: int, system_tokens: int, question_tokens: int):
        self.rng = np.random.default_rng(0)
        self.vocab, self.system_tokens, self.question_tokens = vocab, system_tokens, question_tokens
        self.system = self.ids(system_tokens)

    def ids(self, n: int) -> list[int]:
        return self.rng.integers(100, self.vocab - 100, n).tolist()

    def warm(self) -> list[int]:
        return self.system + self.ids(self.question_tokens)

    def cold(self) -> list[int]:
        return self.ids(self.system_tokens) + self.ids(self.question_tokens)


@contextlib.contextmanager
def serving(path: Path, folder: Path, cache: bool) -> Iterator[tuple[str, float]]:
    """`edgellm serve` with the prefix cache (snapshot in folder/prefix) or without; yields (address, seconds from
    the start to health SERVING); SIGTERM at the end (the daemon writes its snapshot)."""
    sock = folder / f"bench-{time.monotonic_ns()}.sock"
    config = folder / "config.yaml"
    config.write_text(f"prefix_cache:\n  enabled: {'true' if cache else 'false'}\n  dir: {folder / 'prefix'}\n")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "edgellm", "serve", "--bundle", str(path), "--config", str(config),
                             "--unix", str(sock), "--log-level", "warning"], stdout=subprocess.DEVNULL)
    try:
        started = wait_serving(f"unix:{sock}", proc, t0)
        yield f"unix:{sock}", started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def wait_serving(address: str, proc: subprocess.Popen, t0: float, timeout: float = 120.0) -> float:
    # Reconnect at once: gRPC's default backoff (1 s and up) would be measured instead of the daemon.
    channel = grpc.insecure_channel(address, options=[("grpc.initial_reconnect_backoff_ms", 10),
                                                      ("grpc.min_reconnect_backoff_ms", 10),
                                                      ("grpc.max_reconnect_backoff_ms", 20)])
    stub = health_pb2_grpc.HealthStub(channel)
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode}")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == health_pb2.HealthCheckResponse.SERVING:
                return time.perf_counter() - t0
        except grpc.RpcError:
            time.sleep(0.01)
    raise TimeoutError(f"not SERVING after {timeout} s")


def ask(address: str, ids: list[int], new_tokens: int = 1, salt: str = "") -> tuple[float, list[int], int]:
    """(time to first token s, the generated ids, Usage.cached_prompt_tokens) as a client sees them."""
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), max_new_tokens=new_tokens, ignore_eos=True,
                             cache_salt=salt)
    with Client(address, retry=NO_RETRIES) as client:
        t0 = time.perf_counter()
        first, out, cached = None, [], -1
        for msg in client.stub.Generate(req, timeout=600):
            if msg.HasField("tokens") and msg.tokens.token_ids:
                first = first or time.perf_counter()
                out += msg.tokens.token_ids
            elif msg.HasField("finished"):
                cached = msg.finished.usage.cached_prompt_tokens
    return first - t0, out, cached


def ms(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 4 else [min(xs), statistics.median(xs), max(xs)]
    return f"{statistics.median(xs) * 1000:7.1f} ms (quartiles {q[0] * 1000:.1f}-{q[2] * 1000:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle")
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--question-tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--restarts", type=int, default=3)
    args = ap.parse_args()
    path = bundle_path(args.bundle)
    bundle = load_bundle(path, verify=False)
    prompts = Prompts(int(bundle.model["vocab_size"]), args.system_tokens, args.question_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with serving(path, folder, cache=True) as (address, _):
            ask(address, prompts.warm())  # the fixed system prompt cached, and the daemon warmed up
            same = prompts.warm()
            _, with_cache, hit = ask(address, same, 16)
            _, without, miss = ask(address, same, 16, salt="no-reuse")  # another salt: nothing cached for it
            assert hit > 0 and miss == 0, (hit, miss)
            results = alternating_rounds(["cold", "warm"], args.rounds, lambda row: ask(
                address, prompts.cold() if row == "cold" else prompts.warm()))
        restarts: dict[str, list[tuple[float, float, int]]] = {"restart, cache": [], "restart, no cache": []}
        for r in range(args.restarts):
            for row in list(restarts) if r % 2 == 0 else list(restarts)[::-1]:
                with serving(path, folder, cache=row == "restart, cache") as (address, started):
                    ttft, _, cached = ask(address, prompts.warm())
                    restarts[row].append((started, ttft, cached))
        snapshot = folder / "prefix" / "prefix-cache.snapshot"
        snapshot_mib = snapshot.stat().st_size / 2**20 if snapshot.exists() else 0.0
        read_s = snapshot_read_seconds(bundle, folder / "prefix")

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; bundle {path.name}; "
          f"system prompt {args.system_tokens} + question {args.question_tokens} tokens, greedy, 1 new token; "
          f"{args.rounds} rounds")
    print(f"  16 greedy tokens with and without the cache identical: {with_cache == without} "
          f"({hit} prompt tokens from the cache)")
    for row in ("cold", "warm"):
        print(f"  {row:5s} time to first token {ms([x[0] for x in results[row]])}; cached prompt tokens "
              f"{statistics.median(x[2] for x in results[row]):.0f}")
    print(f"  warm/cold: {spread([w[0] / c[0] for w, c in zip(results['warm'], results['cold'])])}")
    for row, runs in restarts.items():
        print(f"  {row:17s} start to SERVING {ms([x[0] for x in runs])}; first request's time to first token "
              f"{ms([x[1] for x in runs])}; cached prompt tokens {[x[2] for x in runs]}")
    print(f"  snapshot: {snapshot_mib:.1f} MiB, read and checked in {read_s * 1000:.0f} ms (in this process, page cache warm)")


def snapshot_read_seconds(bundle, folder: Path) -> float:
    """What the daemon's start spends loading the snapshot: read, checksum, blocks copied out."""
    cfg = parse_config({"prefix_cache": {"dir": str(folder)}})
    cache = create_prefix_cache(cfg.prefix_cache, bundle.bundle_id, bundle.kv_cache,
                                bundle.kv_cache.bytes_per_row() * cfg.engine.slots)
    t0 = time.perf_counter()
    assert cache.load() > 0
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
