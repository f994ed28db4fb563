"""The model runner: turns a step's plan into backend calls and hands back a logits row per sequence.

A step is one forward pass (Backend.forward) carrying the decode rows and the prompt chunks together, so the
weights are read once for both; with mixed steps off (engine.mixed_steps) it is a prefill call, then a decode call.
With speculative decoding the decode batch's speculating sequences become verify rows of that pass (their last
token and draft, logits at every position), yielded as a Verification for the speculator to accept; without
mixed steps each is a call of its own (Backend.score).

With a prefix cache it also copies the plan's cached blocks into their slots before the model calls, and after
each prefill chunk keeps the prompt's newly completed blocks in the cache.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from daemon.backend import Backend, StepRow
from daemon.metrics import EngineMetrics
from daemon.prefix_cache import restore_blocks
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
        self.prefill_s = 0.0  # seconds of the step spent on prompt tokens (a mixed step's share by tokens)
        self.calls: dict[str, Exception | None] = {}  # "prefill"/"decode"/"step" -> its error, None when it worked


class ModelRunner:
    def __init__(self, backend: Backend, metrics: EngineMetrics, clock: Callable[[], float],
                 prefix_cache: PrefixCache | None = None, mixed_steps: bool = True,
                 speculator: Speculator | None = None):
        self.backend = backend
        self.mixed_steps = mixed_steps
        self.speculator = speculator  # daemon/speculative.py; None: no speculative decoding
        self.metrics = metrics
        self.clock = clock
        self.prefix_cache = prefix_cache
        self.stats = StepStats()  # the last run's
        self._token_s = 0.0  # the last mixed step's seconds per token

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
                restore_blocks(self.backend, seq.slot, blocks)
            except Exception as e:  # this sequence's slot alone: it ends, the others go on
                failed.add(seq)
                yield seq, StageFailure("copying the cached prefix into its slot", e)
        prefills = [(s, end) for s, end in plan.prefills if s not in failed]
        seqs = [s for s in plan.decode if s not in failed] if failed else plan.decode
        verifies: list[tuple[Sequence, list[int]]] = []
        if self.speculator is not None and seqs:
            verifies = self.speculator.plan(seqs)
            if verifies:
                speculating = {s for s, _ in verifies}
                seqs = [s for s in seqs if s not in speculating]
        if self.mixed_steps and len(prefills) + bool(seqs) + len(verifies) > 1:
            logits = self._forward(prefills, seqs, verifies)
            if logits is not None:
                yield from self._forward_rows(prefills, seqs, verifies, logits)
                return
        for seq, end in prefills:
            yield from self._prefill(seq, end)
        if seqs:
            yield from self._decode(seqs)
        for seq, draft in verifies:
            yield seq, self._verify(seq, draft)

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

    def _forward(self, prefills: list[tuple[Sequence, int]], seqs: list[Sequence],
                 verifies: list[tuple[Sequence, list[int]]]) -> np.ndarray | None:
        """Decode rows and prompt chunks in one call: a logits row each (a prefill row's last token's). None when
        the call failed: the step is then run again as separate calls, which tell whose work fails (rewriting
        the same positions with the same tokens, so a half-written call leaves nothing behind)."""
        rows = [StepRow(s.slot, (s.output_ids[-1],), s.cached) for s in seqs]
        rows += [StepRow(s.slot, [s.token_at(i) for i in range(s.cached, end)], s.cached) for s, end in prefills]
        rows += [StepRow(s.slot, [s.output_ids[-1], *d], s.cached, logits=len(d) + 1) for s, d in verifies]
        started = self.clock()
        try:
            logits = self.backend.forward(rows)
        except Exception:
            log.warning("a step of %d decode rows, %d prompt chunks and %d verify rows failed; running it as separate "
                        "calls", len(seqs), len(prefills), len(verifies), exc_info=True)
            return None
        prompt_tokens = sum(end - s.cached for s, end in prefills)
        verify_tokens = sum(len(d) + 1 for _, d in verifies)
        # The pace (daemon/pace.py) wants seconds per prompt token: the step's time shared by its tokens; the
        # speculator's ledger gets each verify row's share the same way (more than the row adds: on the safe side).
        self._token_s = (self.clock() - started) / (prompt_tokens + len(seqs) + verify_tokens)
        self.stats.prefill_s += self._token_s * prompt_tokens
        self.stats.calls["step"] = None
        return logits

    def _forward_rows(self, prefills: list[tuple[Sequence, int]], seqs: list[Sequence],
                      verifies: list[tuple[Sequence, list[int]]],
                      logits: np.ndarray) -> Iterator[tuple[Sequence, np.ndarray | Verification]]:
        self.stats.decoded = len(seqs) + len(verifies)
        if self.speculator is not None and seqs:
            self.speculator.decoded(seqs, self._token_s * len(seqs), measured=False)
        for i, s in enumerate(seqs):
            s.cached += 1
            yield s, logits[i]
        for i, (s, end) in enumerate(prefills, start=len(seqs)):
            if self._prefilled(s, end):
                yield s, logits[i]
        at = len(seqs) + len(prefills)
        for s, d in verifies:
            n = len(d) + 1
            yield s, Verification(d, logits[at:at + n], s.cached, self._token_s * n)
            at += n
