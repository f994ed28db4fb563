"""The model runner: turns a step's plan into backend calls and hands back a logits row per sequence."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from daemon.backend import Backend
from daemon.metrics import EngineMetrics
from daemon.scheduler import StepPlan
from daemon.sequence import Sequence, StageFailure


class StepStats:
    """What the last run computed, for the engine's failure count, pace and metrics."""

    __slots__ = ("prefilled", "decoded", "prefill_s", "calls")

    def __init__(self) -> None:
        self.prefilled = 0  # prompt tokens written to the cache
        self.decoded = 0  # sequences that got a decoded token
        self.prefill_s = 0.0  # seconds in the prefill call
        self.calls: dict[str, Exception | None] = {}  # "prefill"/"decode" -> its error, None when it worked


class ModelRunner:
    def __init__(self, backend: Backend, metrics: EngineMetrics, clock: Callable[[], float]):
        self.backend = backend
        self.metrics = metrics
        self.clock = clock
        self.stats = StepStats()  # the last run's

    def run(self, plan: StepPlan) -> Iterator[tuple[Sequence, np.ndarray | StageFailure]]:
        """Each sequence with the logits row of its next token, or the failure of the call it was in.

        A row is a view of the backend's reused buffer: the caller samples it before asking for the next.
        The prefilled sequence yields a row only when its prompt is complete; a sequence resumed after a
        preemption has its outputs prefilled again and decodes from the next step."""
        stats = self.stats  # reused: the last run's, until this one
        stats.prefilled = stats.decoded = 0
        stats.prefill_s = 0.0
        stats.calls.clear()
        seq = plan.prefill
        if seq is not None:
            start, end = seq.cached, plan.prefill_end
            started = self.clock()
            try:
                logits = self.backend.prefill(seq.slot, [seq.token_at(i) for i in range(start, end)], start)
            except Exception as e:  # only this sequence was in the call
                stats.calls["prefill"] = e
                yield seq, StageFailure(f"prefill of tokens {start}..{end - 1}", e)
            else:
                stats.calls["prefill"] = None
                stats.prefill_s, stats.prefilled, seq.cached = self.clock() - started, end - start, end
                self.metrics.prompt_tokens.inc(end - start)
                if end == seq.prefill_target() and not seq.output_ids:
                    self.metrics.cached_prompt_tokens.inc(seq.cached_prompt_tokens)
                    yield seq, logits
        seqs = plan.decode
        if seqs:
            try:
                logits = self.backend.decode([s.slot for s in seqs], [s.output_ids[-1] for s in seqs],
                                             [s.cached for s in seqs])
            except Exception as e:  # one call for the whole batch: it cannot tell whose fault it was
                stats.calls["decode"] = e
                failure = StageFailure(f"decode step (a batch of {len(seqs)} requests)", e)
                for s in seqs:
                    yield s, failure
                return
            stats.calls["decode"] = None
            stats.decoded = len(seqs)
            for s in seqs:
                s.cached += 1
                yield s, logits[s.slot]
