"""The engine (scheduler, model runner, postprocessing, delivery) on a fake backend and a fake clock: fast,
deterministic, stepped by hand.

The fake backend keeps, per slot, the token written at each cache position, and its "logits" pick
a token that depends on every cached token up to the query position. So any mistake in positions,
slots, cache reuse or re-prefill after preemption changes the generated tokens.
"""

from __future__ import annotations

import re

import asyncio
import os
import queue
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import DaemonThread, StepGate, generate, wait_until
from daemon.backend import forward_as_calls, write_decode_inputs
from daemon.engine import Engine
from daemon.sampling import SamplingParams
from bundle_format.decode_buckets import decode_bucket
from daemon.sequence import Conversation, FinishEvent, FinishReason, Priority, QueueFullError, Sequence, TokenEvent
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc

VOCAB = 97
EOS = 96
MAX_SEQ = 65  # context 64 + the scratch position the bundles keep


class FakeBackend:
    name = "fake"
    threads = 0
    cuda_graphs = ""
    max_score_tokens = 0  # no score(): no speculative decoding

    def __init__(self, slots: int, max_seq: int = MAX_SEQ):
        self.slots = slots
        self.kv_cache_bytes = 0
        self.cache = np.full((slots, max_seq), -1, np.int64)
        self.prefilled_tokens = 0
        self.decode_shapes_seen: set[int] = set()
        self.forward_shapes: list[list[int]] = []  # tokens per row of each forward() call
        self._logits = np.zeros((slots, VOCAB), np.float32)
        # (input_ids, positions) kept per row count and reused, as real backends do (daemon/backend_onnx.py):
        # idle rows hold whatever the last step left there.
        self._bindings: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _next_logits(self, row: int, pos: int, out: np.ndarray) -> None:
        ctx = self.cache[row, :pos + 1]
        assert (ctx >= 0).all(), f"slot {row} attends an unwritten position"
        out.fill(0)
        out[int((ctx * np.arange(1, pos + 2)).sum() % (VOCAB - 1))] = 10.0  # never EOS

    def prefill(self, row, token_ids, start):
        self.prefilled_tokens += len(token_ids)
        self.cache[row, start:start + len(token_ids)] = token_ids
        self._next_logits(row, start + len(token_ids) - 1, self._logits[row])
        return self._logits[row]

    def forward(self, rows):
        """A mixed step: every row in one call (here through prefill and decode, as the TensorRT backend runs it,
        so a test that breaks either breaks the step); logits row after row."""
        self.forward_shapes.append([len(r.token_ids) for r in rows])
        return forward_as_calls(self, rows, VOCAB)

    def decode(self, slots, token_ids, positions):
        rows = decode_bucket(max(slots), self.slots)
        self.decode_shapes_seen.add(rows)
        if rows not in self._bindings:
            self._bindings[rows] = (np.zeros((rows, 1), np.int64), np.zeros(rows, np.int64))
        input_ids, row_positions = self._bindings[rows]
        write_decode_inputs(input_ids, row_positions, slots, token_ids, positions)
        for r in range(rows):
            assert 0 <= input_ids[r, 0] < VOCAB, f"row {r}: input id {input_ids[r, 0]} (a graph gathers it, idle or not)"
            if row_positions[r] < 0:  # an idle row: nothing written, logits unused
                continue
            self.cache[r, row_positions[r]] = input_ids[r, 0]
            self._next_logits(r, int(row_positions[r]), self._logits[r])
        return self._logits[:rows]

    def close(self):
        pass


class FakeTokenizer:
    eos_token_ids = frozenset({EOS})
    vocab_size = VOCAB

    def __init__(self, poison: frozenset[int] = frozenset()):
        self.poison = poison  # ids it fails to decode, as a tokenizer with a broken entry would

    def decode(self, ids):
        if self.poison.intersection(ids):
            raise ValueError(f"cannot decode {sorted(self.poison.intersection(ids))}")
        return "".join(chr(0x61 + i % 26) for i in ids)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Recorder:
    """A sink that keeps one request's events."""

    def __init__(self):
        self.tokens: list[int] = []
        self.finished: FinishEvent | None = None

    def __call__(self, ev):
        if isinstance(ev, TokenEvent):
            self.tokens += ev.token_ids
        else:
            assert self.finished is None, "two finish events"
            self.finished = ev


def make_engine(slots=2, chunk=16, max_queued=8, tokenizer=None, **kw):
    clock = Clock()
    eng = Engine(FakeBackend(slots), tokenizer or FakeTokenizer(), MAX_SEQ - 1, prefill_chunk_tokens=chunk,
                 max_queued=max_queued, clock=clock, **kw)
    return eng, clock


