"""A soak: `edgellm serve` under a mixed load for minutes, watched for errors, leaks and slowdowns.

Each of --streams client threads runs one scenario after another, chosen at random: a request read to
its end, one cancelled mid-stream, a client that vanishes (closes its channel mid-stream), a request
deadline, a call deadline, a multi-turn conversation, a slow reader, and now and then an invalid request;
at random priorities. Every scenario knows how it may end; anything else is an unexpected error.

Minute by minute it prints requests by outcome, unexpected errors, the client-side inter-token latency
(p50/p99, from requests streamed token by token) and the daemon's RSS, open fds, threads, slots in use
and queue length (/proc/<pid> and its metrics endpoint). First, requests spanning the whole context
fill every slot once: ONNX Runtime's arena grows to the largest activations it has seen and keeps them,
and the KV cache's pages are committed on first write, so until then RSS grows with the longest request
seen, which is warm-up, not a leak. After a warm-up under load the load pauses until the daemon is
idle, and its RSS, fds and threads are taken as the baseline; at the end, once idle again, they are
compared with it.

    python bench/soak.py [--bundle B] [--minutes 30] [--streams 8] [--slots 4] [--json FILE|-]

Targets (exit code 1 when one is missed): 0 unexpected errors, 0 leaked slots (and an empty queue) once
idle, RSS growth under 2% after warm-up, fds and threads no higher than after warm-up. Without --bundle
it uses the demo model's bundle (built once if needed).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from google.protobuf.duration_pb2 import Duration

from edgellm.client import NO_RETRIES, Client
from edgellm.v1 import edgellm_pb2 as pb

RSS_GROWTH_LIMIT = 0.02
PRIORITIES = [pb.PRIORITY_INTERACTIVE, pb.PRIORITY_NORMAL, pb.PRIORITY_NORMAL, pb.PRIORITY_BACKGROUND]
# scenario -> weight
SCENARIOS = {"complete": 4, "cancel": 2, "vanish": 2, "deadline": 1, "call_deadline": 1, "conversation": 2,
             "slow_reader": 1, "invalid": 1}
WORDS = ("the a small model runs on an edge device and answers questions about weather roads trains music "
         "history cooking gardens rivers mountains cities languages numbers colours animals stars").split()
NORMAL_ENDS = {"stop", "length"}


def bundle_path(arg: str | None) -> Path:
    """--bundle, else the demo model's bundle (built once if needed)."""
    if arg:
        return Path(arg)
    from edgellm.cli import demo_bundle

    return demo_bundle()


# ---- the daemon ---------------------------------------------------------------------------------------------
@dataclass
class ProcessSample:
    rss_kb: int
    fds: int
    threads: int


def sample_process(pid: int) -> ProcessSample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)[1])
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M)[1])
    return ProcessSample(rss, len(os.listdir(f"/proc/{pid}/fd")), threads)


def settled_sample(pid: int, timeout: float = 15.0) -> ProcessSample:
    """A sample once fds and threads have stopped moving (connections that just closed take a moment to go)."""
    end = time.monotonic() + timeout
    last = sample_process(pid)
    while time.monotonic() < end:
        time.sleep(1.0)
        now = sample_process(pid)
        if (now.fds, now.threads) == (last.fds, last.threads):
            return now
        last = now
    return last


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`edgellm serve` in a subprocess on a temporary Unix socket, with its metrics endpoint on loopback."""

    def __init__(self, bundle: Path, slots: int, workdir: str):
        self.address = f"unix:{workdir}/soak.sock"
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        config = Path(workdir) / "config.yaml"
        config.write_text(f"service:\n  metrics: \"{self.metrics_url.split('/')[2]}\"\n")
        self.log = Path(workdir) / "daemon.log"
        cmd = [sys.executable, "-m", "edgellm", "serve", "--bundle", str(bundle), "--config", str(config),
               "--unix", self.address[5:], "--slots", str(slots), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True)
        for line in self.proc.stdout:
            if "ready on" in line:
                break
        else:
            raise RuntimeError(f"edgellm serve exited ({self.proc.wait()}) before it was ready:\n{self.log_tail()}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def gauges(self) -> dict[str, float]:
        body = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        return {m[1]: float(m[2]) for m in re.finditer(r"^edgellm_(slots_in_use|queue_length) (\S+)$", body, re.M)}

    def wait_idle(self, timeout: float) -> dict[str, float]:
        """The gauges once nothing is held or queued, or as they are when the timeout passes."""
        end = time.monotonic() + timeout
        while (g := self.gauges()) != {"slots_in_use": 0.0, "queue_length": 0.0} and time.monotonic() < end:
            time.sleep(0.1)
        return g

    def logged_errors(self) -> list[str]:
        """The daemon's ERROR (and worse) log lines so far, each with the traceback lines under it."""
        found: list[str] = []
        in_error = False
        for line in self.log.read_text(errors="replace").splitlines():
            record = re.match(r"\S+ \S+ ([A-Z]+) ", line)
            if record:
                in_error = record[1] in ("ERROR", "CRITICAL")
                if in_error:
                    found.append(line)
            elif in_error:
                found[-1] += "\n" + line  # a traceback belongs to its record
        return found

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


