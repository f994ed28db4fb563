"""Speculative decoding: draft a sequence's next tokens cheaply, then check them all with one target-model pass.

Drafts come from prompt lookup (the latest n tokens of prompt + output found earlier in them: what followed
there is the draft; no extra model) or from a draft model (DraftModel: a smaller bundle with the same tokenizer,
on its own CPU backend with a KV cache row per slot).

Verification: the target scores [last token, d0 .. dk-1] at positions cached.. of the sequence's slot in one
call (Backend.score), giving the logits of k+1 positions. Row i is sampled by the request's own sampler, as
without speculation (penalties, grammar mask, logprobs from the target's raw logits, stop strings, ends); when
the token drawn is d_i, row i+1 is valid too and is sampled next, else the step ends there, keeping the drawn
token. A draft is one token per position (a point mass q), for which speculative sampling's rule ("accept d
with probability min(1, p(d)/q(d)), else draw from max(p - q, 0) normalized") is exactly this: accept with
probability p(d), else a token from p without d. So greedy output is token-for-token the one without
speculation, and a seeded sampler draws one number per emitted token either way, so seeded output is the same
too. A grammar only ever sees tokens that are kept: nothing to roll back.

KV cache: the rejected positions were written but are not counted in seq.cached, so the next step overwrites
them (the cache is static with per-row lengths); conversations and the prefix cache only keep what
seq.cached counts.

Cost control: a verify pass costs more than a one-token decode. Each request keeps a ledger: the seconds its
verify passes saved (tokens they gave x the measured decode-step time, minus their own time), against the
seconds it has spent decoding. While the ledger is below -max_slowdown of that time, the request decodes
plainly; its plain steps grow the allowance until it tries again. So a request whose drafts keep failing runs
at most ~max_slowdown slower than without speculation, while one whose drafts hit keeps speculating.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from daemon.sequence import Sequence

if TYPE_CHECKING:
    from bundle_format.bundle import Bundle
    from daemon.backend import Backend
    from daemon.config import SpeculativeConfig
    from daemon.metrics import EngineMetrics
    from daemon.postprocess import Ending

log = logging.getLogger("edgellm.engine")

_EWMA = 0.1  # weight of the newest decode-step time in its running average


class PromptLookup:
    """Prompt-lookup drafting for one sequence: an index of every n-gram (ngram_min..ngram_max tokens) of its
    prompt + output to where its latest earlier occurrence was followed, updated as tokens come (O(n) a token)."""

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.tokens: list[int] = []
        self._follow: list[dict[tuple[int, ...], int]] = [{} for _ in range(ngram_max + 1)]  # by n

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.tokens.append(t)
            end = len(self.tokens) - 1  # the new token's index: it follows the n-grams ending just before it
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                self._follow[n][tuple(self.tokens[end - n:end])] = end

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest n-gram the tokens end with."""
        toks = self.tokens
        for n in range(min(self.ngram_max, len(toks)), self.ngram_min - 1, -1):
            at = self._follow[n].get(tuple(toks[-n:]))
            if at is not None:
                return toks[at:at + k]
        return []


class Drafter(Protocol):
    """Where drafts come from (prompt lookup needs none: it lives in each request's SpecState)."""

    def catch_up(self, seq: Sequence, state: SpecState) -> None:
        """Take in the sequence's known tokens (a draft model: prefill what its cache lacks). A one-off cost per
        prompt, like the prompt's own prefill: the ledger does not charge it to the verify passes."""

    def draft(self, seq: Sequence, state: SpecState, k: int) -> list[int]: ...

    def accepted(self, seq: Sequence, state: SpecState) -> None:
        """The target kept seq.cached tokens: the draft's own cache rolls back to match."""


class SpecState:
    """One request's speculation: its prompt-lookup index, its ledger and its counts."""

    __slots__ = ("lookup", "k", "saved_s", "decode_s", "steps", "drafted", "accepted", "draft_cached", "draft_s")

    def __init__(self, ngram_min: int, ngram_max: int, k: int):
        self.lookup = PromptLookup(ngram_min, ngram_max)
        # The next draft's length: doubled after a draft kept whole, else one past what was kept. A failed draft
        # then costs little (a pass of 2 or 3 positions is barely slower than a decode) and a run of hits soon
        # drafts the most.
        self.k = k
        self.saved_s = 0.0  # seconds its verify passes saved (negative: lost) against plain decoding
        self.decode_s = 0.0  # seconds of the steps it decoded in, plain or verify
        self.steps = 0  # verify passes
        self.drafted = 0  # draft tokens verified
        self.accepted = 0  # draft tokens kept
        self.draft_cached = 0  # a draft model's: tokens of this sequence its cache holds
        self.draft_s = 0.0  # seconds its current draft took (charged to its verify pass)