def seq(prompt, n, clock, priority=Priority.NORMAL, **kw):
    rec = Recorder()
    s = Sequence(list(prompt), SamplingParams(temperature=0), n, sink=rec, arrival=clock(), priority=priority, **kw)
    return s, rec


def run(eng, until, max_steps=500):
    for _ in range(max_steps):
        if until():
            return
        eng.step()
    raise AssertionError("did not finish")


def alone(prompt, n):
    eng, clock = make_engine(slots=1)
    s, rec = seq(prompt, n, clock)
    eng.submit(s)
    run(eng, lambda: rec.finished)
    return rec.tokens


def test_interleaved_arrivals_match_running_alone():
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]
    expected = [alone(p, 12) for p in prompts]
    eng, clock = make_engine(slots=2, chunk=3)
    recs = []
    for p in prompts:  # arrivals spread over the first steps
        s, rec = seq(p, 12, clock)
        eng.submit(s)
        recs.append(rec)
        eng.step()
    run(eng, lambda: all(r.finished for r in recs))
    assert [r.tokens for r in recs] == expected
    assert all(r.finished.reason == FinishReason.LENGTH for r in recs)
    assert eng.backend.decode_shapes_seen <= {1, 2}
    assert eng.scheduler.free_slots == [0, 1] and not eng.running


def test_long_prompt_is_chunked_and_does_not_stall_decodes():
    eng, clock = make_engine(slots=2, chunk=4)
    a, ra = seq([1, 2], 30, clock)
    eng.submit(a)
    eng.step()
    assert len(ra.tokens) == 1
    b, rb = seq(list(range(1, 41)), 3, clock)  # 40 tokens: 10 chunks of 4
    eng.submit(b)
    for i in range(10):
        before = eng.backend.prefilled_tokens
        eng.step()
        assert eng.backend.prefilled_tokens - before <= 4  # the prefill budget per step
        assert len(ra.tokens) == 2 + i  # the running request got a token every step
    assert len(rb.tokens) == 1  # b's first token came with its last chunk
    run(eng, lambda: ra.finished and rb.finished)
    assert rb.tokens == alone(list(range(1, 41)), 3)


def test_cancel_frees_the_slot_within_one_step():
    eng, clock = make_engine(slots=1)
    s, rec = seq([1, 2, 3], 50, clock)
    eng.submit(s)
    run(eng, lambda: len(rec.tokens) >= 3)
    eng.cancel(s)
    eng.step()
    assert rec.finished.reason == FinishReason.CANCELLED
    assert eng.scheduler.free_slots == [0] and not eng.running
    assert rec.finished.completion_tokens == len(rec.tokens)


def test_deadlines_shed_queued_requests_and_end_running_ones():
    eng, clock = make_engine(slots=1)
    running, r1 = seq([1, 2], 50, clock, deadline=clock() + 5)
    queued, r2 = seq([3], 5, clock, deadline=clock() + 1)
    eng.submit(running)
    eng.submit(queued)
    for _ in range(3):
        eng.step()
    clock.t += 2  # the queued request's deadline passes before it ever got a slot
    eng.step()
    assert r2.finished.reason == FinishReason.DEADLINE and r2.tokens == []
    assert r1.finished is None
    clock.t += 5
    eng.step()
    assert r1.finished.reason == FinishReason.DEADLINE
    assert len(r1.tokens) == 4 == r1.finished.completion_tokens  # the text already streamed is kept
    assert eng.scheduler.free_slots == [0]


def test_interactive_preempts_background_which_resumes_intact():
    eng, clock = make_engine(slots=2)
    bg = []
    for i in (1, 10):
        clock.t += 0.1
        bg.append(seq([i, i + 1, i + 2], 20, clock, Priority.BACKGROUND))
        eng.submit(bg[-1][0])
    run(eng, lambda: all(len(r.tokens) >= 5 for _, r in bg))
    clock.t += 1
    urgent, ru = seq([7, 7, 7], 4, clock, Priority.INTERACTIVE)
    eng.submit(urgent)
    eng.step()
    assert len(ru.tokens) == 1  # first token in the very next step
    preempted = [s for s, _ in bg if s.preemptions]
    assert len(preempted) == 1 and preempted[0] is bg[1][0]  # the latest-arrived of the lowest class
    run(eng, lambda: ru.finished)
    assert not any(r.finished for _, r in bg)  # the interactive request finished first
    run(eng, lambda: all(r.finished for _, r in bg))
    for (_, r), first in zip(bg, (1, 10)):
        assert r.tokens == alone([first, first + 1, first + 2], 20)  # resumed by re-prefill, nothing lost
        assert r.finished.reason == FinishReason.LENGTH
    assert bg[1][1].finished.preemptions == 1


