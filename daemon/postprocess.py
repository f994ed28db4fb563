"""After the model: sample a sequence's next token, detokenize it, match stop strings, decide whether it ends,
and batch its tokens into chunks for the stream interval.

A failure in a request's own work (sampling, detokenizing, stop-string matching) ends that request alone,
with ERROR and a message naming the stage.
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import numpy as np

from daemon.metrics import ClassMetrics, EngineMetrics
from daemon.sequence import FinishEvent, FinishReason, Priority, Sequence, StageFailure, TokenEvent
from daemon.tokenizer import Tokenizer

log = logging.getLogger("edgellm.engine")


class Ending(NamedTuple):
    """Why a sequence ends, as postprocessing found it."""

    reason: FinishReason
    stop_sequence: str = ""
    message: str = ""


class Detokenizer:
    """The tokenizer's decode as TextStream calls it, its failures told apart from the stop-string matching around it."""

    def __init__(self, tokenizer: Tokenizer):
        self._decode = tokenizer.decode

    def decode(self, ids) -> str:
        try:
            return self._decode(ids)
        except Exception as e:
            raise StageFailure("detokenizing", e) from e


class Outbox:
    """A step's events, in order, handed to the event loop in one call at the step's end.

    With a stream interval, a sequence's tokens after its first are held and sent as one chunk once the
    interval has passed: every chunk costs the gRPC stack (and the client) the same CPU whatever its size,
    CPU that on a small box is taken from the model's threads."""

    def __init__(self) -> None:
        self.events: list[tuple[Sequence, TokenEvent | FinishEvent]] = []

    def emit(self, seq: Sequence, event: TokenEvent, now: float) -> None:
        if not (event.token_ids or event.text or event.tool_calls):
            return
        if not seq.stream_interval:
            self.events.append((seq, event))
            return
        pending = seq.pending_chunk
        if pending is None:
            seq.pending_chunk = event
        else:
            pending.token_ids += event.token_ids
            pending.text += event.text
            pending.tool_calls += event.tool_calls
            if event.logprobs:
                pending.logprobs = [*(pending.logprobs or ()), *event.logprobs]
        if seq.last_chunk_at is None or now - seq.last_chunk_at >= seq.stream_interval:
            self.send_pending(seq, now)

    def send_pending(self, seq: Sequence, now: float) -> None:
        """Hand over the tokens seq's stream interval holds back (before its end, or while it waits)."""
        if seq.pending_chunk is not None:
            self.events.append((seq, seq.pending_chunk))
            seq.pending_chunk = None
            seq.last_chunk_at = now

    def finish(self, seq: Sequence, event: FinishEvent, now: float) -> None:
        self.send_pending(seq, now)  # its held tokens go out before its end
        self.events.append((seq, event))

    def take(self) -> list[tuple[Sequence, TokenEvent | FinishEvent]]:
        events, self.events = self.events, []
        return events


class Postprocessor:
    def __init__(self, tokenizer: Tokenizer, context_length: int, outbox: Outbox, metrics: EngineMetrics,
                 class_metrics: dict[Priority, ClassMetrics], clock: Callable[[], float]):
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        self.detokenizer = Detokenizer(tokenizer)
        self.context_length = context_length
        self.outbox = outbox
        self.metrics = metrics
        self.class_metrics = class_metrics
        self.clock = clock

    @staticmethod
    def failed(failure: StageFailure) -> Ending:
        log.error("request failed: %s", failure, exc_info=failure.cause)
        return Ending(FinishReason.ERROR, message=str(failure))

    def accept(self, seq: Sequence, logits: np.ndarray) -> Ending | None:
        """Sample seq's next token and stream it; how seq ends, if it does (a failure ends it alone, with ERROR)."""
        try:
            token, logprob, top = seq.sampler.sample(logits, seq.output_ids)
        except Exception as e:
            return self.failed(StageFailure("sampling", e))
        try:
            return self._stream(seq, token, logprob, top)
        except StageFailure as failure:
            return self.failed(failure)

    def _stream(self, seq: Sequence, token: int, logprob: float, top) -> Ending | None:
        now = self.clock()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.class_metrics[seq.priority].time_to_first_token.observe(now - seq.arrival)
        else:
            self.class_metrics[seq.priority].inter_token_latency.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.output_ids.append(token)
        self.metrics.generated_tokens.inc()
        if not seq.ignore_eos and token in self.eos_ids:
            self.outbox.emit(seq, self._event(seq, [], self._text(seq, None), final=True), now)
            return Ending(FinishReason.STOP)
        delta, stopped = self._text(seq, token)
        lp = [(token, logprob, top)] if seq.sampling.logprobs else None
        if stopped:
            self.outbox.emit(seq, self._event(seq, [token], delta, lp, final=True), now)
            return Ending(FinishReason.STOP, seq.text.stopped_by or "")
        grammar = seq.sampler.grammar
        if grammar is not None and grammar.done:  # the format allows nothing more: complete, and it ends here
            self.outbox.emit(seq, self._event(seq, [token], delta + self._text(seq, None), lp, final=True), now)
            return Ending(FinishReason.STOP)
        if len(seq.output_ids) >= seq.max_new_tokens or seq.cached >= self.context_length:
            self.outbox.emit(seq, self._event(seq, [token], delta + self._text(seq, None), lp, final=True), now)
            return Ending(FinishReason.LENGTH)
        self.outbox.emit(seq, self._event(seq, [token], delta, lp), now)
        return None

    @staticmethod
    def _event(seq: Sequence, ids: list[int], delta: str, lp=None, final: bool = False) -> TokenEvent:
        """The event for new tokens and their text; with tools, call markup in the text becomes ToolCalls."""
        if seq.tool_calls is None:
            return TokenEvent(ids, delta, lp)
        try:
            text, calls = seq.tool_calls.read(delta, final)
        except Exception as e:
            raise StageFailure("reading tool calls", e) from e
        return TokenEvent(ids, text, lp, calls)

    @staticmethod
    def _text(seq: Sequence, token: int | None):
        """seq.text.push(token), or finish() for None; failures named by stage (decoding failures name themselves)."""
        try:
            return seq.text.finish() if token is None else seq.text.push(token)
        except StageFailure:
            raise
        except Exception as e:
            raise StageFailure("stop-string matching", e) from e
