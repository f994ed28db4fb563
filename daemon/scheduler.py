"""The engine: one thread that owns the backend and runs steps, with continuous batching over fixed slots.

Data flows one way: the gRPC handlers submit `Sequence`s; each step ends cancelled and expired
sequences, admits waiting ones into slots (highest priority class first, evicting idle conversation
caches and then preempting lower classes when the slots are full), prefills one chunk of one prompt,
decodes one token for every sequence past its prompt in a single batch, samples, detokenizes, and
hands the step's events to the asyncio loop in one call. Nothing here runs on the event loop, and the
event loop never touches the backend: it only sets flags (`cancel`, `close`) and appends to the queue.

Failures stay as small as they can: a request's own work that raises (its prefill chunk, sampling,
detokenizing, stop strings, handing its events over) ends that request with ERROR and a message naming
the stage; a batched decode call that raises ends the requests in that batch. The engine thread never dies
of an exception, and after engine.max_consecutive_failures failed model calls in a row it gives up: it ends
every request, stops feeding the watchdog and tells the daemon, which exits for systemd to restart it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from bundle_format.decode_buckets import decode_bucket
from daemon.conversation import Conversation
from daemon.metrics import EngineMetrics
from daemon.sampling import Sampler, SamplingParams
from daemon.text_stream import TextStream
from daemon.thread_placement import pin_current_thread
from daemon.tokenizer import Tokenizer

log = logging.getLogger("edgellm.engine")


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"
    UNAVAILABLE = "unavailable"  # ended before its first token because the server is going away: retry elsewhere


class Priority(enum.IntEnum):
    """Lower value, served first."""

    INTERACTIVE = 0
    NORMAL = 1
    BACKGROUND = 2


class EngineFailed(RuntimeError):
    """The engine gave up after engine.max_consecutive_failures failed steps in a row."""


class _StageFailure(Exception):
    """One request's own work failed: `stage` names the part, for the request's message."""

    def __init__(self, stage: str, cause: Exception):
        super().__init__(f"{stage} failed: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause


class _Detokenizer:
    """The tokenizer's decode as TextStream calls it, its failures told apart from the stop-string matching around it."""

    def __init__(self, tokenizer: Tokenizer):
        self._decode = tokenizer.decode

    def decode(self, ids) -> str:
        try:
            return self._decode(ids)
        except Exception as e:
            raise _StageFailure("detokenizing", e) from e