def test_higher_class_is_admitted_first():
    eng, clock = make_engine(slots=1)
    first, r0 = seq([1], 3, clock, Priority.NORMAL)
    eng.submit(first)
    eng.step()
    later = [seq([2], 3, clock, Priority.BACKGROUND), seq([3], 3, clock, Priority.NORMAL)]
    for s, _ in later:
        eng.submit(s)
    run(eng, lambda: r0.finished)
    eng.step()
    assert later[1][0].slot == 0 and later[0][0].slot is None  # normal before background, despite arrival
    # Equal classes never preempt each other.
    assert later[1][0].preemptions == 0


def test_queue_bound_raises_with_a_retry_hint():
    eng, clock = make_engine(slots=1, max_queued=2)
    # A burst before the engine steps: the first takes the free slot, the next two queue, the fourth is refused.
    for i in range(3):
        eng.submit(seq([i + 1], 3, clock)[0])
    with pytest.raises(QueueFullError) as err:
        eng.submit(seq([9], 3, clock)[0])
    assert err.value.retry_after_s > 0
    eng.step()
    assert (eng.slots_in_use, eng.queue_length) == (1, 2)
    with pytest.raises(QueueFullError):
        eng.submit(seq([9], 3, clock)[0])


def test_conversation_turn_prefills_only_new_tokens():
    eng, clock = make_engine(slots=2)
    conv = Conversation("c")
    t1, r1 = seq([1, 2, 3, 4, 5], 6, clock, conversation=conv)
    eng.submit(t1)
    run(eng, lambda: r1.finished)
    assert conv.slot is not None and eng.slots_in_use == 1  # the idle conversation keeps its slot
    history = [1, 2, 3, 4, 5, *r1.tokens]
    before = eng.backend.prefilled_tokens
    t2, r2 = seq([*history, 8, 9], 4, clock, conversation=conv)
    eng.submit(t2)
    run(eng, lambda: r2.finished)
    # Cached: the prompt and all outputs but the last (which was sampled, never fed).
    assert r2.finished.cached_prompt_tokens == len(history) - 1
    assert eng.backend.prefilled_tokens - before == 3
    assert r2.tokens == alone([*history, 8, 9], 4)
    assert not r2.finished.reprefilled
    eng.close(conv)
    eng.step()
    assert conv.slot is None and eng.slots_in_use == 0


def test_idle_conversation_is_evicted_under_pressure_and_reprefills():
    eng, clock = make_engine(slots=1)
    conv = Conversation("c")
    t1, r1 = seq([1, 2, 3], 4, clock, conversation=conv)
    eng.submit(t1)
    run(eng, lambda: r1.finished)
    other, ro = seq([5, 6], 3, clock)
    eng.submit(other)  # needs the only slot, held by the idle conversation
    run(eng, lambda: ro.finished)
    assert conv.slot is None and conv.evicted
    history = [1, 2, 3, *r1.tokens]
    t2, r2 = seq([*history, 7], 3, clock, conversation=conv)
    eng.submit(t2)
    run(eng, lambda: r2.finished)
    assert r2.finished.reprefilled and r2.finished.cached_prompt_tokens == 0
    assert r2.tokens == alone([*history, 7], 3)


def test_stop_on_eos_and_metrics_use_the_clock():
    eng, clock = make_engine(slots=1)
    s, rec = seq([1], 5, clock)
    clock.t += 0  # arrival == now
    eng.submit(s)
    clock.t += 2.5  # queued for 2.5 s before its first step
    eng.step()
    assert rec.tokens and rec.finished is None
    queue = eng.metrics.registry.get_sample_value("edgellm_queue_time_seconds_sum", {"priority": "normal"})
    assert queue == pytest.approx(2.5)
    eng.backend._next_logits = lambda row, pos, out: (out.fill(0), out.__setitem__(EOS, 10.0))
    eng.step()
    assert rec.finished.reason == FinishReason.STOP
    assert eng.metrics.registry.get_sample_value("edgellm_requests_total", {"priority": "normal", "reason": "stop"}) == 1


