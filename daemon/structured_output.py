"""Constrained decoding: a request's output format compiled by llguidance into a matcher that masks each token.

A format (JSON schema, any JSON object, regex, Lark or GBNF grammar, choices, a tool-call grammar) is compiled
once per distinct text and cached (least recently used out first); each request gets a cheap copy of the
compiled matcher. Per token, the sampler asks the request's GrammarState to ban, in place in its logits row,
every token that cannot continue a match (the end-of-sequence token too, until the output is complete), then
tells it the chosen token. Choosing llguidance over xgrammar: docs/structured-output.md.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where first needed, in the grammar pool: ~40 ms the daemon's start need not pay
    import llguidance

# FORMATS: the kinds a GrammarSpec may have.
FORMATS = ("json_schema", "json_object", "regex", "lark", "gbnf", "choices", "llguidance")
_ANY_OBJECT = '{"type": "object"}'
# Compact JSON (no whitespace between tokens): a model cannot pad its output with blanks up to max_new_tokens, and
# a bounded schema has a bounded output. A schema's own "x-guidance" options override this.
JSON_OPTIONS = {"whitespace_flexible": False}
# Byte value -> its 8 bits (little-endian bit order, as llguidance packs token i at bit i % 32 of word i // 32),
# True where the bit is 0: the token is banned.
_BANNED_BITS = np.array([[not (b >> k) & 1 for k in range(8)] for b in range(256)], dtype=bool)


class GrammarError(ValueError):
    """A format the grammar engine refuses (malformed, unsatisfiable, too large): the client's error."""


@dataclass(frozen=True)
class GrammarSpec:
    """A request's output format: the compile cache's key."""

    kind: str  # one of FORMATS
    text: str  # the schema, regex or grammar text; choices as a JSON list; "" for json_object
    what: str = field(default="", compare=False)  # what the client sent, for messages ("tool definitions")

    def describe(self) -> str:
        return self.what or self.kind.replace("_", " ")


def llguidance_grammar(spec: GrammarSpec) -> str:
    """The spec as llguidance's own grammar text; GrammarError for text that cannot even be read."""
    try:
        return _llguidance_grammar(spec)
    except ValueError as e:  # what llguidance raises on input it cannot read (e.g. a schema nested too deep)
        raise GrammarError(str(e)) from None


def _llguidance_grammar(spec: GrammarSpec) -> str:
    import llguidance

    if spec.kind == "json_schema":
        try:
            json.loads(spec.text)
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        return llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=JSON_OPTIONS)
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "choices":
        choices = json.loads(spec.text)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    if spec.kind == "gbnf":
        return llguidance.grammar_from("gbnf", spec.text)
    if spec.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(spec.text)
    if spec.kind == "llguidance":
        return spec.text
    raise GrammarError(f"unknown format {spec.kind!r}")


class GrammarState:
    """One request's position in its grammar: bans tokens in its logits rows, follows the tokens chosen."""

    live = 0  # states made and not yet released, all requests together (tests and leaks)
    _live_lock = threading.Lock()

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher: llguidance.LLMatcher | None = matcher
        self._words = np.zeros((vocab_size + 31) // 32, np.int32)  # the mask, as llguidance writes it
        self._banned = np.empty(self._words.size * 32, bool)  # the mask unpacked: True = banned
        with GrammarState._live_lock:
            GrammarState.live += 1

    def mask(self, logits: np.ndarray) -> None:
        """Set the logits (float32[V], in place) of every token that cannot come next to -inf."""
        m = self.matcher
        m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if m.is_error():
            raise GrammarError(f"the grammar engine failed: {m.get_error()}")
        np.take(_BANNED_BITS, self._words.view(np.uint8), axis=0, out=self._banned.reshape(-1, 8))
        n = min(logits.shape[0], self._banned.shape[0])
        np.copyto(logits[:n], np.float32(-np.inf), where=self._banned[:n])
        if logits.shape[0] > n:  # the model's vocabulary padded past the tokenizer's: never valid text
            logits[n:] = -np.inf

    def advance(self, token: int) -> None:
        """The token chosen from a masked row: the grammar moves past it."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} does not continue the grammar: {self.matcher.get_error()}")

    def replay(self, tokens: Iterable[int]) -> None:
        """Back to the start, then past tokens: the state for a request whose outputs are given again."""
        self.matcher.reset()
        for t in tokens:
            self.advance(t)

    @property
    def done(self) -> bool:
        """The output is complete and nothing may follow it (only the end-of-sequence token)."""
        return self.matcher.is_stopped()

    def release(self) -> None:
        """Free the matcher (the request ended); idempotent."""
        if self.matcher is not None:
            self.matcher = None
            with GrammarState._live_lock:
                GrammarState.live -= 1

    def __del__(self) -> None:  # a request refused after its state was made (a full queue) never reaches the engine
        self.release()


class GrammarCompiler:
    """Compiles output formats against the model's tokenizer, each distinct one once (an LRU of `cache_size`).

    Called from a worker thread, never the event loop: the first call reads the tokenizer into llguidance's own
    form (~0.2 s for a 49k vocabulary), a compile takes about a millisecond for a typical schema."""

    def __init__(self, tokenizer_json: Path, eos_token_ids: Iterable[int], vocab_size: int, cache_size: int = 64):
        self._tokenizer_json = tokenizer_json
        self._eos = sorted(eos_token_ids)
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def tokenizer(self) -> llguidance.LLTokenizer:
        import llguidance

        with self._lock:
            if self._tokenizer is None:
                text = Path(self._tokenizer_json).read_text(encoding="utf-8")
                self._tokenizer = llguidance.LLTokenizer(text, n_vocab=self.vocab_size,
                                                         eos_token=self._eos or None)
            return self._tokenizer

    def compile(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """spec's compiled grammar, from the cache or compiled now; GrammarError with the engine's message."""
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
                return compiled
        compiled = self._compile(spec)
        with self._lock:
            self.misses += 1
            self._cache[spec] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def state(self, compiled: llguidance.LLMatcher) -> GrammarState:
        """A fresh state at the start of a compiled grammar (a copy: the cached one is never moved)."""
        return GrammarState(compiled.deep_copy(), self.vocab_size)

    def _compile(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        import llguidance

        grammar = llguidance_grammar(spec)
        # llguidance reports a bad grammar as an error state, never an exception (and lets go of the GIL meanwhile).
        matcher = llguidance.LLMatcher(self.tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error().strip())
        return matcher
