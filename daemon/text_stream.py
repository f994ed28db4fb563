"""Per-request streaming text: incremental detokenization and stop sequences across token boundaries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...  # special tokens skipped


class TextStream:
    """Turns sampled token ids into text deltas that are whole UTF-8 characters and never contain a stop sequence.

    push(id) -> (delta, stopped) per token, finish() once at the end when not stopped; the deltas
    concatenated equal decode(all ids), cut before the earliest stop sequence. EOS is the caller's job.
    """

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()) -> None:
        self._decode = tokenizer.decode
        self._stops = tuple(s for s in stop if s)  # an empty stop string would end every stream at once
        # The recent window of ids: _ids[:_read] is already turned into text, _ids[_read:] is not yet. Decoding
        # the window with and without the new ids and taking the difference keeps decoders that treat the
        # first token specially (SentencePiece's leading space) consistent, without re-decoding everything.
        self._ids: list[int] = []
        self._read = 0
        self._held = ""  # decoded text kept back because it may be the start of a stop sequence
        self.stopped_by: str | None = None  # the stop sequence that ended the stream

    @property
    def stopped(self) -> bool:
        return self.stopped_by is not None

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return the text ready to send and whether a stop sequence has ended the stream."""
        if self.stopped:
            return "", True
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[:self._read])
        new_text = self._decode(self._ids)
        # A trailing U+FFFD means a character is split across tokens: wait for its remaining bytes.
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return "", False
        delta = new_text[len(prefix_text):]
        # Slide the window to start at the old read offset, so each push decodes only a few tokens.
        del self._ids[:self._read]
        self._read = len(self._ids)
        return self._emit(delta, final=False), self.stopped

    def finish(self) -> str:
        """Flush what is held back (text that could have begun a stop sequence, an unfinished character)."""
        if self.stopped:
            return ""
        tail = self._decode(self._ids)[len(self._decode(self._ids[:self._read])):]
        self._ids.clear()
        self._read = 0
        return self._emit(tail, final=True)

    def _emit(self, delta: str, final: bool) -> str:
        text = self._held + delta
        # The earliest complete stop sequence wins; at equal starts the shorter, which completes first.
        hit = min(((i, len(s), s) for s in self._stops if (i := text.find(s)) >= 0), default=None)
        if hit is not None:
            self.stopped_by = hit[2]
            self._held = ""
            return text[:hit[0]]
        keep = 0 if final else self._partial_stop_len(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop sequence."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