class ChunkRecorder(Recorder):
    """A Recorder that also keeps each chunk's tokens and the clock when it was handed over."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.chunks: list[tuple[float, list[int]]] = []

    def __call__(self, ev):
        super().__call__(ev)
        if isinstance(ev, TokenEvent):
            self.chunks.append((self.clock(), list(ev.token_ids)))


def test_stream_interval_batches_tokens_after_the_first_and_loses_none():
    expected = alone([5, 6, 7], 13)
    eng, clock = make_engine(slots=1)
    rec = ChunkRecorder(clock)
    eng.submit(Sequence([5, 6, 7], SamplingParams(temperature=0), 13, sink=rec, arrival=clock(), stream_interval=0.02))
    while not rec.finished:
        eng.step()
        clock.t += 0.008  # an 8 ms step
    assert rec.tokens == expected
    # The first token at once; then a chunk once 20 ms have passed since the last (every third 8 ms step);
    # the remainder with the end.
    assert [len(tokens) for _, tokens in rec.chunks] == [1, 3, 3, 3, 3]
    times = [t for t, _ in rec.chunks]
    assert all(b - a >= 0.02 - 1e-9 for a, b in zip(times[:-1], times[1:-1]))


def test_stream_interval_hands_over_held_tokens_on_cancel_and_preemption():
    eng, clock = make_engine(slots=1)
    rec = ChunkRecorder(clock)
    s = Sequence([1, 2], SamplingParams(temperature=0), 40, sink=rec, arrival=clock(), stream_interval=10.0,
                 priority=Priority.BACKGROUND)
    eng.submit(s)
    for _ in range(4):
        eng.step()
    assert len(s.output_ids) == 4 and rec.tokens == s.output_ids[:1]  # three held back
    urgent, urgent_rec = seq([9], 2, clock, priority=Priority.INTERACTIVE)
    eng.submit(urgent)
    eng.step()  # the background request is paused: what it generated goes out while it waits
    assert s.preemptions == 1 and rec.tokens == s.output_ids
    run(eng, lambda: urgent_rec.finished)
    run(eng, lambda: len(s.output_ids) >= 8)
    eng.cancel(s)
    eng.step()
    assert rec.finished.reason == FinishReason.CANCELLED
    assert rec.tokens == s.output_ids and rec.finished.completion_tokens == len(rec.tokens)


def assert_idle(eng):
    """Every slot free, nothing waiting or running."""
    assert eng.scheduler.free_slots == list(range(eng.backend.slots)) and not eng.running and eng.queue_length == 0


def test_idle_rows_of_a_decode_batch_are_left_alone():
    # b ends in slot 0; c then takes slot 0 and is prefilled in chunks while a decodes in slot 1. Each decode
    # batch spans row 0, whose buffers still hold b's last position and token: the row must not be written.
    eng, clock = make_engine(slots=2, chunk=4)
    b, rb = seq([3, 4], 6, clock)
    a, ra = seq([1, 2], 40, clock)
    eng.submit(b)
    eng.submit(a)
    run(eng, lambda: rb.finished)
    c, rc = seq(range(10, 30), 3, clock)
    eng.submit(c)
    eng.step()
    assert (c.slot, a.slot) == (0, 1) and c.cached == 4  # c is prefilling while a decodes
    run(eng, lambda: ra.finished and rc.finished)
    assert rc.tokens == alone(list(range(10, 30)), 3)
    assert ra.tokens == alone([1, 2], 40)


# ---- failures: one request's, a batch's, the engine's ------------------------------------------------------
VICTIM = list(range(5, 15))  # 10 prompt tokens: three chunks of at most 4
OTHERS = ([1, 2, 3], [4, 5])


class FailingSink(Recorder):
    """A sink that raises on the `at`-th token event it is handed (and takes no more after that)."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def __call__(self, ev):
        if isinstance(ev, TokenEvent):
            self.calls += 1
            if self.calls == self.at:
                raise ConnectionError("the client's queue is gone")
        super().__call__(ev)


