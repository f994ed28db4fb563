"""The engine: one thread that owns the backend and runs steps, with continuous batching over fixed slots.

Data flows one way: the gRPC handlers submit `Sequence`s; each step admits waiting sequences into free
slots, prefills one chunk of one prompt, decodes one token for every sequence past its prompt in a
single batch, samples, detokenizes, and hands the step's events to the asyncio loop in one call.
Nothing here runs on the event loop, and the event loop never touches the backend.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from daemon.sampling import Sampler, SamplingParams
from daemon.text_stream import TextStream
from daemon.tokenizer import Tokenizer

log = logging.getLogger("edgellm.engine")


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"


class QueueFullError(Exception):
    """The wait queue is at its bound; the client should retry later."""


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


Sink = Callable[[TokenEvent | FinishEvent], None]


@dataclass(eq=False)
class Sequence:
    """One request as the engine sees it. Only the engine thread mutates it after submit()."""

    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    deadline: float | None = None  # time.monotonic() value
    sink: Sink = print
    arrival: float = field(default_factory=time.monotonic)
    # Engine state.
    slot: int | None = None
    cached: int = 0  # tokens whose K/V are in the slot
    output_ids: list[int] = field(default_factory=list)
    started: float | None = None
    first_token: float | None = None
    cancel_requested: bool = False  # set from the event loop; honoured at the next step
    sampler: Sampler | None = None
    text: TextStream | None = None

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]


class Backend(Protocol):
    name: str
    slots: int
    kv_cache_bytes: int

    def prefill(self, row: int, token_ids: list[int], start: int) -> np.ndarray: ...
    def decode_binding(self, rows: int) -> Any: ...
    def decode(self, binding: Any) -> np.ndarray: ...


def decode_rows(highest_slot: int, slots: int) -> int:
    """Rows a decode step runs: the next power of two above the highest busy slot, so shapes stay few."""
    rows = 1
    while rows <= highest_slot:
        rows *= 2
    return min(rows, slots)


class Engine:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, context_length: int, *,
                 prefill_chunk_tokens: int = 256, max_queued: int = 64,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.scratch_position = context_length  # the cache's extra last position: idle rows write there
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_queued = max_queued
        self.loop = loop
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        self.free_slots = list(range(backend.slots))
        self.running: list[Sequence] = []
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._events: list[tuple[Sink, TokenEvent | FinishEvent]] = []
        self.steps = 0

    # ---- called from the event loop -----------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        seq.sampler = Sampler(seq.sampling, seq.prompt_ids)
        seq.text = TextStream(self.tokenizer, seq.stop)
        with self._cond:
            if len(self._waiting) >= self.max_queued:
                raise QueueFullError(f"the queue is full ({self.max_queued} requests waiting); retry later")
            self._waiting.append(seq)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        seq.cancel_requested = True
        with self._cond:
            self._cond.notify()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def slots_in_use(self) -> int:
        return self.backend.slots - len(self.free_slots)

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
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self.running:
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # a failed step ends the requests in it, never the engine
                log.exception("engine step failed")
                for seq in list(self.running):
                    self._finish(seq, FinishReason.ERROR, message=f"engine failure: {e}")
                self._flush()
        for seq in [*self.running, *self._waiting]:
            self._finish(seq, FinishReason.CANCELLED, message="the server is shutting down")
        self._flush()

    def step(self) -> None:
        """Admit, prefill one chunk, decode one token for everyone decoding, deliver events."""
        now = time.monotonic()
        self._reap(now)
        self._admit(now)
        prefilling = next((s for s in self.running if s.cached < len(s.prompt_ids)), None)
        if prefilling is not None:
            self._prefill_chunk(prefilling)
        decoding = [s for s in self.running if s.output_ids and s is not prefilling]
        if decoding:
            self._decode(decoding)
        self.steps += 1
        self._flush()

    def _reap(self, now: float) -> None:
        """End sequences that were cancelled or ran past their deadline, freeing their slots."""
        with self._cond:
            dropped = [s for s in self._waiting if s.cancel_requested or (s.deadline is not None and now >= s.deadline)]
            for s in dropped:
                self._waiting.remove(s)
        for s in [*dropped, *[s for s in self.running if s.cancel_requested or (s.deadline is not None and now >= s.deadline)]]:
            self._finish(s, FinishReason.CANCELLED if s.cancel_requested else FinishReason.DEADLINE)

    def _admit(self, now: float) -> None:
        with self._cond:
            while self.free_slots and self._waiting:
                seq = self._waiting.popleft()
                seq.slot = self.free_slots.pop(0)
                seq.started = now
                self.running.append(seq)

    def _prefill_chunk(self, seq: Sequence) -> None:
        start = seq.cached
        chunk = seq.prompt_ids[start:start + self.prefill_chunk_tokens]
        logits = self.backend.prefill(seq.slot, chunk, start)
        seq.cached += len(chunk)
        if seq.cached == len(seq.prompt_ids):
            self._accept(seq, logits)

    def _decode(self, seqs: list[Sequence]) -> None:
        rows = decode_rows(max(s.slot for s in seqs), self.backend.slots)
        b = self.backend.decode_binding(rows)
        b.input_ids.fill(0)
        b.position_ids.fill(self.scratch_position)
        b.write_indices.fill(self.scratch_position)
        for s in seqs:
            b.input_ids[s.slot, 0] = s.last_token
            b.position_ids[s.slot, 0] = s.cached
            b.write_indices[s.slot] = s.cached
        logits = self.backend.decode(b)
        for s in seqs:
            s.cached += 1
            self._accept(s, logits[s.slot])

    def _accept(self, seq: Sequence, logits: np.ndarray) -> None:
        """Sample the next token from this sequence's logits row and stream it."""
        token, logprob, top = seq.sampler.sample(logits, seq.output_ids)
        if seq.first_token is None:
            seq.first_token = time.monotonic()
        seq.output_ids.append(token)
        if not seq.ignore_eos and token in self.eos_ids:
            self._emit(seq, TokenEvent([], seq.text.finish()))
            self._finish(seq, FinishReason.STOP)
            return
        delta, stopped = seq.text.push(token)
        lp = [(token, logprob, top)] if seq.sampling.logprobs else None
        self._emit(seq, TokenEvent([token], delta, lp))
        if stopped:
            self._finish(seq, FinishReason.STOP, stop_sequence=seq.text.stopped_by or "")
        elif len(seq.output_ids) >= seq.max_new_tokens or seq.cached >= self.context_length:
            self._emit(seq, TokenEvent([], seq.text.finish()))
            self._finish(seq, FinishReason.LENGTH)

    def _emit(self, seq: Sequence, event: TokenEvent) -> None:
        if event.token_ids or event.text:
            self._events.append((seq.sink, event))

    def _finish(self, seq: Sequence, reason: FinishReason, stop_sequence: str = "", message: str = "") -> None:
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            self.free_slots.sort()  # lowest slots first keeps decode batches small
            seq.slot = None
        if seq in self.running:
            self.running.remove(seq)
        end = time.monotonic()
        started = seq.started if seq.started is not None else end
        self._events.append((seq.sink, FinishEvent(
            reason, len(seq.prompt_ids), len(seq.output_ids), started - seq.arrival,
            (seq.first_token - seq.arrival) if seq.first_token else 0.0, end - seq.arrival,
            stop_sequence, message)))

    def _flush(self) -> None:
        """Hand this step's events to the event loop in one call."""
        if not self._events:
            return
        events, self._events = self._events, []
        if self.loop is None:
            for sink, ev in events:
                sink(ev)
        else:
            self.loop.call_soon_threadsafe(_deliver, events)


def _deliver(events: list[tuple[Sink, TokenEvent | FinishEvent]]) -> None:
    for sink, ev in events:
        sink(ev)