class QueueFullError(Exception):
    """The wait queue is at its bound; the client should retry later."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class TokenEvent:
    token_ids: list[int]
    text: str
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


@dataclass
class FinishEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    ttft_s: float
    total_s: float
    stop_sequence: str = ""
    message: str = ""
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the conversation's cache
    reprefilled: bool = False  # the conversation's cache had been evicted: its history was prefilled again
    preemptions: int = 0  # times this request was paused for a higher priority class
    output_ids: list[int] = field(default_factory=list)


Sink = Callable[[TokenEvent | FinishEvent], None]


@dataclass(eq=False)
class Sequence:
    """One request as the engine sees it. Only the engine thread mutates it after submit()."""

    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    deadline: float | None = None  # clock value
    sink: Sink = print
    arrival: float = 0.0
    priority: Priority = Priority.NORMAL
    conversation: Conversation | None = None
    stream_interval: float = 0.0  # seconds between chunks after the first token; 0: every token at once
    # Engine state.
    slot: int | None = None
    cached: int = 0  # tokens of prompt_ids + output_ids whose K/V are in the slot
    output_ids: list[int] = field(default_factory=list)
    started: float | None = None
    first_token: float | None = None
    last_token_at: float = 0.0
    cached_prompt_tokens: int = 0
    reprefilled: bool = False
    preemptions: int = 0
    cancel_requested: bool = False  # set from the event loop; honoured at the next step
    cancel_message: str = ""
    failure: str = ""  # set from the event loop with cancel_requested: end with ERROR and this message
    sink_failed: bool = False  # its sink raised: no more token events go to it
    sampler: Sampler | None = None
    text: TextStream | None = None
    pending_chunk: TokenEvent | None = None  # tokens waiting for the stream interval to pass
    last_chunk_at: float | None = None  # clock value of the last chunk handed to the sink

    def prefill_target(self) -> int:
        """Tokens that must be in the cache before decoding: the prompt, plus all outputs but the last
        after a preemption (the last sampled token is what the next decode step feeds)."""
        return len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]


class Backend(Protocol):
    name: str
    slots: int
    kv_cache_bytes: int

    def prefill(self, row: int, token_ids: list[int], start: int) -> np.ndarray: ...
    def decode_binding(self, rows: int) -> Any: ...
    def decode(self, binding: Any) -> np.ndarray: ...


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# Until a step has been measured, the retry hint assumes this many seconds per token (a small CPU's pace).
DEFAULT_TOKEN_S = 0.05
# The retry hint takes the mean of this many recent steps (a mean, since what counts is the total time).
PACE_WINDOW = 64
_RATIO_WEIGHT = 0.1  # weight of the newest finished request in the moving average of the completion ratio


class Engine:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, context_length: int, *,
                 prefill_chunk_tokens: int = 32, max_queued: int = 64,
                 loop: asyncio.AbstractEventLoop | None = None, metrics: EngineMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 heartbeat: Callable[[], None] | None = None, heartbeat_s: float | None = None,
                 cpu: int | None = None, max_consecutive_failures: int = 3,
                 on_failure: Callable[[str], None] | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_queued = max_queued
        self.loop = loop
        self.clock = clock
        self.metrics = metrics or EngineMetrics()
        self.class_metrics = {p: self.metrics.for_class(p.name.lower()) for p in Priority}
        self.metrics.bind_gauges(lambda: self.queue_length, lambda: self.slots_in_use, self._kv_tokens)
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        self.free_slots = list(range(backend.slots))
        self.running: list[Sequence] = []
        self.held: list[Conversation] = []  # conversations holding a slot (idle or busy)
        self._waiting: list[Sequence] = []  # guarded by _cond; small (max_queued), so scanned, not heaped
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._events: list[tuple[Sequence, TokenEvent | FinishEvent]] = []
        self._detokenizer = _Detokenizer(tokenizer)
        self._refuse_queued: str | None = None  # set by refuse_queued(): end the unstarted waiting requests
        # Measured service, for the retry hint: seconds per prompt token prefilled; seconds per decode step
        # (the step's time less its prefill) by the number of sequences it decoded, since a step of 4 costs
        # far less than 4 of 1; and the share of max_new_tokens that requests end up generating.
        self._prefill_token_s: deque[float] = deque(maxlen=PACE_WINDOW)
        self._decode_step_s: dict[int, deque[float]] = {}
        self._completion_ratio = 1.0
        # The last step, timed when the next one starts: (its start, prefill seconds, tokens prefilled, decoded).
        self._last_step: tuple[float, float, int, int] | None = None
        self.steps = 0
        # Failed model calls in a row, per kind ("prefill", "decode"; "step" for a step that raised elsewhere):
        # a success of the same kind resets it. At max_consecutive_failures the engine gives up (see _give_up).
        self.max_consecutive_failures = max_consecutive_failures
        self.on_failure = on_failure  # called on the engine thread with the reason, once, when it gives up
        self._failures = {"prefill": 0, "decode": 0, "step": 0}
        self._last_failure = ""
        self.failed: str | None = None  # why the engine gave up; from then on it ends every request at once
        # Called on the engine thread after every step, and every heartbeat_s while idle: proof of progress
        # for systemd's watchdog (a step stuck in the backend stops the calls).
        self.heartbeat = heartbeat
        self.heartbeat_s = heartbeat_s
        self.cpu = cpu  # the CPU the engine thread is pinned to (daemon/thread_placement.py), or None

    # ---- called from the event loop -----------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; raises QueueFullError when the queue is at its bound."""
        seq.sampler = Sampler(seq.sampling, seq.prompt_ids)
        seq.text = TextStream(self._detokenizer, seq.stop)
        with self._cond:
            # Requests that free slots will take at the next step are not queued behind anything: a burst
            # that arrives within one (slow) step must not be refused while slots stand empty.
            if len(self._waiting) - len(self.free_slots) >= self.max_queued:
                raise QueueFullError(f"the queue is full ({self.max_queued} requests waiting)", self.retry_after_s())
            self._waiting.append(seq)
            self._cond.notify()

    def cancel(self, seq: Sequence, message: str = "") -> None:
        seq.cancel_message = seq.cancel_message or message
        seq.cancel_requested = True
        self._wake()

    def refuse_queued(self, message: str) -> None:
        """At the next step, end the waiting requests that have no token yet with UNAVAILABLE (the drain's
        start: they can retry elsewhere at once); a request paused after streaming tokens keeps waiting."""
        with self._cond:
            self._refuse_queued = message
            self._cond.notify()

    def close(self, conversation: Conversation) -> None:
        """Release a conversation's cache (at the next step, or when its running turn ends)."""
        conversation.close_requested = True
        self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def slots_in_use(self) -> int:
        return self.backend.slots - len(self.free_slots)

    def _kv_tokens(self) -> int:
        return sum(s.cached for s in self.running) + sum(len(c.tokens) for c in self.held if not c.busy)

    def retry_after_s(self) -> float:
        """A hint for clients turned away: the time the work already in the engine takes at its measured pace.

        The work: every running and waiting request's prompt tokens not yet prefilled, and the tokens it has
        yet to decode (its max_new_tokens, scaled by the share recent requests used). The pace: seconds per
        prefilled token, and per decode step as full as the work allows, shared by the tokens it decodes; where
        no step that full was measured, the nearest size's (a decode step reads the weights once: its time
        grows little with its rows)."""
        work = [*self.running, *self._waiting]  # a copy: the engine thread may change `running` meanwhile
        prefill = decode = 0
        for s in work:
            prefill += max(s.prefill_target() - s.cached, 0)
            expected = max(round(s.max_new_tokens * self._completion_ratio), 1)
            decode += max(expected - max(len(s.output_ids), 1), 0)  # the first token comes with the prefill
        steps = dict(self._decode_step_s)
        batch = max(min(self.backend.slots, len(work)), 1)
        nearest = min(steps, key=lambda k: abs(k - batch), default=None)
        prefill_s = statistics.fmean(self._prefill_token_s) if self._prefill_token_s else None
        decode_s = statistics.fmean(steps[nearest]) / batch if nearest else prefill_s or DEFAULT_TOKEN_S
        return max(0.1, prefill * (prefill_s or decode_s) + decode * decode_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgellm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread:
            self._thread.join()

    # ---- the engine thread ----------------------------------------------------------------------
    def _idle(self) -> bool:
        return not self._waiting and not self.running and not any(c.close_requested for c in self.held)

    def _run(self) -> None:
        if self.cpu is not None:
            pin_current_thread(self.cpu)
        while True:
            with self._cond:
                while not self._stopping and self._idle():
                    self._last_step = None  # time spent idle is no step's
                    self._cond.wait(self.heartbeat_s)
                    self._beat()
                if self._stopping:
                    break
            try:
                self._turn()
            except Exception:  # the failure handling itself failed: no heartbeat for this turn, the loop goes on
                log.exception("the engine loop failed")
        self._end_all(FinishReason.CANCELLED, "the server is shutting down")

    def _turn(self) -> None:
        """One step with its failures counted, or, once the engine has given up, the end of what came in."""
        if self.failed is not None:
            self._end_all(FinishReason.ERROR, f"the engine stopped serving: {self.failed}")
            return
        try:
            self.step()
            self._failures["step"] = 0
        except Exception as e:  # outside any one request's work: end the running ones, never the engine
            log.exception("engine step failed")
            self._count_failure("step", e)
            self._end_running_after(e)
        self._beat()
        if max(self._failures.values()) >= self.max_consecutive_failures:
            self._give_up()

    def _beat(self) -> None:
        """Proof of progress for the watchdog; none once the engine has given up, so systemd sees it."""
        if self.heartbeat and self.failed is None:
            try:
                self.heartbeat()
            except Exception:
                log.exception("the engine's heartbeat failed")

    def _count_failure(self, kind: str, e: Exception) -> None:
        self._failures[kind] += 1
        self._last_failure = f"{kind} failed: {type(e).__name__}: {e}"

    def _end_running_after(self, e: Exception) -> None:
        """After a step raised outside any one request's work: it cannot tell whose fault it was."""
        for seq in list(self.running):
            try:
                self._finish(seq, FinishReason.ERROR, message=f"engine step failed: {type(e).__name__}: {e}")
            except Exception:  # _finish itself broken: take the request out all the same
                log.exception("ending a request after a failed step failed")
                if seq in self.running:
                    self.running.remove(seq)
        self._flush()

    def _give_up(self) -> None:
        """Too many failures in a row: end every request, stop the heartbeat and tell the daemon, once."""
        self.failed = (f"{self.max_consecutive_failures} failed steps in a row "
                       f"(engine.max_consecutive_failures); the last: {self._last_failure}")
        log.error("the engine gives up: %s", self.failed)
        self._end_all(FinishReason.ERROR, f"the engine stopped serving: {self.failed}")
        if self.on_failure:
            try:
                self.on_failure(self.failed)
            except Exception:
                log.exception("reporting the engine's failure failed")

    def _end_all(self, reason: FinishReason, message: str) -> None:
        with self._cond:
            leftover, self._waiting = [*self.running, *self._waiting], []
        for seq in leftover:
            self._finish(seq, reason, message=message)
        self._flush()

    def step(self) -> None:
        """End, admit, prefill one chunk, decode one token for everyone decoding, deliver events."""
        now = self.clock()
        self._time_last_step(now)
        self._reap(now)
        self._admit(now)
        prefilling = next((s for s in self.running if s.cached < s.prefill_target()), None)
        # The sequence prefilled in this step gets its token from the prefill: it decodes from the next step.
        decoding = [s for s in self.running if s is not prefilling and s.output_ids and s.cached == s.prefill_target()]
        prefilled = decoded = 0
        prefill_s = 0.0
        if prefilling is not None:
            # The chunk budget protects the inter-token latency of decoding sequences; with none, take it whole.
            budget = self.prefill_chunk_tokens if decoding else self.context_length
            started = self.clock()
            prefilled = self._prefill_chunk(prefilling, budget)
            prefill_s = self.clock() - started
        if decoding:
            decoded = self._decode(decoding)
        if prefilled + decoded:
            self.metrics.tokens_per_step.observe(prefilled + decoded)
        self.steps += 1
        self._flush()
        self._last_step = (now, prefill_s, prefilled, decoded)

    def _time_last_step(self, now: float) -> None:
        """Record the pace for retry hints: a prefill's seconds per token, and the rest of the last step until
        this one starts for a decode of that many sequences. Until this one starts, because the event loop
        streaming the step's tokens takes the GIL in between: that is as much the service's cost as the model."""
        if self._last_step is None:
            return
        start, prefill_s, prefilled, decoded = self._last_step
        if prefilled:
            self._prefill_token_s.append(prefill_s / prefilled)
        if decoded:
            if decoded not in self._decode_step_s:
                self._decode_step_s[decoded] = deque(maxlen=PACE_WINDOW)
            self._decode_step_s[decoded].append(now - start - prefill_s)

    def _reap(self, now: float) -> None:
        """End sequences that were cancelled or ran past their deadline; release closed conversations."""
        def ended(s: Sequence) -> bool:
            return s.cancel_requested or (s.deadline is not None and now >= s.deadline)

        with self._cond:
            dropped = [s for s in self._waiting if ended(s)]
            self._waiting = [s for s in self._waiting if not ended(s)]
            refused, message, self._refuse_queued = [], self._refuse_queued, None
            if message is not None:
                refused = [s for s in self._waiting if not s.output_ids]
                self._waiting = [s for s in self._waiting if s.output_ids]
        for s in refused:
            self._finish(s, FinishReason.UNAVAILABLE, message=message)
        for s in [*dropped, *[s for s in self.running if ended(s)]]:
            if s.failure:
                self._finish(s, FinishReason.ERROR, message=s.failure)
            elif s.cancel_requested:
                self._finish(s, FinishReason.CANCELLED, message=s.cancel_message)
            else:
                self._finish(s, FinishReason.DEADLINE)
        for conv in [c for c in self.held if c.close_requested and not c.busy]:
            self._release(conv)

    def _release(self, conv: Conversation) -> None:
        """Give a conversation's slot back; its next turn (if any) prefills its whole history again."""
        self.held.remove(conv)
        self._free(conv.slot)
        conv.slot, conv.tokens, conv.evicted = None, [], True

    def _free(self, slot: int) -> None:
        self.free_slots.append(slot)
        self.free_slots.sort()  # lowest slots first keeps decode batches small

    def _next_waiting(self) -> Sequence | None:
        """Highest class first, then arrival order; a conversation's turn waits while another runs."""
        ready = [s for s in self._waiting if s.conversation is None or not s.conversation.busy]
        return min(ready, key=lambda s: (s.priority, s.arrival), default=None)

    def _admit(self, now: float) -> None:
        with self._cond:
            while (seq := self._next_waiting()) is not None:
                conv = seq.conversation
                if conv is not None and conv.slot is not None:
                    slot = conv.slot
                elif self.free_slots:
                    slot = self.free_slots.pop(0)
                elif (slot := self._evict_idle_conversation()) is None and (slot := self._preempt_below(seq.priority, now)) is None:
                    break
                self._waiting.remove(seq)
                self._place(seq, slot, now)

    def _evict_idle_conversation(self) -> int | None:
        idle = [c for c in self.held if not c.busy]
        if not idle:
            return None
        victim = min(idle, key=lambda c: c.last_used)
        self._release(victim)
        self.metrics.evictions.inc()
        log.info("evicted the cache of idle conversation %s", victim.id)
        return self.free_slots.pop(0)

    def _preempt_below(self, priority: Priority, now: float) -> int | None:
        """Pause the latest-arrived running sequence of the lowest class below `priority`; its slot is taken."""
        lower = [s for s in self.running if s.priority > priority]
        if not lower:
            return None
        victim = max(lower, key=lambda s: (s.priority, s.arrival))
        self.running.remove(victim)
        slot = victim.slot
        victim.slot, victim.cached = None, 0  # its cache is overwritten: it re-prefills when resumed
        victim.preemptions += 1
        self._send_pending_chunk(victim, now)  # what it generated so far is not kept from the client while it waits
        if victim.conversation is not None:
            conv = victim.conversation
            self.held.remove(conv)
            conv.slot, conv.tokens, conv.busy = None, [], False
            victim.reprefilled = True
        self._waiting.append(victim)
        self.metrics.preemptions.inc()
        return slot

    def _place(self, seq: Sequence, slot: int, now: float) -> None:
        seq.slot = slot
        conv = seq.conversation
        if conv is not None:
            if conv.slot is None:
                conv.slot = slot
                self.held.append(conv)
                seq.reprefilled = seq.reprefilled or conv.evicted
            # Reuse the cached prefix; at least one prompt token is computed again to get its logits.
            reuse = min(common_prefix(conv.tokens, seq.prompt_ids), len(seq.prompt_ids) - 1) if not seq.output_ids else 0
            seq.cached = seq.cached_prompt_tokens = reuse
            conv.busy = True
        if seq.started is None:
            seq.started = now
            self.class_metrics[seq.priority].queue_time.observe(now - seq.arrival)
        self.running.append(seq)

    def _prefill_chunk(self, seq: Sequence, budget: int) -> int:
        """Prefill one chunk of seq's prompt; the tokens computed (0 when it failed and seq ended)."""
        start, target = seq.cached, seq.prefill_target()
        end = min(target, start + budget)
        try:
            logits = self.backend.prefill(seq.slot, [seq.token_at(i) for i in range(start, end)], start)
        except Exception as e:  # only this sequence was in the call
            self._count_failure("prefill", e)
            self._fail(seq, _StageFailure(f"prefill of tokens {start}..{end - 1}", e))
            return 0
        self._failures["prefill"] = 0
        seq.cached = end
        self.metrics.prompt_tokens.inc(end - start)
        if end == target and not seq.output_ids:
            self.metrics.cached_prompt_tokens.inc(seq.cached_prompt_tokens)
            self._accept(seq, logits)
        return end - start

    def _decode(self, seqs: list[Sequence]) -> int:
        """One token for each of seqs in one batched call; the tokens computed (0 when the call failed)."""
        try:
            rows = decode_bucket(max(s.slot for s in seqs), self.backend.slots)
            b = self.backend.decode_binding(rows)
            # Idle rows: the backend writes nothing for them and their logits go unread; their input id is whatever
            # valid token the row last held, so it needs no reset.
            b.positions.fill(-1)
            for s in seqs:
                b.input_ids[s.slot, 0] = s.output_ids[-1]
                b.positions[s.slot] = s.cached
            logits = self.backend.decode(b)
        except Exception as e:  # one call for the whole batch: it cannot tell whose fault it was
            self._count_failure("decode", e)
            failure = _StageFailure(f"decode step (a batch of {len(seqs)} requests)", e)
            for s in seqs:
                self._fail(s, failure)
            return 0
        self._failures["decode"] = 0
        for s in seqs:
            s.cached += 1
            self._accept(s, logits[s.slot])
        return len(seqs)

    def _fail(self, seq: Sequence, failure: _StageFailure) -> None:
        log.error("request failed: %s", failure, exc_info=failure.cause)
        self._finish(seq, FinishReason.ERROR, message=str(failure))

    def _accept(self, seq: Sequence, logits: np.ndarray) -> None:
        """Sample seq's next token and stream it; a failure in that ends seq alone, with ERROR."""
        try:
            self._sample_and_stream(seq, logits)
        except _StageFailure as failure:
            self._fail(seq, failure)

    def _sample_and_stream(self, seq: Sequence, logits: np.ndarray) -> None:
        try:
            token, logprob, top = seq.sampler.sample(logits, seq.output_ids)
        except Exception as e:
            raise _StageFailure("sampling", e) from e
        now = self.clock()
        if seq.first_token is None:
            seq.first_token = now
            self.class_metrics[seq.priority].time_to_first_token.observe(now - seq.arrival)
        else:
            self.class_metrics[seq.priority].inter_token_latency.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.output_ids.append(token)
        self.metrics.generated_tokens.inc()
        if not seq.ignore_eos and token in self.eos_ids:
            self._emit(seq, TokenEvent([], self._text(seq, None)), now)
            self._finish(seq, FinishReason.STOP)
            return
        delta, stopped = self._text(seq, token)
        lp = [(token, logprob, top)] if seq.sampling.logprobs else None
        self._emit(seq, TokenEvent([token], delta, lp), now)
        if stopped:
            self._finish(seq, FinishReason.STOP, stop_sequence=seq.text.stopped_by or "")
        elif len(seq.output_ids) >= seq.max_new_tokens or seq.cached >= self.context_length:
            self._emit(seq, TokenEvent([], self._text(seq, None)), now)
            self._finish(seq, FinishReason.LENGTH)

    @staticmethod
    def _text(seq: Sequence, token: int | None):
        """seq.text.push(token), or finish() for None; failures named by stage (decoding failures name themselves)."""
        try:
            return seq.text.finish() if token is None else seq.text.push(token)
        except _StageFailure:
            raise
        except Exception as e:
            raise _StageFailure("stop-string matching", e) from e

    def _emit(self, seq: Sequence, event: TokenEvent, now: float) -> None:
        if not (event.token_ids or event.text):
            return
        if not seq.stream_interval:
            self._events.append((seq, event))
            return
        # Batched streaming: every chunk costs the gRPC stack (and the client) the same CPU whatever its
        # size, CPU that on a small box is taken from the model's threads.
        pending = seq.pending_chunk
        if pending is None:
            seq.pending_chunk = event
        else:
            pending.token_ids += event.token_ids
            pending.text += event.text
            if event.logprobs:
                pending.logprobs = [*(pending.logprobs or ()), *event.logprobs]
        if seq.last_chunk_at is None or now - seq.last_chunk_at >= seq.stream_interval:
            self._send_pending_chunk(seq, now)

    def _send_pending_chunk(self, seq: Sequence, now: float) -> None:
        if seq.pending_chunk is not None:
            self._events.append((seq, seq.pending_chunk))
            seq.pending_chunk = None
            seq.last_chunk_at = now

    def _finish(self, seq: Sequence, reason: FinishReason, stop_sequence: str = "", message: str = "") -> None:
        end = self.clock()
        self._send_pending_chunk(seq, end)  # its pending chunk goes out before the end
        conv = seq.conversation
        if seq.slot is not None:
            if conv is not None and conv.slot == seq.slot:
                conv.busy, conv.last_used = False, end
                if conv.close_requested or reason is FinishReason.ERROR:  # a failed step may have half-written it
                    self._release(conv)
                else:  # keep the cache for the next turn: it holds prompt + outputs up to what was computed
                    conv.tokens = [seq.token_at(i) for i in range(seq.cached)]
                    conv.evicted = False
            else:
                self._free(seq.slot)
            seq.slot = None
        if seq in self.running:
            self.running.remove(seq)
        started = seq.started if seq.started is not None else end
        self.metrics.requests.labels(seq.priority.name.lower(), reason.value).inc()
        self.class_metrics[seq.priority].request_duration.observe(end - seq.arrival)
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            self._completion_ratio += _RATIO_WEIGHT * (len(seq.output_ids) / seq.max_new_tokens - self._completion_ratio)
        self._events.append((seq, FinishEvent(
            reason, len(seq.prompt_ids), len(seq.output_ids), started - seq.arrival,
            (seq.first_token - seq.arrival) if seq.first_token else 0.0, end - seq.arrival,
            stop_sequence, message, seq.cached_prompt_tokens, seq.reprefilled, seq.preemptions, seq.output_ids)))

    def _flush(self) -> None:
        """Hand this step's events to the event loop in one call."""
        if not self._events:
            return
        events, self._events = self._events, []
        if self.loop is None:
            self._deliver(events)
            return
        try:
            self.loop.call_soon_threadsafe(self._deliver, events)
        except RuntimeError:  # the loop is closed: nobody is left to read them
            log.warning("dropped %d events: the event loop is closed", len(events))

    def _deliver(self, events: list[tuple[Sequence, TokenEvent | FinishEvent]]) -> None:
        """Each event to its request's sink (on the event loop); a sink that raises ends its request alone."""
        for seq, ev in events:
            if seq.sink_failed and isinstance(ev, TokenEvent):
                continue
            try:
                seq.sink(ev)
            except Exception as e:
                log.error("handing an event to a request failed", exc_info=e)
                if not seq.sink_failed:
                    seq.sink_failed = True
                    seq.failure = f"handing events to the request failed: {type(e).__name__}: {e}"
                    self.cancel(seq)