def fail_on_call(real, n: int, error: Exception):
    """real, except that its n-th call raises error."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise error
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("stage", ["prefill", "sampling", "detokenizing", "stop-string matching", "handing events"])
def test_a_failure_in_one_requests_work_ends_it_alone(stage):
    n = 12
    expected = [alone(p, n) for p in OTHERS]
    poison, streamed = frozenset(), 2  # the failure hits the victim's third token
    if stage == "detokenizing":  # a token only the victim generates, which the tokenizer cannot decode
        out = alone(VICTIM, n)
        streamed = next(i for i in range(2, n) if out[i] not in out[:i] and not any(out[i] in e for e in expected))
        poison = frozenset({out[streamed]})
    eng, clock = make_engine(slots=2, chunk=4, tokenizer=FakeTokenizer(poison))
    others = [seq(p, n, clock) for p in OTHERS]
    rv = FailingSink(at=3) if stage == "handing events" else Recorder()
    victim = Sequence(VICTIM, SamplingParams(temperature=0), n, sink=rv, arrival=clock())
    eng.submit(others[0][0])
    eng.submit(victim)  # prefilled in chunks while the first decodes; the second waits for a slot
    eng.submit(others[1][0])
    if stage == "prefill":  # its second chunk, each time it is tried (a mixed step fails, then its own call)
        real_prefill = eng.backend.prefill

        def prefill(slot, token_ids, start):
            if slot == victim.slot and start > 0:
                raise RuntimeError("injected")
            return real_prefill(slot, token_ids, start)

        eng.backend.prefill = prefill
    elif stage == "sampling":
        victim.sampler.sample = fail_on_call(victim.sampler.sample, 3, FloatingPointError("injected"))
    elif stage == "stop-string matching":
        victim.text._emit = fail_on_call(victim.text._emit, 3, IndexError("injected"))
    run(eng, lambda: rv.finished and all(r.finished for _, r in others))
    assert rv.finished.reason == FinishReason.ERROR, rv.finished
    assert rv.finished.message.startswith(stage), rv.finished.message
    if stage == "prefill":
        assert re.fullmatch(r"prefill of tokens \d+\.\.\d+ failed: RuntimeError: injected", rv.finished.message)
        assert rv.tokens == []
    else:
        assert len(rv.tokens) == streamed  # the tokens before the failing one were streamed
    for (_, r), tokens in zip(others, expected):
        assert r.finished.reason == FinishReason.LENGTH and r.tokens == tokens
    assert_idle(eng)


def test_a_failed_decode_call_ends_its_batch_and_the_engine_goes_on():
    eng, clock = make_engine(slots=2)
    conv = Conversation("c")
    a, ra = seq([1, 2, 3], 10, clock, conversation=conv)
    b, rb = seq([4, 5], 10, clock)
    c, rc = seq([6, 7], 10, clock)
    for s in (a, b, c):
        eng.submit(s)
    run(eng, lambda: len(ra.tokens) >= 3 and len(rb.tokens) >= 3)
    eng.backend.decode = fail_on_call(eng.backend.decode, 1, RuntimeError("device lost"))
    eng.step()
    for r in (ra, rb):
        assert r.finished.reason == FinishReason.ERROR
        assert r.finished.message == "decode step (a batch of 2 requests) failed: RuntimeError: device lost"
    # The failed call may have half-written the conversation's cache: it is dropped, and the next turn
    # prefills the whole history again.
    assert conv.slot is None and conv.evicted and eng.held == []
    run(eng, lambda: rc.finished)
    assert rc.finished.reason == FinishReason.LENGTH and rc.tokens == alone([6, 7], 10)
    history = [1, 2, 3, *ra.tokens]
    t2, r2 = seq([*history, 8], 4, clock, conversation=conv)
    eng.submit(t2)
    run(eng, lambda: r2.finished)
    assert r2.finished.reprefilled and r2.tokens == alone([*history, 8], 4)
    eng.close(conv)
    eng.step()
    assert_idle(eng)


def gated(eng: Engine) -> StepGate:
    """A StepGate in front of eng's steps on its own thread."""
    gate = StepGate()
    run_step = eng.step

    def step():
        gate.pass_through()
        run_step()

    eng.step = step
    return gate


def test_a_step_that_raises_elsewhere_ends_the_running_requests_and_the_engine_goes_on():
    eng, clock = make_engine(slots=2)
    gate = gated(eng)
    gate.hold()
    eng.start()
    try:
        a, ra = seq([1, 2], 40, clock)
        eng.submit(a)
        gate.allow(2)
        assert wait_until(lambda: len(ra.tokens) == 2)
        eng.scheduler.schedule = fail_on_call(eng.scheduler.schedule, 1, KeyError("a bug"))  # outside any one request's work
        gate.allow(1)
        assert wait_until(lambda: ra.finished is not None)
        assert ra.finished.reason == FinishReason.ERROR
        assert ra.finished.message == "engine step failed: KeyError: 'a bug'"
        gate.open()
        b, rb = seq([4, 5], 6, clock)
        eng.submit(b)
        assert wait_until(lambda: rb.finished is not None)
        assert rb.finished.reason == FinishReason.LENGTH and rb.tokens == alone([4, 5], 6)
        assert eng._thread.is_alive()
    finally:
        gate.open()
        eng.stop()
    assert_idle(eng)


def test_failures_in_a_row_make_the_engine_give_up_once_and_stop_the_heartbeat():
    beats, reported = [], []
    eng, clock = make_engine(slots=2, max_consecutive_failures=2, heartbeat=lambda: beats.append(1), heartbeat_s=0.01,
                             on_failure=reported.append)
    broken = [True]
    real_decode = eng.backend.decode

    def decode(*args):
        if broken[0]:
            raise RuntimeError("device lost")
        return real_decode(*args)

    eng.backend.decode = decode
    eng.start()

    def finish(prompt, n=5):
        s, r = seq(prompt, n, clock)
        eng.submit(s)
        assert wait_until(lambda: r.finished is not None)
        return r.finished

    try:
        assert finish([1]).message == "decode step (a batch of 1 requests) failed: RuntimeError: device lost"
        broken[0] = False
        assert finish([2]).reason == FinishReason.LENGTH  # a decode that works starts the count again
        broken[0] = True
        assert finish([3]).reason == FinishReason.ERROR
        assert eng.failed is None and reported == []  # one failure since the last success: below 2
        assert finish([4]).reason == FinishReason.ERROR  # the second in a row
        assert wait_until(lambda: reported)
        assert reported == [eng.failed]
        assert reported[0] == ("2 failed steps in a row (engine.max_consecutive_failures); the last: "
                               "decode failed: RuntimeError: device lost")
        beats_then = len(beats)
        assert beats_then > 0
        broken[0] = False  # even a working backend: the engine has given up, requests end at once
        late = finish([5])
        assert late.reason == FinishReason.ERROR and late.message.startswith("the engine stopped serving: 2 failed steps")
        assert late.completion_tokens == 0
        assert len(beats) == beats_then and len(reported) == 1  # no heartbeat since, reported once
    finally:
        eng.stop()
    assert_idle(eng)


