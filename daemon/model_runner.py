"""The model runner: turns a step's plan into backend calls and hands back a logits row per sequence.

A step is one forward pass (Backend.forward) carrying the decode rows and the prompt chunks together, so the
weights are read once for both; with mixed steps off (engine.mixed_steps) it is a prefill call, then a decode call.

With a prefix cache it also copies the plan's cached blocks into their slots before the model calls, and after
each prefill chunk keeps the prompt's newly completed blocks in the cache.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from daemon.backend import Backend, StepRow
from daemon.metrics import EngineMetrics
from daemon.scheduler import StepPlan
from daemon.sequence import Sequence, StageFailure

if TYPE_CHECKING:
    from daemon.prefix_cache import PrefixCache

log = logging.getLogger("edgellm.engine")


class StepStats:
    """What the last run computed, for the engine's failure count, pace and metrics."""

    __slots__ = ("prefilled", "decoded", "prefill_s", "calls")

    def __init__(self) -> None:
        self.prefilled = 0  # prompt tokens written to the cache
        self.decoded = 0  # sequences that got a decoded token
        self.prefill_s = 0.0  # seconds of the step spent on prompt tokens (a mixed step's share by tokens)
        self.calls: dict[str, Exception | None] = {}  # "prefill"/"decode"/"step" -> its error, None when it worked


class ModelRunner:
    def __init__(self, backend: Backend, metrics: EngineMetrics, clock: Callable[[], float],
                 prefix_cache: PrefixCache | None = None, mixed_steps: bool = True):
        self.backend = backend
        self.mixed_steps = mixed_steps
        self.metrics = metrics
        self.clock = clock
        self.prefix_cache = prefix_cache
        self.stats = StepStats()  # the last run's

    def _restore(self, seq: Sequence, blocks: list[np.ndarray]) -> None:
        """Copy prefix-cache blocks into positions 0.. of seq's slot."""
        at = 0
        for block in blocks:
            self.backend.write_kv(seq.slot, at, block)
            at += block.shape[3]

    def _keep_prefix(self, seq: Sequence) -> None:
        """Keep the full blocks of seq's prompt that its slot now holds in the prefix cache. The cache is an
        optimisation: a failed copy is logged and the request goes on."""
        try:
            slot = seq.slot
            self.prefix_cache.store(seq.prompt_ids, min(seq.cached, len(seq.prompt_ids)), seq.cache_scope,
                                    lambda start, end: self.backend.read_kv(slot, start, end))
        except Exception:
            log.exception("keeping a prompt's blocks in the prefix cache failed")

    def run(self, plan: StepPlan) -> Iterator[tuple[Sequence, np.ndarray | StageFailure]]:
        """Each sequence with the logits row of its next token, or the failure of the call it was in.

        A row is a view of the backend's reused buffer: the caller samples it before asking for the next.
        The prefilled sequence yields a row only when its prompt is complete; a sequence resumed after a
        preemption has its outputs prefilled again and decodes from the next step."""
        stats = self.stats  # reused: the last run's, until this one
        stats.prefilled = stats.decoded = 0
        stats.prefill_s = 0.0
        stats.calls.clear()
        failed: set[Sequence] = set()
        for seq, blocks in plan.restore:
            try:
                self._restore(seq, blocks)
            except Exception as e:  # this sequence's slot alone: it ends, the others go on
                failed.add(seq)
                yield seq, StageFailure("copying the cached prefix into its slot", e)
        prefills = [(s, end) for s, end in plan.prefills if s not in failed]
        seqs = [s for s in plan.decode if s not in failed] if failed else plan.decode
        if self.mixed_steps and len(prefills) + bool(seqs) > 1:
            logits = self._forward(prefills, seqs)
            if logits is not None:
                yield from self._forward_rows(prefills, seqs, logits)
                return
        for seq, end in prefills:
            yield from self._prefill(seq, end)
        if seqs:
            yield from self._decode(seqs)

    def _prefilled(self, seq: Sequence, end: int) -> bool:
        """Book a prefilled chunk; whether it completed a new prompt (whose logits give its first token)."""
        start = seq.cached
        self.stats.prefilled += end - start
        seq.cached = end
        self.metrics.prompt_tokens.inc(end - start)
        if self.prefix_cache is not None and seq.cache_scope is not None:
            self._keep_prefix(seq)
        if end == seq.prefill_target() and not seq.output_ids:
            self.metrics.cached_prompt_tokens.inc(seq.cached_prompt_tokens)
            return True
        return False

    def _prefill(self, seq: Sequence, end: int) -> Iterator[tuple[Sequence, np.ndarray | StageFailure]]:
        stats, start = self.stats, seq.cached
        started = self.clock()
        try:
            logits = self.backend.prefill(seq.slot, [seq.token_at(i) for i in range(start, end)], start)
        except Exception as e:  # only this sequence was in the call
            stats.calls["prefill"] = e
            yield seq, StageFailure(f"prefill of tokens {start}..{end - 1}", e)
            return
        stats.calls["prefill"] = None
        stats.prefill_s += self.clock() - started
        if self._prefilled(seq, end):
            yield seq, logits

    def _decode(self, seqs: list[Sequence]) -> Iterator[tuple[Sequence, np.ndarray | StageFailure]]:
        stats = self.stats
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

    def _forward(self, prefills: list[tuple[Sequence, int]], seqs: list[Sequence]) -> np.ndarray | None:
        """Decode rows and prompt chunks in one call: a logits row each (a prefill row's last token's). None when
        the call failed: the step is then run again as separate calls, which tell whose work fails (rewriting
        the same positions with the same tokens, so a half-written call leaves nothing behind)."""
        rows = [StepRow(s.slot, (s.output_ids[-1],), s.cached) for s in seqs]
        rows += [StepRow(s.slot, [s.token_at(i) for i in range(s.cached, end)], s.cached) for s, end in prefills]
        started = self.clock()
        try:
            logits = self.backend.forward(rows)
        except Exception:
            log.warning("a step of %d decode rows and %d prompt chunks failed; running it as separate calls",
                        len(seqs), len(prefills), exc_info=True)
            return None
        prompt_tokens = sum(end - s.cached for s, end in prefills)
        # The pace (daemon/pace.py) wants seconds per prompt token: the step's time shared by its tokens.
        self.stats.prefill_s += (self.clock() - started) * prompt_tokens / (prompt_tokens + len(seqs))
        self.stats.calls["step"] = None
        return logits

    def _forward_rows(self, prefills: list[tuple[Sequence, int]], seqs: list[Sequence],
                      logits: np.ndarray) -> Iterator[tuple[Sequence, np.ndarray]]:
        self.stats.decoded = len(seqs)
        for i, s in enumerate(seqs):
            s.cached += 1
            yield s, logits[i]
        for i, (s, end) in enumerate(prefills, start=len(seqs)):
            if self._prefilled(s, end):
                yield s, logits[i]
