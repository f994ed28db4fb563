"""The engine: one thread that owns the backend and runs steps, with continuous batching over fixed slots.

A step: the scheduler plans it (daemon/scheduler.py), the model runner makes its backend calls
(daemon/model_runner.py), each sequence's logits row is sampled and detokenized (daemon/postprocess.py),
and the step's events go to the asyncio loop in one call. Nothing here runs on the event loop, and the
event loop never touches the backend: it only sets flags (`cancel`, `close`) and queues requests.

Failures stay as small as they can: a request's own work that raises (its prefill chunk, sampling,
detokenizing, stop strings, handing its events over) ends that request with ERROR and a message naming
the stage; a batched decode call that raises ends the requests in that batch. The engine thread never dies
of an exception, and after engine.max_consecutive_failures failed model calls in a row it gives up: it ends
every request, stops feeding the watchdog and tells the daemon, which exits for systemd to restart it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

from daemon.backend import Backend
from daemon.config import SpeculativeConfig
from daemon.metrics import EngineMetrics
from daemon.model_runner import ModelRunner
from daemon.pace import Pace
from daemon.postprocess import Outbox, Postprocessor
from daemon.prefix_cache import PrefixCache
from daemon.sampling import Sampler
from daemon.scheduler import Scheduler, StepPlan
from daemon.speculative import Drafter, Speculator, Verification
from daemon.sequence import (Conversation, FinishEvent, FinishReason, Priority, QueueFullError, Sequence, StageFailure,
                             TokenEvent)
from daemon.text_stream import TextStream
from daemon.thread_placement import pin_current_thread
from daemon.tokenizer import Tokenizer

log = logging.getLogger("edgellm.engine")


class EngineFailed(RuntimeError):
    """The engine gave up after engine.max_consecutive_failures failed steps in a row."""


class Engine:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, context_length: int, *,
                 prefill_chunk_tokens: int = 32, mixed_steps: bool = True, max_queued: int = 64,
                 loop: asyncio.AbstractEventLoop | None = None, metrics: EngineMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 heartbeat: Callable[[], None] | None = None, heartbeat_s: float | None = None,
                 cpu: int | None = None, max_consecutive_failures: int = 3,
                 on_failure: Callable[[str], None] | None = None, prefix_cache: PrefixCache | None = None,
                 speculative: SpeculativeConfig | None = None, drafter: Drafter | None = None):
        self.backend = backend
        self.context_length = context_length
        self.max_queued = max_queued
        self.loop = loop
        self.clock = clock
        self.metrics = metrics or EngineMetrics()
        self.class_metrics = {p: self.metrics.for_class(p.name.lower()) for p in Priority}
        self.metrics.bind_gauges(lambda: self.queue_length, lambda: self.slots_in_use, lambda: self.scheduler.kv_tokens())
        self.prefix_cache = prefix_cache  # daemon/prefix_cache.py: prompt blocks shared across requests; None: off
        if prefix_cache is not None:
            prefix_cache.bind_metrics(self.metrics)
        self.scheduler = Scheduler(backend.slots, context_length, prefill_chunk_tokens, prefix_cache, mixed_steps)
        # daemon/speculative.py: drafts checked in one pass; None when off (or the config leaves it off).
        self.speculator = None
        if speculative is not None and speculative.enabled:
            max_tokens = getattr(backend, "max_score_tokens", 0)
            if max_tokens > 1:
                self.speculator = Speculator(speculative, context_length, drafter, self.metrics, max_tokens - 1, clock)
            else:
                log.warning("speculative decoding is off: the %s backend cannot verify drafts (%s)", backend.name,
                            "its engine has no verify profile: compile the bundle again" if backend.name.startswith(
                                "tensorrt") else "no multi-position score")
        self.runner = ModelRunner(backend, self.metrics, clock, prefix_cache, mixed_steps, self.speculator)
        self.outbox = Outbox()
        self.post = Postprocessor(tokenizer, context_length, self.outbox, self.metrics, self.class_metrics, clock)
        self.pace = Pace()
        self._cond = threading.Condition()  # guards the scheduler's queue: the event loop submits to it
        self._stopping = False
        self._thread: threading.Thread | None = None
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
        seq.sampler = Sampler(seq.sampling, seq.prompt_ids, seq.grammar)
        seq.text = TextStream(self.post.detokenizer, seq.stop)
        with self._cond:
            # Requests that free slots will take at the next step are not queued behind anything: a burst
            # that arrives within one (slow) step must not be refused while slots stand empty.
            if self.scheduler.queued_beyond_free_slots() >= self.max_queued:
                raise QueueFullError(f"the queue is full ({self.max_queued} requests waiting)", self.retry_after_s())
            self.scheduler.add(seq)
            self._cond.notify()

    def cancel(self, seq: Sequence, message: str = "") -> None:
        seq.cancel_message = seq.cancel_message or message
        seq.cancel_requested = True
        self._wake()

    def refuse_queued(self, message: str) -> None:
        """At the next step, end the waiting requests that have no token yet with UNAVAILABLE (the drain's
        start: they can retry elsewhere at once); a request paused after streaming tokens keeps waiting."""
        with self._cond:
            self.scheduler.refuse_queued(message)
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
        return len(self.scheduler.waiting)

    @property
    def slots_in_use(self) -> int:
        return self.backend.slots - len(self.scheduler.free_slots)

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def held(self) -> list[Conversation]:
        return self.scheduler.held

    def retry_after_s(self) -> float:
        """A hint for clients turned away: the time the work already in the engine takes at its measured pace."""
        work = [*self.scheduler.running, *self.scheduler.waiting]  # a copy: the engine thread may change them meanwhile
        return self.pace.retry_after_s(work, self.backend.slots)

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
    def step(self) -> None:
        """Schedule, run the model, sample and detokenize each new token, deliver the step's events."""
        now = self.clock()
        self.pace.step_starts(now)
        with self._cond:
            plan = self.scheduler.schedule(now)
        self._start_and_end(plan, now)
        for seq, logits in self.runner.run(plan):  # each row is sampled before the next call reuses its buffer
            if isinstance(logits, StageFailure):
                ending = self.post.failed(logits)
            elif isinstance(logits, Verification):  # several rows: sampled in turn while the draft holds
                ending = self.speculator.verify(seq, logits, self.post.accept)
            else:
                ending = self.post.accept(seq, logits)
            if ending is not None:
                self._finish(seq, *ending)
        stats = self.runner.stats
        self._count_calls(stats.calls)
        if stats.prefilled + stats.decoded:
            self.metrics.tokens_per_step.observe(stats.prefilled + stats.decoded)
        self.steps += 1
        self._flush()
        self.pace.step_ran(now, stats)

    def _start_and_end(self, plan: StepPlan, now: float) -> None:
        """The plan's bookkeeping: queue times of the admitted, chunks of the paused, ends of the reaped."""
        for seq in plan.admitted:
            self.class_metrics[seq.priority].queue_time.observe(now - seq.arrival)
        for _ in plan.evicted:
            self.metrics.evictions.inc()
        for seq in plan.preempted:
            self.outbox.send_pending(seq, now)  # what it generated so far is not kept from the client while it waits
            self.metrics.preemptions.inc()
        for seq, reason, message in plan.ended:
            self._report_end(seq, reason, message=message)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_sequence: str = "", message: str = "") -> None:
        """End seq: its slot back to the scheduler (a failed step may have half-written a conversation's
        cache: an error drops it), its end to its sink."""
        self.scheduler.finish(seq, self.clock(), keep_cache=reason is not FinishReason.ERROR)
        self._report_end(seq, reason, stop_sequence, message)

    def _report_end(self, seq: Sequence, reason: FinishReason, stop_sequence: str = "", message: str = "") -> None:
        end = self.clock()
        if seq.sampler is not None:
            seq.sampler.release()  # its grammar state, at once: the request object may live on a while
        started = seq.started if seq.started is not None else end
        self.metrics.requests.labels(seq.priority.name.lower(), reason.value).inc()
        self.class_metrics[seq.priority].request_duration.observe(end - seq.arrival)
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            self.pace.finished(seq)
        self.outbox.finish(seq, FinishEvent(
            reason, len(seq.prompt_ids), len(seq.output_ids), started - seq.arrival,
            (seq.first_token_at - seq.arrival) if seq.first_token_at else 0.0, end - seq.arrival,
            stop_sequence, message, seq.cached_prompt_tokens, seq.reprefilled, seq.preemptions), end)

    def _run(self) -> None:
        if self.cpu is not None:
            pin_current_thread(self.cpu)
        while True:
            with self._cond:
                while not self._stopping and self.scheduler.idle():
                    self.pace.idle()
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

    def _count_calls(self, calls: dict[str, Exception | None]) -> None:
        """A failed model call adds to its kind's count; one that worked starts it again."""
        for kind, error in calls.items():
            if error is None:
                self._failures[kind] = 0
            else:
                self._count_failure(kind, error)

    def _count_failure(self, kind: str, e: Exception) -> None:
        self._failures[kind] += 1
        self._last_failure = f"{kind} failed: {type(e).__name__}: {e}"

    def _end_running_after(self, e: Exception) -> None:
        """After a step raised outside any one request's work: it cannot tell whose fault it was."""
        for seq in list(self.scheduler.running):
            try:
                self._finish(seq, FinishReason.ERROR, message=f"engine step failed: {type(e).__name__}: {e}")
            except Exception:  # _finish itself broken: take the request out all the same
                log.exception("ending a request after a failed step failed")
                if seq in self.scheduler.running:
                    self.scheduler.running.remove(seq)
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
            leftover = self.scheduler.take_all()
        for seq in leftover:
            self._finish(seq, reason, message=message)
        self._flush()

    def _flush(self) -> None:
        """Hand this step's events to the event loop in one call."""
        if not self.outbox.events:
            return
        events = self.outbox.take()
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