class Verification:
    """A verify pass's result for one sequence: the draft and the target's logits rows [k+1, vocab] (a view of
    the backend's buffer: sampled before the next call), with the pass's seconds."""

    __slots__ = ("draft", "logits", "start", "seconds")

    def __init__(self, draft: list[int], logits: np.ndarray, start: int, seconds: float):
        self.draft, self.logits, self.start, self.seconds = draft, logits, start, seconds


class Speculator:
    """Decides which sequences speculate in a step, drafts for them, and keeps what their verify passes gave."""

    def __init__(self, config: SpeculativeConfig, context_length: int, drafter: Drafter | None = None,
                 metrics: EngineMetrics | None = None, max_draft_tokens: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        # The draft's most tokens: the config's, within what the backend's verify pass takes.
        self.max_draft_tokens = min(config.max_draft_tokens, max_draft_tokens or config.max_draft_tokens)
        self.metrics = metrics
        self.context_length = context_length
        self.drafter = drafter  # None: prompt lookup
        self.decode_row_s: float | None = None  # running average of a plain decode call (the cost of a token)
        # Totals over every request, for benchmarks and tests.
        self.steps = self.drafted = self.accepted = self.emitted = 0

    def state(self, seq: Sequence) -> SpecState:
        st = seq.speculation
        if st is None:
            st = seq.speculation = SpecState(self.config.ngram_min, self.config.ngram_max,
                                             min(2, self.max_draft_tokens))
        return st

    def plan(self, decode: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """The sequences of a step's decode batch that speculate, each with its draft (others decode plainly)."""
        if len(decode) > self.config.max_batch or self.decode_row_s is None:
            return []  # the decode-step time is what the ledger is kept in: measured first
        drafts = []
        for seq in decode:
            if not seq.speculative:
                continue
            st = self.state(seq)
            if st.saved_s < -self.config.max_slowdown * st.decode_s:
                continue
            # Positions cached..cached+k are written; tokens past max_new_tokens would be thrown away.
            k = min(st.k, self.context_length - seq.cached - 1,
                    seq.max_new_tokens - len(seq.output_ids) - 1)
            if k < 1:
                continue
            try:
                if self.drafter is not None:
                    self.drafter.catch_up(seq, st)
                started = self.clock()
                draft = self._draft(seq, st, k)
            except Exception:  # drafts only save time: the request goes on without them
                log.exception("drafting failed; this request decodes without speculation from here on")
                seq.speculative = False
                continue
            st.draft_s = self.clock() - started
            if draft:
                drafts.append((seq, draft))
        return drafts

    def _draft(self, seq: Sequence, st: SpecState, k: int) -> list[int]:
        if self.drafter is not None:
            return self.drafter.draft(seq, st, k)
        lookup = st.lookup
        have = len(lookup.tokens)
        total = len(seq.prompt_ids) + len(seq.output_ids)
        if have < total:
            lookup.extend([seq.token_at(i) for i in range(have, total)])
        return lookup.draft(k)

    def decoded(self, seqs: list[Sequence], seconds: float, measured: bool = True) -> None:
        """A plain decode of seqs took `seconds` (measured: a call of its own, else their share of a step that did
        more): the decode-step average, and each request's decode time."""
        if measured:  # a decode step reads the weights once: its time grows little with its rows
            avg = self.decode_row_s
            self.decode_row_s = seconds if avg is None else avg + _EWMA * (seconds - avg)
        for seq in seqs:
            if seq.speculation is not None:
                seq.speculation.decode_s += seconds

    def verify(self, seq: Sequence, v: Verification,
               accept: Callable[[Sequence, np.ndarray], Ending | None]) -> Ending | None:
        """Sample v's rows in turn with `accept` (the postprocessor's: sample, stream, end) while the drawn token is
        the draft's; seq.cached counts only the positions whose token was kept. How seq ends, if it does."""
        draft, start = v.draft, v.start
        ending = None
        emitted = 0
        for i in range(len(draft) + 1):
            seq.cached = start + i + 1  # positions start..start+i hold the last token and the drafts kept
            ending = accept(seq, v.logits[i])
            emitted += 1
            if ending is not None or i == len(draft) or seq.output_ids[-1] != draft[i]:
                break
        st = self.state(seq)
        st.k = min(2 * st.k, self.max_draft_tokens) if emitted > len(draft) else emitted
        st.steps += 1
        st.drafted += len(draft)
        st.accepted += emitted - 1
        cost = v.seconds + st.draft_s  # the pass and its drafting
        st.decode_s += cost
        st.saved_s += emitted * (self.decode_row_s or 0.0) - cost
        self.steps += 1
        self.drafted += len(draft)
        self.accepted += emitted - 1
        self.emitted += emitted
        if self.metrics is not None:
            self.metrics.speculative_passes.inc()
            self.metrics.speculative_drafted_tokens.inc(len(draft))
            self.metrics.speculative_accepted_tokens.inc(emitted - 1)
        if self.drafter is not None and ending is None:
            self.drafter.accepted(seq, st)
        return ending


class DraftModel:
    """A draft model: a smaller bundle with the target's tokenizer on its own CPU backend, one KV cache row per slot.

    Its cache follows the target's: a sequence's tokens are prefilled into its slot from where they last agreed,
    then k greedy decode steps draft (greedy: a point mass, so the target's rule stays exact whatever it samples).
    After the target's verdict it counts only the positions whose tokens were kept; the rest are written over."""

    def __init__(self, backend: Backend, context_length: int, target_vocab: int):
        self.backend = backend
        self.context_length = context_length
        self.target_vocab = target_vocab
        # Whose tokens each slot of the draft cache holds: a slot another request drafted in since is stale.
        self._owner: list[Sequence | None] = [None] * backend.slots

    def catch_up(self, seq: Sequence, state: SpecState) -> None:
        """Prefill the draft's slot with the sequence's known tokens but the last, from where it last agreed."""
        slot, total = seq.slot, len(seq.prompt_ids) + len(seq.output_ids)
        if self._owner[slot] is not seq:
            self._owner[slot], state.draft_cached = seq, 0
        start = state.draft_cached
        if start < total - 1 and total <= self.context_length:
            self.backend.prefill(slot, [seq.token_at(i) for i in range(start, total - 1)], start)
            state.draft_cached = total - 1

    def draft(self, seq: Sequence, state: SpecState, k: int) -> list[int]:
        """k greedy tokens after the sequence's last (caught up first): the last token and each drafted one but
        the last are fed in turn."""
        slot, total = seq.slot, len(seq.prompt_ids) + len(seq.output_ids)
        if total + k > self.context_length or self._owner[slot] is not seq or state.draft_cached != total - 1:
            return []
        draft = [int(np.argmax(self.backend.decode([slot], [seq.output_ids[-1]], [total - 1])[slot]))]
        for j in range(k - 1):
            draft.append(int(np.argmax(self.backend.decode([slot], [draft[-1]], [total + j])[slot])))
        state.draft_cached = total + k - 1
        # A vocabulary padded past the target's could yield an id the target has no row for: cut there.
        bad = next((i for i, t in enumerate(draft) if t >= self.target_vocab), len(draft))
        return draft[:bad]

    def accepted(self, seq: Sequence, state: SpecState) -> None:
        """The target kept seq.cached positions; the draft's positions past them hold rejected tokens."""
        state.draft_cached = min(state.draft_cached, seq.cached)


def tokenizer_fingerprint(bundle_path: Path) -> str:
    """sha256 of a bundle's tokenizer: its vocabulary, merges and added tokens (what decides the token ids)."""
    data = json.loads((Path(bundle_path) / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    key = [model.get("type"), model.get("vocab"), model.get("merges"),
           sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens", []))]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def load_draft_model(path: str, target: Bundle, slots: int, threads: int,
                     check: Callable[[Bundle], None] | None = None) -> DraftModel:
    """speculative.draft_bundle's draft model (its files checked against its manifest, then by `check`, e.g. its
    signature, before anything is loaded); ConfigError when it cannot draft for `target`."""
    from bundle_format.bundle import load_bundle
    from daemon.backend_onnx import create_cpu_backend
    from daemon.config import ConfigError

    draft = load_bundle(Path(path))
    if check is not None:
        check(draft)
    if draft.manifest.get("target", "cpu") != "cpu":
        raise ConfigError(f"speculative.draft_bundle: {path} is a {draft.manifest.get('target')} bundle; "
                          f"the draft model runs on ONNX Runtime's CPU backend (build it with --target cpu)")
    if tokenizer_fingerprint(draft.path) != tokenizer_fingerprint(target.path):
        raise ConfigError(f"speculative.draft_bundle: {path} has another tokenizer than {target.path} (its "
                          f"vocabulary or merges differ): a draft model must share the model's token ids")
    backend = create_cpu_backend(draft, slots, threads)
    return DraftModel(backend, draft.context_length, int(target.model["vocab_size"]))
