"""Per-request token sampling from one row of logits: penalties, temperature, top-k/top-p/min-p, logprobs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from daemon.structured_output import GrammarState

MAX_LOGPROBS = 20
# Far past any useful setting (at 100 the distribution is all but uniform, a penalty of 100 all but bans a token);
# beyond, float32 arithmetic on the logits heads for overflow and NaN.
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
# Below this the distribution is argmax anyway, and 1/T would overflow float32 into inf * 0 = NaN.
GREEDY_TEMPERATURE = 1e-5
_BLOCK = 1024  # tokens per block when drawing from a large vocabulary


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE): greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # as in HF: over prompt + generated tokens
    seed: int | None = None  # None: a random seed
    logprobs: int = 0  # 0: none; n > 0: the chosen token's logprob plus the top-n alternatives

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        # Written as `not (ok)` so that NaN fails too.
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be >= 0 and at most {MAX_TEMPERATURE:g} (0 is greedy), got {self.temperature}")
        if not self.top_k >= 0:
            raise ValueError(f"top_k must be >= 0 (0 is off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be > 0 and at most {MAX_REPETITION_PENALTY:g} (1 is off), got {self.repetition_penalty}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")


class Sampler:
    """Samples one request's tokens; owns its RNG, the set of token ids seen so far (for the penalty) and the
    request's grammar state, if its output is constrained."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = (),
                 grammar: GrammarState | None = None) -> None:
        params.validate()
        self.params = params
        self.grammar = grammar  # bans, per row, the tokens that cannot continue the output's format
        self.rng = np.random.default_rng(params.seed)
        self._pending: list[int] = list(prompt_ids) if params.repetition_penalty != 1.0 else []
        self._n_generated = 0  # how much of generated_ids has been folded into the seen set
        self._seen_mask: np.ndarray | None = None  # bool[V]
        self._seen_ids: np.ndarray | None = None  # int64[V]; the first _n_seen are the distinct ids seen
        self._n_seen = 0
        self._buf: np.ndarray | None = None  # float32[V] scratch: softmax weights
        self._cum: np.ndarray | None = None  # float64 scratch: cumulative weights
        self._raw: np.ndarray | None = None  # float32[V]: the unprocessed logits, kept only for logprobs

    def sample(self, logits: np.ndarray,
               generated_ids: Sequence[int]) -> tuple[int, float | None, list[tuple[int, float]]]:
        """Pick the next token from logits (float32[V], modified in place) given the ids generated so far.

        Returns (token id, its logprob under the raw model distribution or None, top-n (id, logprob) alternatives).
        """
        p = self.params
        if self._buf is None or self._buf.shape[0] != logits.shape[0]:
            self._allocate(logits.shape[0])
        lse = None
        if p.logprobs:
            # Logprobs report the model's own distribution, so take them before penalties and temperature.
            np.copyto(self._raw, logits)
            lse = self._logsumexp(self._raw)
        if self.grammar is not None:
            self.grammar.mask(logits)  # banned tokens at -inf: every step below gives them weight 0
        if p.repetition_penalty != 1.0:
            self._penalize(logits, generated_ids)
        token = int(np.argmax(logits)) if p.temperature < GREEDY_TEMPERATURE else self._draw(logits)
        if self.grammar is not None:
            self.grammar.advance(token)
        if lse is None:
            return token, None, []
        raw = self._raw
        top = np.argpartition(raw, raw.shape[0] - p.logprobs)[raw.shape[0] - p.logprobs:]
        top = top[np.argsort(-raw[top], kind="stable")]
        return token, float(raw[token]) - lse, [(int(i), float(raw[i]) - lse) for i in top]

    def release(self) -> None:
        """The request ended: free its grammar state."""
        if self.grammar is not None:
            self.grammar.release()
            self.grammar = None

    def _allocate(self, vocab: int) -> None:
        self._buf = np.empty(vocab, np.float32)
        self._cum = np.empty(min(vocab, _BLOCK * 4), np.float64)
        if self.params.logprobs:
            self._raw = np.empty(vocab, np.float32)
        if self.params.repetition_penalty != 1.0:
            self._seen_mask = np.zeros(vocab, bool)
            self._seen_ids = np.empty(vocab, np.int64)
            self._n_seen = 0

    def _logsumexp(self, x: np.ndarray) -> float:
        m = float(x.max())
        np.subtract(x, m, out=self._buf)
        np.exp(self._buf, out=self._buf)
        return m + math.log(float(self._buf.sum(dtype=np.float64)))

    def _penalize(self, logits: np.ndarray, generated_ids: Sequence[int]) -> None:
        """HF repetition penalty, in place: positive logits of seen tokens divided, negative ones multiplied."""
        # Fold in only what is new since the last step: O(new tokens), not O(sequence).
        new = generated_ids[self._n_generated:]
        self._n_generated = len(generated_ids)
        mask, ids = self._seen_mask, self._seen_ids
        for t in (*self._pending, *new):
            if not mask[t]:
                mask[t] = True
                ids[self._n_seen] = t
                self._n_seen += 1
        self._pending = []
        seen = ids[:self._n_seen]
        vals = logits[seen]
        penalty = self.params.repetition_penalty
        logits[seen] = np.where(vals > 0, vals / penalty, vals * penalty)

    def _draw(self, logits: np.ndarray) -> int:
        """Sample with temperature, then top-k, top-p and min-p (the order transformers applies them)."""
        p = self.params
        vocab = logits.shape[0]
        if 0 < p.top_k < vocab:
            cand = np.argpartition(logits, vocab - p.top_k)[vocab - p.top_k:]
            x = logits[cand]
            w = x  # a small copy already: compute the weights in it
        else:
            cand = None
            x = logits
            w = self._buf
        # Softmax weights exp((x - max) / T), unnormalized: the largest is exactly 1.
        np.subtract(x, x.max(), out=w)
        if p.temperature != 1.0:
            w *= np.float32(1.0 / p.temperature)
        np.exp(w, out=w)
        keep = None  # indices into w of the tokens still allowed; None: all of them
        if p.top_p < 1.0:
            keep = self._nucleus(w, p.top_p)
        if p.min_p > 0.0:
            # min_p relative to the most likely token, whose weight is 1.
            keep = np.flatnonzero(w >= p.min_p) if keep is None else keep[w[keep] >= p.min_p]
        i = self._choose(w) if keep is None else int(keep[self._choose(w[keep])])
        return int(cand[i]) if cand is not None else i

    def _nucleus(self, w: np.ndarray, top_p: float) -> np.ndarray:
        """Indices of the smallest most-likely set of weights w whose probability reaches top_p, most likely first."""
        target = top_p * float(w.sum(dtype=np.float64))
        # The nucleus is usually a few dozen tokens. All tokens above a weight threshold are a most-likely
        # set; lower the threshold until that set holds top_p, then sort only it. A compare is much cheaper
        # than a full-vocab sort or argpartition.
        threshold = 1e-2  # relative to the best token, whose weight is 1
        while True:
            top = np.flatnonzero(w >= threshold)
            if threshold == 0.0 or float(w[top].sum(dtype=np.float64)) >= target:
                break
            threshold = threshold * 1e-3 if threshold > 1e-30 else 0.0
        order = top[np.argsort(-w[top], kind="stable")]
        cum = np.cumsum(w[order], dtype=np.float64)
        # Keep every token whose more likely predecessors sum to less than top_p (at least one token).
        return order[:int(np.searchsorted(cum, target, side="left")) + 1]

    def _choose(self, w: np.ndarray) -> int:
        """Index drawn with probability proportional to the weights w (zero weights never)."""
        # u in (0, total] and side="left" (first cumulative weight >= u) never land on a zero weight.
        u = 1.0 - self.rng.random()
        start, n = 0, w.shape[0]
        if n > _BLOCK * 4:
            # A cumsum over the whole vocabulary is slow; pick a block of tokens by its weight first.
            blocks = np.add.reduceat(w, np.arange(0, n, _BLOCK), dtype=np.float64)
            cum = np.cumsum(blocks)
            b = int(np.searchsorted(cum, u * cum[-1], side="left"))
            # The position of u inside block b, as a fraction of that block's weight.
            u = min((u * cum[-1] - (cum[b - 1] if b else 0.0)) / blocks[b], 1.0)
            start, n = b * _BLOCK, min(_BLOCK, n - b * _BLOCK)
        cum = np.cumsum(w[start:start + n], dtype=np.float64, out=self._cum[:n])
        return start + min(int(np.searchsorted(cum, u * cum[-1], side="left")), n - 1)
