"""Scale-out: three real daemons (separate `edgellm serve` processes on the tiny model, loopback TCP) behind
one client that balances with gRPC round_robin and retries with edgellm.client's RetryPolicy.

Which daemon served a request is read from each daemon's request log (one line per request, `reason=`)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import wait_until
from edgellm.client import Client, EdgeLLMError, RetryPolicy

EDGELLM = [sys.executable, "-m", "edgellm"]
NEW_TOKENS = 100  # the tiny model's context is 128: a few prompt tokens and 100 new ones fit
# Retries come back within a second; eight sends outlast a daemon's death being noticed.
RETRY = RetryPolicy(max_attempts=8, initial_backoff=0.02, max_backoff=0.5)


class ServeProcess:
    """`edgellm serve` on 127.0.0.1:<free port>, its log (request lines included) in a file."""

    def __init__(self, bundle: Path, folder: Path, name: str):
        folder.mkdir()
        config = folder / "config.yaml"
        # One slot: each daemon holds one running request and queues the rest, so a kill or a drain always
        # finds requests that have not yet streamed a token.
        config.write_text("engine: {slots: 1, threads: 1, max_queued: 64}\n"
                          "generation: {stream_interval_ms: 0}\nservice: {drain_seconds: 30}\n")
        self.log = folder / "serve.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen([*EDGELLM, "serve", "--bundle", str(bundle), "--config", str(config),
                                      "--unix", "", "--tcp", "127.0.0.1:0", "--log-level", "info"],
                                     stdout=subprocess.PIPE, stderr=self._log_file, text=True)
        self.address = ""
        self.name = name

    def wait_ready(self) -> None:
        for line in self.proc.stdout:  # "edgellm: ready on 127.0.0.1:PORT"
            if "ready on" in line:
                self.address = line.rsplit(" ", 1)[1].strip()
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained
                return
        raise AssertionError(f"{self.name} exited with {self.proc.wait()}: {self.log.read_text()}")

    def request_lines(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if "edgellm.requests: request" in line]

    def served(self) -> int:
        """Requests this daemon ran to their length (every request here asks for a fixed length)."""
        return sum(" reason=length" in line for line in self.request_lines())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._log_file.close()


@pytest.fixture
def trio(tiny_bundle, tmp_path):
    daemons = [ServeProcess(tiny_bundle, tmp_path / name, name) for name in ("a", "b", "c")]
    try:
        for d in daemons:  # started together above; each is waited for in turn
            d.wait_ready()
        yield daemons
    finally:
        for d in daemons:
            d.stop()


def one(client: Client, new_tokens: int = NEW_TOKENS):
    """A request read to its end: its Completion, or the EdgeLLMError it failed with."""
    try:
        return client.complete([7, 8, 9], max_new_tokens=new_tokens, ignore_eos=True, timeout=60)
    except EdgeLLMError as e:
        return e


def test_round_robin_spreads_requests_over_every_daemon(trio):
    with Client([d.address for d in trio], retry=RETRY) as client:
        results = [one(client, 2) for _ in range(60)]
    assert all(not isinstance(r, EdgeLLMError) and r.result.finish_reason == "length" for r in results)
    shares = [d.served() for d in trio]
    assert sum(shares) == 60
    assert min(shares) >= 10, shares  # an even spread is 20 each


def burst(client: Client, n: int) -> tuple[ThreadPoolExecutor, list]:
    pool = ThreadPoolExecutor(n)
    return pool, [pool.submit(one, client) for _ in range(n)]


def test_a_killed_daemon_loses_no_request_that_had_not_streamed(trio):
    victim = trio[1]
    with Client("ipv4:" + ",".join(d.address for d in trio), retry=RETRY) as client:
        for _ in range(6):  # every subchannel connected before the burst, so the burst is spread
            one(client, 1)
        pool, futures = burst(client, 24)
        # The victim has finished a request and still holds one running and others queued.
        assert wait_until(lambda: victim.served() >= 1, 30)
        victim.proc.send_signal(signal.SIGKILL)
        results = [f.result(timeout=60) for f in futures]
        pool.shutdown()
    done = [r for r in results if not isinstance(r, EdgeLLMError)]
    failed = [r for r in results if isinstance(r, EdgeLLMError)]
    assert all(r.result.finish_reason == "length" and len(r.token_ids) == NEW_TOKENS for r in done)
    # Only a request that had streamed from the victim may fail, with a clear error: the one in its slot, and
    # one or two it had finished whose last tokens were still unread by this client when the reset dropped them.
    assert len(failed) <= 3, [str(e) for e in failed]
    for e in failed:
        assert e.tokens_streamed > 0 and "not retried" in e.message, e
    # Its queued requests had streamed nothing: they were sent again, to the others, and finished there.
    assert any(r.result.attempts > 1 for r in done)
    assert len(done) + len(failed) == 24


def test_a_drained_daemon_finishes_its_running_requests_and_takes_no_new_ones(trio):
    drained = trio[0]
    with Client([d.address for d in trio], retry=RETRY) as client:
        for _ in range(6):
            one(client, 1)
        pool, futures = burst(client, 24)
        assert wait_until(lambda: drained.served() >= 1, 30)
        drained.proc.send_signal(signal.SIGTERM)
        later = [pool.submit(one, client) for _ in range(12)]  # sent while it drains
        results = [f.result(timeout=60) for f in futures + later]
        pool.shutdown()
        assert drained.proc.wait(30) == 0
    assert all(not isinstance(r, EdgeLLMError) for r in results), [str(r) for r in results if isinstance(r, Exception)]
    assert all(r.result.finish_reason == "length" and len(r.token_ids) == NEW_TOKENS for r in results)
    # A request the drain had cut off would have ended "cancelled" after its tokens: every one above ran to its length.
    after = drained.log.read_text().split("draining:", 1)[1].splitlines()
    # After the drain began the drained daemon finished at most the one request running in its one slot; its
    # queued ones ended UNAVAILABLE and new ones were refused so, each then sent to the other daemons.
    assert sum(" reason=length" in line for line in after) <= 1
    assert sum(" reason=unavailable" in line or " code=UNAVAILABLE" in line for line in after) >= 1
    # Each request ran to its end exactly once, on one daemon or another.
    assert sum(d.served() for d in trio) == 6 + 24 + 12