def test_stop_cancels_running_and_waiting_requests():
    eng, clock = make_engine(slots=1)
    gate = gated(eng)
    gate.hold()
    running, rr = seq([1, 2], 50, clock)
    waiting, rw = seq([3], 5, clock)
    eng.start()
    eng.submit(running)
    eng.submit(waiting)
    gate.allow(2)
    assert wait_until(lambda: len(rr.tokens) == 2)
    stopper = threading.Thread(target=eng.stop)
    stopper.start()
    assert wait_until(lambda: eng._stopping)
    gate.open()  # the step the engine was held before runs, then it stops
    stopper.join(10)
    assert not stopper.is_alive()
    for r in (rr, rw):
        assert r.finished.reason == FinishReason.CANCELLED and r.finished.message == "the server is shutting down"
    assert rw.finished.completion_tokens == 0 and rr.finished.completion_tokens == len(rr.tokens) == 3
    assert_idle(eng)


def test_a_preempted_conversation_turn_resumes_with_the_same_output():
    eng, clock = make_engine(slots=1)
    conv = Conversation("c")
    t1, r1 = seq([1, 2, 3], 4, clock, conversation=conv)
    eng.submit(t1)
    run(eng, lambda: r1.finished)
    prompt = [1, 2, 3, *r1.tokens, 5, 6]
    t2, r2 = seq(prompt, 12, clock, Priority.BACKGROUND, conversation=conv)
    eng.submit(t2)
    run(eng, lambda: len(r2.tokens) >= 4)
    urgent, ru = seq([9, 9], 3, clock, Priority.INTERACTIVE)
    eng.submit(urgent)
    eng.step()
    assert t2.preemptions == 1 and conv.slot is None and urgent.slot == 0
    run(eng, lambda: r2.finished and ru.finished)
    assert r2.tokens == alone(prompt, 12)  # resumed by prefilling prompt and outputs again: nothing lost
    assert r2.finished.preemptions == 1 and r2.finished.reprefilled and r2.finished.reason == FinishReason.LENGTH
    # The resumed turn's cache is the conversation's again, for the next turn.
    assert conv.slot == 0 and conv.tokens == [*prompt, *r2.tokens][:-1]
    eng.close(conv)
    eng.step()
    assert_idle(eng)


def test_closing_a_conversation_during_its_turn_lets_the_turn_finish_then_frees_the_slot():
    eng, clock = make_engine(slots=2)
    conv = Conversation("c")
    t, r = seq([1, 2, 3], 8, clock, conversation=conv)
    eng.submit(t)
    run(eng, lambda: len(r.tokens) >= 2)
    eng.close(conv)
    eng.step()
    assert r.finished is None and conv.slot == 0 and eng.slots_in_use == 1  # the turn goes on
    run(eng, lambda: r.finished)
    assert r.finished.reason == FinishReason.LENGTH and r.tokens == alone([1, 2, 3], 8)
    assert conv.slot is None and eng.held == []
    assert_idle(eng)


# ---- the retry hint ---------------------------------------------------------------------------------------
class TimedBackend(FakeBackend):
    """Calls that take time on the engine's clock: a prefill 4 ms + 1 ms per token, a decode step 30 ms
    whatever its rows (a memory-bound device)."""

    def __init__(self, slots: int, clock: Clock, max_seq: int):
        super().__init__(slots, max_seq)
        self.clock = clock

    def prefill(self, row, token_ids, start):
        self.clock.t += 0.004 + 0.001 * len(token_ids)
        return super().prefill(row, token_ids, start)

    def decode(self, *args):
        self.clock.t += 0.030
        return super().decode(*args)


