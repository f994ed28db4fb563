"""The model runner: turns a step's plan into backend calls and hands back a logits row per sequence.

With speculative decoding, the decode batch's speculating sequences leave it: each gets a verify pass of its own
(Backend.score of its last token and draft), yielded as a Verification for the speculator to accept.

With a prefix cache it also copies the plan's cached blocks into their slots before the model calls, and after
each prefill chunk keeps the prompt's newly completed blocks in the cache.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from daemon.backend import Backend
from daemon.metrics import EngineMetrics
from daemon.scheduler import StepPlan
from daemon.sequence import Sequence, StageFailure
from daemon.speculative import Speculator, Verification

if TYPE_CHECKING:
    from daemon.prefix_cache import PrefixCache

log = logging.getLogger("edgellm.engine")


class StepStats:
    """What the last run computed, for the engine's failure count, pace and metrics."""

    __slots__ = ("prefilled", "decoded", "prefill_s", "calls")

    def __init__(self) -> None:
        self.prefilled = 0  # prompt tokens written to the cache
        self.decoded = 0  # sequences that got a decoded token
        self.prefill_s = 0.0  # seconds in the prefill call
        self.calls: dict[str, Exception | None] = {}  # "prefill"/"decode" -> its error, None when it worked


class ModelRunner:
    def __init__(self, backend: Backend, metrics: EngineMetrics, clock: Callable[[], float],
                 prefix_cache: PrefixCache | None = None, speculator: Speculator | None = None):
        self.backend = backend
        self.speculator = speculator  # daemon/speculative.py; None: no speculative decoding
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

    def run(self, plan: StepPlan) -> Iterator[tuple[Sequence, np.ndarray | Verification | StageFailure]]:
        """Each sequence with the logits row of its next token (a speculating one: its Verification), or the
        failure of the call it was in.

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
        seq = plan.prefill
        if seq is not None and seq not in failed:
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
                if self.prefix_cache is not None and seq.cache_scope is not None:
                    self._keep_prefix(seq)
                if end == seq.prefill_target() and not seq.output_ids:
                    self.metrics.cached_prompt_tokens.inc(seq.cached_prompt_tokens)
                    yield seq, logits
        seqs = [s for s in plan.decode if s not in failed] if failed else plan.decode
        verifies: list[tuple[Sequence, list[int]]] = []
        if self.speculator is not None and seqs:
            verifies = self.speculator.plan(seqs)
            if verifies:
                speculating = {s for s, _ in verifies}
                seqs = [s for s in seqs if s not in speculating]
        if seqs:
            yield from self._decode(seqs)
        for seq, draft in verifies:
            yield seq, self._verify(seq, draft)

    def _decode(self, seqs: list[Sequence]) -> Iterator[tuple[Sequence, np.ndarray | StageFailure]]:
        """One token for each of seqs, in one batch."""
        stats = self.stats
        started = self.clock()
        try:
            logits = self.backend.decode([s.slot for s in seqs], [s.output_ids[-1] for s in seqs],
                                         [s.cached for s in seqs])
        except Exception as e:  # one call for the whole batch: it cannot tell whose fault it was
            stats.calls["decode"] = e
            failure = StageFailure(f"decode step (a batch of {len(seqs)} requests)", e)
            for s in seqs:
                yield s, failure
            return
        if self.speculator is not None:
            self.speculator.decoded(seqs, self.clock() - started)
        stats.calls["decode"] = None
        stats.decoded = len(seqs)
        for s in seqs:
            s.cached += 1
            yield s, logits[s.slot]

    def _verify(self, seq: Sequence, draft: list[int]) -> Verification | StageFailure:
        """Score seq's last token and its draft at positions seq.cached.. in one call (seq.cached is then set by
        the speculator, as far as the draft is kept)."""
        stats = self.stats
        start = seq.cached
        started = self.clock()
        try:
            logits = self.backend.score(seq.slot, [seq.output_ids[-1], *draft], start)
        except Exception as e:  # this sequence alone was in the call
            stats.calls["decode"] = e
            return StageFailure(f"verify pass of {len(draft)} drafted tokens", e)
        stats.calls.setdefault("decode", None)  # a failed batch decode in this step still counts
        stats.decoded += 1
        return Verification(draft, logits, start, self.clock() - started)
