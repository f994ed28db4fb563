"""The scheduler: which requests hold the slots, and what each step computes. Pure policy, no model.

Each step, schedule(now) ends what was cancelled or ran past its deadline, releases closed conversations,
admits waiting requests into free slots (highest priority class first, then arrival; evicting idle
conversation caches and then pausing lower classes when the slots are full; a placed request starts from the
longest run of prefix-cache blocks its tokens begin with, copied in by the model runner), and picks the work: every
sequence past its prompt decodes one token, and prompt chunks fill the step's prompt-token budget
(prefill_chunk_tokens while others decode; with nothing decoding the first prompt whole). With mixed steps the
model runner computes all of it in one forward pass; without, one chunk of one prompt and then the decode batch
(two calls). finish(seq)
gives a request's slot back, keeping a conversation's cache for its next turn.

Not thread-safe: the engine calls add(), refuse_queued() and schedule() under its lock (the event loop
submits while the engine thread steps); everything else runs on the engine thread.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from daemon.sequence import Conversation, FinishReason, Priority, Sequence

if TYPE_CHECKING:
    from daemon.prefix_cache import PrefixCache

log = logging.getLogger("edgellm.engine")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class StepPlan:
    """What one step does. Sequences in `ended` are out of the scheduler already (their slots free)."""

    __slots__ = ("ended", "admitted", "preempted", "evicted", "restore", "prefills", "decode")

    def __init__(self) -> None:
        self.ended: list[tuple[Sequence, FinishReason, str]] = []  # (seq, reason, message)
        self.admitted: list[Sequence] = []  # got their first slot: their queue time ends
        self.preempted: list[Sequence] = []  # paused for a higher class, back in the queue
        self.evicted: list[Conversation] = []  # idle caches dropped to make room
        # Placed sequences whose first tokens come from the prefix cache: its blocks, copied into seq.slot from
        # position 0 before this step's model calls (seq.cached already counts them).
        self.restore: list[tuple[Sequence, list[Any]]] = []
        self.prefills: list[tuple[Sequence, int]] = []  # (seq, end): prefills tokens [seq.cached, end)
        self.decode: list[Sequence] = []  # one token each, in one batch


class Scheduler:
    def __init__(self, slots: int, context_length: int, prefill_chunk_tokens: int,
                 prefix_cache: PrefixCache | None = None, mixed_steps: bool = True):
        self.slots = slots
        self.prefix_cache = prefix_cache  # looked up at placement: only its keys and block count matter here
        self.context_length = context_length
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.mixed_steps = mixed_steps  # chunks of several prompts may share a step; else one chunk of one
        self.free_slots = list(range(slots))
        self.running: list[Sequence] = []
        self.held: list[Conversation] = []  # conversations holding a slot (idle or busy)
        self.waiting: list[Sequence] = []  # small (engine.max_queued), so scanned, not heaped
        self._refuse_queued: str | None = None

    # ---- under the engine's lock ----------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def queued_beyond_free_slots(self) -> int:
        """Waiting requests that the next step cannot place in a free slot."""
        return len(self.waiting) - len(self.free_slots)

    def refuse_queued(self, message: str) -> None:
        """At the next step, end the waiting requests that have no token yet (UNAVAILABLE, with `message`)."""
        self._refuse_queued = message

    def idle(self) -> bool:
        return not self.waiting and not self.running and not any(c.close_requested for c in self.held)

    def take_all(self) -> list[Sequence]:
        """Every running and waiting sequence, the waiting ones taken out of the queue (to end them all)."""
        everything, self.waiting = [*self.running, *self.waiting], []
        return everything

    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan()
        self._reap(now, plan)
        self._admit(now, plan)
        prefilling = [s for s in self.running if s.cached < s.prefill_target()]
        prefilling.sort(key=lambda s: s.priority)  # a higher class's prompt first; stable: then as they were placed
        # A sequence whose prefill completes in this step gets its token from the prefill: it decodes from the next.
        plan.decode = [s for s in self.running if s.output_ids and s.cached == s.prefill_target()]
        if prefilling:
            # The budget protects the inter-token latency of decoding sequences; with none, the first prompt whole.
            first = prefilling[0]
            budget = self.prefill_chunk_tokens
            if not plan.decode:
                budget = max(budget, first.prefill_target() - first.cached)
            for seq in prefilling if self.mixed_steps else [first]:
                end = min(seq.prefill_target(), seq.cached + budget)
                plan.prefills.append((seq, end))
                budget -= end - seq.cached
                if budget <= 0:
                    break
        return plan

    # ---- on the engine thread -------------------------------------------------------------------
    def finish(self, seq: Sequence, now: float, keep_cache: bool = True) -> None:
        """Take seq out and give its slot back; a conversation keeps its cache for the next turn unless
        `keep_cache` is False (a failed step may have half-written it) or the conversation was closed."""
        conv = seq.conversation
        if seq.slot is not None:
            if conv is not None and conv.slot == seq.slot:
                conv.busy, conv.last_used = False, now
                if conv.close_requested or not keep_cache:
                    self._release(conv)
                else:  # the cache holds prompt + outputs up to what was computed
                    conv.tokens = [seq.token_at(i) for i in range(seq.cached)]
                    conv.evicted = False
            else:
                self._free(seq.slot)
            seq.slot = None
        if seq in self.running:
            self.running.remove(seq)

    def kv_tokens(self) -> int:
        return sum(s.cached for s in self.running) + sum(len(c.tokens) for c in self.held if not c.busy)

    # ---- policy ---------------------------------------------------------------------------------
    def _reap(self, now: float, plan: StepPlan) -> None:
        """End sequences that were cancelled or ran past their deadline; release closed conversations."""
        def ended(s: Sequence) -> bool:
            return s.cancel_requested or (s.deadline is not None and now >= s.deadline)

        dropped = [s for s in self.waiting if ended(s)]
        self.waiting = [s for s in self.waiting if not ended(s)]
        ends = plan.ended
        message, self._refuse_queued = self._refuse_queued, None
        if message is not None:
            ends += [(s, FinishReason.UNAVAILABLE, message) for s in self.waiting if not s.output_ids]
            self.waiting = [s for s in self.waiting if s.output_ids]
        for s in [*dropped, *[s for s in self.running if ended(s)]]:
            if s.failure:
                ends.append((s, FinishReason.ERROR, s.failure))
            elif s.cancel_requested:
                ends.append((s, FinishReason.CANCELLED, s.cancel_message))
            else:
                ends.append((s, FinishReason.DEADLINE, ""))
        for s, reason, _ in ends:
            self.finish(s, now, keep_cache=reason is not FinishReason.ERROR)
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
        ready = [s for s in self.waiting if s.conversation is None or not s.conversation.busy]
        return min(ready, key=lambda s: (s.priority, s.arrival), default=None)

    def _admit(self, now: float, plan: StepPlan) -> None:
        while (seq := self._next_waiting()) is not None:
            conv = seq.conversation
            if conv is not None and conv.slot is not None:
                slot = conv.slot
            elif self.free_slots:
                slot = self.free_slots.pop(0)
            elif (slot := self._evict_idle_conversation(plan)) is None and (slot := self._preempt_below(seq.priority, plan)) is None:
                break
            self.waiting.remove(seq)
            self._place(seq, slot, now, plan)

    def _evict_idle_conversation(self, plan: StepPlan) -> int | None:
        idle = [c for c in self.held if not c.busy]
        if not idle:
            return None
        victim = min(idle, key=lambda c: c.last_used)
        self._release(victim)
        plan.evicted.append(victim)
        log.info("evicted the cache of idle conversation %s", victim.id)
        return self.free_slots.pop(0)

    def _preempt_below(self, priority: Priority, plan: StepPlan) -> int | None:
        """Pause the latest-arrived running sequence of the lowest class below `priority`; its slot is taken."""
        lower = [s for s in self.running if s.priority > priority]
        if not lower:
            return None
        victim = max(lower, key=lambda s: (s.priority, s.arrival))
        self.running.remove(victim)
        slot = victim.slot
        victim.slot, victim.cached = None, 0  # its cache is overwritten: it re-prefills when resumed
        plan.restore = [(s, blocks) for s, blocks in plan.restore if s is not victim]  # placed earlier this step
        victim.preemptions += 1
        if victim.conversation is not None:
            conv = victim.conversation
            self.held.remove(conv)
            conv.slot, conv.tokens, conv.busy = None, [], False
            victim.reprefilled = True
        self.waiting.append(victim)
        plan.preempted.append(victim)
        return slot

    def _restore_prefix(self, seq: Sequence, plan: StepPlan) -> None:
        """Start seq from the longest run of prefix-cache blocks its tokens begin with, when that beats what its
        slot holds. A new prompt keeps at least one token to prefill (its logits); a resumed one needs none."""
        target = seq.prefill_target()
        tokens = seq.prompt_ids if not seq.output_ids else [seq.token_at(i) for i in range(target)]
        limit = target if seq.output_ids else target - 1
        if limit < self.prefix_cache.block_tokens or limit <= seq.cached:
            return
        blocks = self.prefix_cache.match(tokens, limit, seq.cache_scope)
        restored = len(blocks) * self.prefix_cache.block_tokens
        if restored > seq.cached:
            plan.restore.append((seq, blocks))
            seq.cached = restored
            if not seq.output_ids:
                seq.cached_prompt_tokens = restored

    def _place(self, seq: Sequence, slot: int, now: float, plan: StepPlan) -> None:
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
        if self.prefix_cache is not None and seq.cache_scope is not None:
            self._restore_prefix(seq, plan)
        if seq.started is None:
            seq.started = now
            plan.admitted.append(seq)
        self.running.append(seq)