@pytest.mark.parametrize("new_tokens", [5, 30, 200])
def test_the_retry_hint_is_within_2x_of_the_time_the_backlog_takes(new_tokens):
    clock = Clock()
    context = 8 + new_tokens + 1
    eng = Engine(TimedBackend(4, clock, context + 1), FakeTokenizer(), context, prefill_chunk_tokens=16,
                 max_queued=16, clock=clock)
    arrivals = iter(range(1, 1000))

    def submit() -> None:
        i = next(arrivals)
        eng.submit(seq([(i * 7 + k) % 90 for k in range(8)], new_tokens, clock)[0])

    def backlog_s() -> float:
        start = clock()
        run(eng, lambda: not eng.running and not eng.queue_length, max_steps=100_000)
        return clock() - start

    # Requests arrive faster than they are served, two per step, until one is turned away ...
    with pytest.raises(QueueFullError) as refused:
        while True:
            submit()
            submit()
            eng.step()
    assert eng.queue_length == 16
    hint, truth = refused.value.retry_after_s, backlog_s()
    assert truth / 2 <= hint <= truth * 2, (hint, truth)
    # ... and, the engine idle, a burst at once: what a client is told then rests on what the engine measured.
    with pytest.raises(QueueFullError) as refused:
        while True:
            submit()
    hint, truth = refused.value.retry_after_s, backlog_s()
    assert truth / 2 <= hint <= truth * 2, (hint, truth)


# ---- through a real daemon ----------------------------------------------------------------------------------
FR = pb.FinishReason


def test_a_failed_prefill_through_the_daemon_ends_that_request_alone(daemon, monkeypatch):
    real_prefill = daemon.daemon.backend.prefill

    def prefill(row, token_ids, start):
        if list(token_ids) == [7, 7, 7]:  # the victim's prompt
            raise RuntimeError("injected prefill failure")
        return real_prefill(row, token_ids, start)

    real_forward = daemon.daemon.backend.forward

    def forward(rows):  # a step that mixes the victim's prompt with the other's decode fails as a whole
        if any(list(r.token_ids) == [7, 7, 7] for r in rows):
            raise RuntimeError("injected step failure")
        return real_forward(rows)

    monkeypatch.setattr(daemon.daemon.backend, "prefill", prefill)
    monkeypatch.setattr(daemon.daemon.backend, "forward", forward)
    stub = daemon.stub()
    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(generate, stub, token_ids=pb.TokenIds(ids=[5, 6, 7]), max_new_tokens=30, ignore_eos=True)
        victim = pool.submit(generate, stub, token_ids=pb.TokenIds(ids=[7, 7, 7]), max_new_tokens=4, ignore_eos=True)
        ids, _, finished = victim.result(60)
        assert finished.reason == FR.FINISH_REASON_ERROR and ids == []
        assert finished.message == "prefill of tokens 0..2 failed: RuntimeError: injected prefill failure"
        ids, _, finished = other.result(60)
        assert finished.reason == FR.FINISH_REASON_LENGTH and len(ids) == 30
    assert wait_until(lambda: daemon.engine.slots_in_use == 0 and daemon.engine.queue_length == 0)