# ---- the load ---------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """How one request ended as the client saw it, and whether its scenario allows that."""

    scenario: str
    outcome: str
    expected: bool
    detail: str = ""
    gaps: list[float] = field(default_factory=list)  # seconds between tokens (token-by-token requests only)


class Workload:
    """The request mix of one client thread; every method runs one scenario and returns its results."""

    def __init__(self, address: str, context: int, rng: random.Random):
        self.address = address
        self.rng = rng
        # The soak checks what the daemon itself answers: no retries, and the bare stub for the protocol's corners.
        self.client = Client(address, retry=NO_RETRIES)
        self.stub = self.client.stub
        self.max_new = max(4, min(96, context // 4))
        self.prompt_words = max(3, min(60, context // 8))
        self.context = context

    # -- requests
    def prompt(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(3, self.prompt_words)))

    def request(self, **fields) -> pb.GenerateRequest:
        req = pb.GenerateRequest(max_new_tokens=self.rng.randint(4, self.max_new), priority=self.rng.choice(PRIORITIES),
                                 sampling=pb.SamplingParams(temperature=self.rng.choice([0.0, 0.7]), seed=self.rng.getrandbits(32)))
        if self.rng.random() < 0.5:
            req.stream_interval_ms = 0  # token by token: these give the inter-token latency
        if "chat" not in fields and "token_ids" not in fields:
            fields.setdefault("text", self.prompt())
        for name, value in fields.items():
            if isinstance(value, (pb.ChatMessages, Duration)):
                getattr(req, name).CopyFrom(value)
            else:
                setattr(req, name, value)
        return req

    def read(self, scenario: str, responses, req: pb.GenerateRequest, allowed: set[str], stop_after: int | None = None,
             pause: float = 0.0) -> Result:
        """Read a Generate stream (stop_after: give up after that many chunks, the caller ends the call)."""
        per_token = req.HasField("stream_interval_ms") and req.stream_interval_ms == 0 and not pause
        gaps, last, chunks = [], None, 0
        try:
            for msg in responses:
                if msg.HasField("finished"):
                    return self.ended(scenario, msg.finished, allowed, gaps)
                now = time.monotonic()
                if msg.tokens.token_ids:
                    if per_token and last is not None:
                        gaps.append((now - last) / len(msg.tokens.token_ids))
                    last = now
                chunks += 1
                if stop_after is not None and chunks >= stop_after:
                    return Result(scenario, "gave_up", True)
                if pause:
                    time.sleep(pause)
            return Result(scenario, "no_finished", False, "the stream ended without Finished")
        except grpc.RpcError as e:
            outcome = f"rpc_{e.code().name.lower()}"
            return Result(scenario, outcome, outcome in allowed, e.details() or "", gaps)

    @staticmethod
    def ended(scenario: str, fin: pb.Finished, allowed: set[str], gaps: list[float]) -> Result:
        outcome = pb.FinishReason.Name(fin.reason).removeprefix("FINISH_REASON_").lower()
        if outcome == "cancelled" and "did not read" in fin.message:
            outcome = "cut_off"  # the server's slow-reader bound
        return Result(scenario, outcome, outcome in allowed, fin.message, gaps)

    # -- scenarios
    def complete(self) -> list[Result]:
        req = self.request()
        return [self.read("complete", self.stub.Generate(req, timeout=120), req, NORMAL_ENDS)]

    def slow_reader(self) -> list[Result]:
        req = self.request()
        allowed = NORMAL_ENDS | {"cut_off"}
        return [self.read("slow_reader", self.stub.Generate(req, timeout=300), req, allowed, pause=self.rng.uniform(0.01, 0.05))]

    def deadline(self) -> list[Result]:
        req = self.request(deadline=Duration(nanos=self.rng.randint(20, 900) * 1_000_000))
        return [self.read("deadline", self.stub.Generate(req, timeout=120), req, NORMAL_ENDS | {"deadline"})]

    def call_deadline(self) -> list[Result]:
        req = self.request()
        call = self.stub.Generate(req, timeout=self.rng.uniform(0.02, 1.0))
        return [self.read("call_deadline", call, req, NORMAL_ENDS | {"deadline", "rpc_deadline_exceeded"})]

    def vanish(self) -> list[Result]:
        """A client that goes away mid-stream: its channel closes under the call."""
        client = Client(self.address, retry=NO_RETRIES)
        req = self.request()
        try:
            call = client.stub.Generate(req, timeout=120)
            result = self.read("vanish", call, req, NORMAL_ENDS, stop_after=self.rng.randint(1, 4))
        finally:
            client.close()
        if result.outcome == "gave_up":
            result.outcome = "vanished"
        return [result]

    def invalid(self) -> list[Result]:
        req = self.request(text="")  # an empty prompt
        return [self.read("invalid", self.stub.Generate(req, timeout=60), req, {"rpc_invalid_argument"})]

    def cancel(self) -> list[Result]:
        """Session: one request, cancelled after a few chunks (unless it ends first)."""
        out: queue.Queue = queue.Queue()
        req = self.request()
        out.put(pb.SessionRequest(start=pb.StartRequest(id="r", request=req)))
        responses = self.stub.Session(iter(out.get, None), timeout=120)
        after = self.rng.randint(1, 5)
        chunks, result = 0, None
        try:
            for msg in responses:
                kind = msg.WhichOneof("kind")
                if kind == "tokens":
                    chunks += 1
                    if chunks == after:
                        out.put(pb.SessionRequest(cancel=pb.CancelRequest(id="r")))
                        out.put(None)
                elif kind == "finished" and result is None:
                    result = self.ended("cancel", msg.finished, NORMAL_ENDS | {"cancelled"}, [])
                    out.put(None)
                elif result is not None and chunks >= after and late_cancel_refusal(msg):
                    pass  # the request ended before the server read the cancel: the cancel is refused, rightly
                else:
                    result = Result("cancel", f"unexpected_{kind}", False, str(msg)[:300])
                    out.put(None)
        except grpc.RpcError as e:
            return [Result("cancel", f"rpc_{e.code().name.lower()}", False, e.details() or "")]
        return [result or Result("cancel", "no_finished", False, "the stream ended without Finished")]

    def conversation(self) -> list[Result]:
        """Session: open a conversation, 2-4 chat turns one after another, close it, end the stream."""
        out: queue.Queue = queue.Queue()
        responses = self.stub.Session(iter(out.get, None), timeout=300)
        out.put(pb.SessionRequest(open_conversation=pb.OpenConversation(id="c")))
        results, used = [], 0
        max_new = max(4, min(48, self.context // 16))
        try:
            for turn in range(self.rng.randint(2, 4)):
                content = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(3, min(12, self.prompt_words))))
                # At most a token per character, plus the chat template's few: the turn stays inside the context.
                if used + len(content) + 16 + max_new > self.context:
                    break
                req = self.request(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=content)]),
                                   max_new_tokens=max_new)
                out.put(pb.SessionRequest(start=pb.StartRequest(id=f"t{turn}", request=req, conversation_id="c")))
                while True:
                    msg = next(responses)
                    kind = msg.WhichOneof("kind")
                    if kind == "finished":
                        results.append(self.ended("conversation", msg.finished, NORMAL_ENDS, []))
                        used = msg.finished.usage.prompt_tokens + msg.finished.usage.completion_tokens
                        break
                    if kind == "error":
                        results.append(Result("conversation", f"error_{msg.error.code}", False, msg.error.message))
                        break
            out.put(pb.SessionRequest(close_conversation=pb.CloseConversation(id="c")))
            out.put(None)
            for msg in responses:  # nothing may follow but the end of the stream
                results.append(Result("conversation", f"late_{msg.WhichOneof('kind')}", False, str(msg)[:200]))
        except StopIteration:
            results.append(Result("conversation", "no_finished", False, "the stream ended before the turn did"))
        except grpc.RpcError as e:
            results.append(Result("conversation", f"rpc_{e.code().name.lower()}", False, e.details() or ""))
        finally:
            out.put(None)
        return results

    def run_one(self) -> list[Result]:
        name = self.rng.choices(list(SCENARIOS), weights=list(SCENARIOS.values()))[0]
        try:
            return getattr(self, name)()
        except Exception as e:  # a client-side failure is a finding too, not a crash of the soak
            return [Result(name, f"exception_{type(e).__name__}", False, str(e)[:300])]


def late_cancel_refusal(msg: pb.SessionResponse) -> bool:
    """The answer to a cancel that came after its request had ended: a NOT_FOUND refusal of that cancel."""
    return (msg.WhichOneof("kind") == "refused" and msg.refused.kind == pb.SESSION_REQUEST_KIND_CANCEL
            and msg.refused.code == grpc.StatusCode.NOT_FOUND.value[0])


def fill_context(address: str, context: int, vocab: int, slots: int) -> None:
    """Requests that span the whole context, on every slot at once: ONNX Runtime's arena and the KV cache grow
    with the longest request seen and keep what they got, so this takes them to their peak before the baseline.
    Twice as many as there are slots, so each slot gets one even if some end before the rest arrive."""
    client = Client(address, retry=NO_RETRIES)
    rng = random.Random(0)

    def one(_: int) -> None:
        ids = [rng.randrange(min(100, vocab // 4), vocab - min(100, vocab // 4)) for _ in range(context - 4)]
        client.complete(ids, max_new_tokens=4, ignore_eos=True, timeout=600)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2 * slots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()


# ---- the soak ------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    minute: float
    requests: int
    outcomes: dict[str, int]
    unexpected: int
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    rss_mb: float
    fds: int
    threads: int
    slots_in_use: float
    queue_length: float


@dataclass
class Collector:
    """What the client threads report, taken by the reporter once per row."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter = field(default_factory=Counter)
    unexpected: int = 0
    gaps: list[float] = field(default_factory=list)
    totals: Counter = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)  # the first unexpected errors, for the report

    def add(self, results: list[Result]) -> None:
        with self.lock:
            for r in results:
                self.outcomes[r.outcome] += 1
                self.totals[f"{r.scenario}:{r.outcome}"] += 1
                self.gaps += r.gaps
                if not r.expected:
                    self.unexpected += 1
                    if len(self.samples) < 20:
                        self.samples.append(f"{r.scenario}: {r.outcome}: {r.detail}")

    def take(self) -> tuple[Counter, int, list[float]]:
        with self.lock:
            taken = self.outcomes, self.unexpected, self.gaps
            self.outcomes, self.unexpected, self.gaps = Counter(), 0, []
            return taken


def percentile(values: list[float], q: float) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


class Soak:
    def __init__(self, daemon: ServeProcess, streams: int, seed: int, context: int):
        self.daemon = daemon
        self.collector = Collector()
        self.go = threading.Event()  # set while the clients may start scenarios
        self.stop = threading.Event()
        self.busy = [False] * streams
        self.busy_cond = threading.Condition()
        self.workers = [threading.Thread(target=self._client, args=(i, Workload(daemon.address, context, random.Random(seed + i))),
                                         name=f"soak-{i}", daemon=True) for i in range(streams)]

    def _client(self, i: int, load: Workload) -> None:
        while not self.stop.is_set():
            self.go.wait()
            if self.stop.is_set():
                break
            with self.busy_cond:
                self.busy[i] = True
            try:
                self.collector.add(load.run_one())
            finally:
                with self.busy_cond:
                    self.busy[i] = False
                    self.busy_cond.notify_all()

    def pause(self, timeout: float = 300) -> None:
        """Let every client finish its scenario and wait."""
        self.go.clear()
        with self.busy_cond:
            self.busy_cond.wait_for(lambda: not any(self.busy), timeout)

    def row(self, started: float) -> Row:
        outcomes, unexpected, gaps = self.collector.take()
        proc = sample_process(self.daemon.pid)
        g = self.daemon.gauges()
        return Row(round((time.monotonic() - started) / 60, 2), sum(outcomes.values()), dict(outcomes), unexpected,
                   _ms(percentile(gaps, 50)), _ms(percentile(gaps, 99)), round(proc.rss_kb / 1024, 1), proc.fds,
                   proc.threads, g.get("slots_in_use", -1), g.get("queue_length", -1))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def print_row(row: Row) -> None:
    outcomes = " ".join(f"{k}={v}" for k, v in sorted(row.outcomes.items()))
    itl = f"{row.itl_p50_ms if row.itl_p50_ms is not None else '-':>7} {row.itl_p99_ms if row.itl_p99_ms is not None else '-':>8}"
    print(f"{row.minute:6.2f} {row.requests:6d} {row.unexpected:4d} {itl} {row.rss_mb:8.1f} {row.fds:5d} {row.threads:5d} "
          f"{row.slots_in_use:3.0f} {row.queue_length:3.0f}  {outcomes}", flush=True)


def run(args: argparse.Namespace) -> dict:
    path = bundle_path(args.bundle)
    with tempfile.TemporaryDirectory(prefix="edgellm-soak-") as workdir:
        daemon = ServeProcess(path, args.slots, workdir)
        try:
            return soak(daemon, args, path)
        finally:
            code = daemon.stop()
            if code not in (0, None):
                print(f"edgellm serve exited with {code}:\n{daemon.log_tail()}", file=sys.stderr)


def soak(daemon: ServeProcess, args: argparse.Namespace, path: Path) -> dict:
    with Client(daemon.address, retry=NO_RETRIES) as client:
        info = client.model(timeout=30)
    start_sample = sample_process(daemon.pid)
    fill_context(daemon.address, info.context_length, info.vocab_size, info.slots)
    total_s = args.minutes * 60
    warmup_s = min(args.warmup_minutes * 60, total_s / 2)
    row_s = args.row_seconds
    s = Soak(daemon, args.streams, args.seed, info.context_length)
    print(f"soak: {path.name} ({info.architecture}, {info.precision}, {info.slots} slots, context {info.context_length}); "
          f"{args.streams} streams for {args.minutes:g} min, warm-up {warmup_s / 60:g} min; daemon pid {daemon.pid}", flush=True)
    print(f"{'min':>6} {'reqs':>6} {'unex':>4} {'p50 ms':>7} {'p99 ms':>8} {'rss MiB':>8} {'fds':>5} {'thrds':>5} "
          f"{'slt':>3} {'que':>3}  outcomes", flush=True)
    for w in s.workers:
        w.start()
    started = time.monotonic()
    rows: list[Row] = []
    baseline: ProcessSample | None = None
    next_row = started + row_s
    s.go.set()
    while (now := time.monotonic()) < started + total_s and daemon.alive():
        if baseline is None and now >= started + warmup_s:
            # The baseline is taken idle, as the end is: what is in flight is no leak.
            s.pause()
            daemon.wait_idle(60)
            baseline = settled_sample(daemon.pid)
            print(f"  (baseline after warm-up, idle: rss {baseline.rss_kb / 1024:.1f} MiB, {baseline.fds} fds, "
                  f"{baseline.threads} threads)", flush=True)
            s.go.set()
        if now >= next_row:
            rows.append(s.row(started))
            print_row(rows[-1])
            next_row += row_s
        time.sleep(min(0.2, max(0.0, next_row - time.monotonic())))
    s.pause()
    s.stop.set()
    s.go.set()
    alive = daemon.alive()
    if alive:
        if not rows or rows[-1].minute < round((time.monotonic() - started) / 60, 2):
            rows.append(s.row(started))
            print_row(rows[-1])
        gauges = daemon.wait_idle(60)
        end = settled_sample(daemon.pid)
    else:
        gauges, end = {}, None
    baseline = baseline or start_sample
    unexpected = sum(r.unexpected for r in rows) + s.collector.unexpected
    logged = daemon.logged_errors()
    checks = {  # name -> (passed, what was measured)
        "alive": (alive, "the daemon ran to the end" if alive else "the daemon died"),
        "no_unexpected_errors": (unexpected == 0, f"{unexpected} unexpected errors"),
        "no_logged_errors": (not logged, f"{len(logged)} ERROR lines in the daemon's log"),
        "no_leaked_slots": (gauges == {"slots_in_use": 0.0, "queue_length": 0.0},
                            f"once idle: {gauges.get('slots_in_use', '?')} slots in use, {gauges.get('queue_length', '?')} queued"),
    }
    if end is not None:
        growth = (end.rss_kb - baseline.rss_kb) / baseline.rss_kb
        checks["rss_growth"] = (growth < RSS_GROWTH_LIMIT, f"RSS {baseline.rss_kb / 1024:.1f} -> {end.rss_kb / 1024:.1f} MiB "
                                f"({growth * 100:+.2f}%, limit {RSS_GROWTH_LIMIT * 100:g}%)")
        checks["fds_flat"] = (end.fds <= baseline.fds, f"fds {baseline.fds} -> {end.fds}")
        checks["threads_flat"] = (end.threads <= baseline.threads, f"threads {baseline.threads} -> {end.threads}")
    report = {
        "bundle": str(path), "model": {"architecture": info.architecture, "precision": info.precision,
                                       "slots": info.slots, "context_length": info.context_length},
        "streams": args.streams, "minutes": args.minutes, "warmup_minutes": warmup_s / 60, "seed": args.seed,
        "start": asdict(start_sample), "baseline": asdict(baseline), "end": asdict(end) if end else None,
        "idle_gauges": gauges, "rows": [asdict(r) for r in rows],
        "by_scenario": dict(sorted(s.collector.totals.items())), "unexpected_samples": s.collector.samples,
        "logged_errors": logged[:20],
        "checks": {name: {"passed": ok, "detail": detail} for name, (ok, detail) in checks.items()},
        "passed": all(ok for ok, _ in checks.values()),
    }
    print("\nby scenario and outcome: " + ", ".join(f"{k} {v}" for k, v in sorted(s.collector.totals.items())))
    for sample in s.collector.samples:
        print(f"  unexpected: {sample}")
    for line in logged[:5]:
        print(f"  logged by the daemon: {line}")
    if not alive:
        print(f"the daemon died:\n{daemon.log_tail()}")
    print(f"start {start_sample.rss_kb / 1024:.1f} MiB / {start_sample.fds} fds / {start_sample.threads} threads; "
          + (f"end (idle) {end.rss_kb / 1024:.1f} MiB / {end.fds} fds / {end.threads} threads" if end else "no end sample"))
    for ok, detail in checks.values():
        print(f"  {'PASS' if ok else 'FAIL'}  {detail}")
    print("verdict:", "PASS" if report["passed"] else "FAIL", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="engine bundle (default: the demo model's)")
    ap.add_argument("--minutes", type=float, default=30.0, help="length of the run, warm-up included (default: 30)")
    ap.add_argument("--streams", type=int, default=8, help="concurrent client threads (default: 8)")
    ap.add_argument("--slots", type=int, default=4, help="the daemon's engine.slots (default: 4)")
    ap.add_argument("--warmup-minutes", type=float, default=1.0,
                    help="load before the baseline is taken, at most half the run (default: 1)")
    ap.add_argument("--row-seconds", type=float, default=60.0, help="seconds per table row (default: 60)")
    ap.add_argument("--seed", type=int, default=0, help="the clients' random choices (default: 0)")
    ap.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE ('-': stdout)")
    args = ap.parse_args(argv)
    report = run(args)
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