def test_drain_ends_unstarted_queued_requests_at_once_with_unavailable(tiny_bundle, tmp_path, step_gate):
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock")}, "engine": {"slots": 1}}).start()
    pool = ThreadPoolExecutor(2)
    session_in: queue.Queue = queue.Queue()
    try:
        gate = step_gate(d)
        gate.hold()
        stub = d.stub()
        # A background request streams two tokens; then an interactive one takes its slot: paused, with tokens.
        paused = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), max_new_tokens=20, ignore_eos=True,
                                                  priority=pb.PRIORITY_BACKGROUND), timeout=60)
        gate.allow(2)
        assert next(paused).HasField("tokens")
        assert wait_until(lambda: d.engine.steps == 2)
        urgent = pool.submit(generate, stub, token_ids=pb.TokenIds(ids=[9, 9]), max_new_tokens=4, ignore_eos=True,
                             priority=pb.PRIORITY_INTERACTIVE)
        assert wait_until(lambda: d.engine.queue_length == 1)
        gate.allow(1)
        assert wait_until(lambda: d.engine.steps == 3 and d.engine.queue_length == 1)  # the background one waits
        # Two requests queue behind them without a slot or a token: a Generate and a Session request.
        queued = pool.submit(generate, stub, token_ids=pb.TokenIds(ids=[3, 4]), max_new_tokens=4)
        session = stub.Session(iter(session_in.get, None), timeout=60)
        session_in.put(pb.SessionRequest(start=pb.StartRequest(id="s", request=pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[3, 5]), max_new_tokens=4))))
        assert wait_until(lambda: d.engine.queue_length == 3)
        drained = asyncio.run_coroutine_threadsafe(d.daemon.drain(60), d.loop)
        assert wait_until(lambda: d.engine.scheduler._refuse_queued is not None)
        gate.allow(1)  # one step: they end at its start, without waiting for the drain period
        with pytest.raises(grpc.RpcError) as refused:
            queued.result(30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry on another instance" in refused.value.details()
        msg = next(session)
        assert msg.id == "s" and msg.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "retry on another instance" in msg.error.message
        assert d.engine.queue_length == 1 and d.engine.scheduler.waiting[0].output_ids  # the paused one keeps waiting
        gate.open()
        rest = list(paused)
        assert rest[-1].finished.reason == FR.FINISH_REASON_LENGTH and rest[-1].finished.preemptions == 1
        assert rest[-1].finished.usage.completion_tokens == 20
        assert urgent.result(30)[2].reason == FR.FINISH_REASON_LENGTH
        session_in.put(None)
        assert list(session) == []
        drained.result(30)
        assert d.daemon.service.live == set()
    finally:
        session_in.put(None)
        pool.shutdown(wait=False, cancel_futures=True)
        d.stop()


# A failure injected into every decode step of a real `edgellm serve`, from outside the daemon's code: Python
# imports sitecustomize at start-up, from the PYTHONPATH the test gives the process.
SITECUSTOMIZE = """
import os

from daemon.backend_onnx import OnnxBackend

_decode = OnnxBackend.decode


def decode(self, *args):
    if os.path.exists(os.environ["EDGELLM_TEST_FAIL_DECODE"]):  # after the warm-up, once the test says so
        raise RuntimeError("injected decode failure")
    return _decode(self, *args)


OnnxBackend.decode = decode
"""


def test_an_engine_that_keeps_failing_turns_health_not_serving_and_refuses_requests(tiny_bundle, tmp_path):
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock")},
                                   "engine": {"max_consecutive_failures": 1}}).start()
    try:
        channel = grpc.insecure_channel(d.daemon.addresses[0])
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING

        def decode(*args):
            raise RuntimeError("device lost")

        d.daemon.backend.decode = decode
        stub = d.stub()
        finished = generate(stub, text="doomed", max_new_tokens=3, ignore_eos=True)[2]
        assert finished.reason == FR.FINISH_REASON_ERROR
        assert wait_until(d.daemon.engine_failed.is_set)
        assert d.engine.failed  # the reason run_daemon exits with
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            generate(stub, text="later", max_new_tokens=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        d.stop()


def test_an_engine_that_keeps_failing_ends_the_daemon_with_status_1(tiny_bundle, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    trigger = tmp_path / "fail-decode"
    config = tmp_path / "edgellm.yaml"
    config.write_text(yaml.safe_dump({"listen": {"unix": str(tmp_path / "s.sock")},
                                      "engine": {"threads": 1, "max_consecutive_failures": 2}}))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(120)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), repo, os.environ.get("PYTHONPATH", "")]),
           "EDGELLM_TEST_FAIL_DECODE": str(trigger), "NOTIFY_SOCKET": str(tmp_path / "notify"),
           "WATCHDOG_USEC": "200000"}  # pings every 50 ms while the engine works
    proc = subprocess.Popen([sys.executable, "-m", "edgellm", "serve", "--bundle", str(tiny_bundle), "--config", str(config)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while "READY=1" not in notify.recv(4096).decode().split("\n"):
            pass
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"unix:{tmp_path / 's.sock'}"))
        assert generate(stub, text="fine", max_new_tokens=3, ignore_eos=True)[2].reason == FR.FINISH_REASON_LENGTH
        trigger.touch()
        ids, _, finished = generate(stub, text="first", max_new_tokens=3, ignore_eos=True)
        assert finished.reason == FR.FINISH_REASON_ERROR and len(ids) == 1  # the token of its prefill
        assert finished.message == "decode step (a batch of 1 requests) failed: RuntimeError: injected decode failure"
        try:  # the second failure in a row: the engine gives up
            generate(stub, text="second", max_new_tokens=3, ignore_eos=True)
        except grpc.RpcError as e:  # the daemon may be gone before the request's end reaches the client
            assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(60) == 1
        stderr = proc.stderr.read()
        reason = ("2 failed steps in a row (engine.max_consecutive_failures); the last: decode failed: "
                  "RuntimeError: injected decode failure")
        assert f"the engine keeps failing; exiting so that the service manager restarts the daemon: {reason}" in stderr
        assert stderr.rstrip().endswith(f"edgellm serve: error: the engine keeps failing: {reason}"), stderr[-2000:]
        # What systemd saw: the reason as the service's status, and no watchdog ping after it.
        notify.settimeout(0)
        after: list[str] = []
        try:
            while True:
                msg = notify.recv(4096).decode()
                if after or f"STATUS=engine failed: {reason}" in msg.split("\n"):
                    after.append(msg)
        except BlockingIOError:
            pass
        assert after and not any("WATCHDOG=1" in m for m in after), after
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_max_consecutive_failures_is_validated():
    from daemon.config import ConfigError, parse_config

    assert parse_config(None).engine.max_consecutive_failures == 3
    with pytest.raises(ConfigError, match="'engine.max_consecutive_failures' must be at least 1, got 0"):
        parse_config({"engine": {"max_consecutive_failures": 0}})
