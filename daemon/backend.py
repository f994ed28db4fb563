"""What the engine needs of a backend: a KV cache of fixed slots and a step over rows of new tokens (forward);
prefill of one slot, a batched decode and the multi-position score of one slot (speculative decoding's verify
pass) are plain cases of it.

Each backend owns its fixed buffers (IO bindings, pinned memory, CUDA-graph addresses): the engine hands
it plain token ids and positions, and it writes them into those buffers itself.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import numpy as np


class StepRow(NamedTuple):
    """One slot's part of a step: token_ids written at positions start.., logits for the last `logits` of them
    (1: a decode token or a prompt's last chunk; 0: a chunk in the middle of a prompt; len(token_ids): every
    position, to verify drafted tokens)."""

    slot: int
    token_ids: Sequence[int]
    start: int
    logits: int = 1


class Backend(Protocol):
    name: str
    slots: int
    threads: int  # CPU threads a step keeps busy (the caller's included); 0 where the model runs elsewhere (a GPU)
    cuda_graphs: str  # one line for GetModel: which decode batch sizes replay a CUDA graph; "" where none can
    max_score_tokens: int  # most positions score() takes at once; 0 where it cannot (no speculative decoding)

    @property
    def kv_cache_bytes(self) -> int: ...

    def prefill(self, slot: int, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Write token_ids at positions start.. of one slot; the last token's logits [vocab] (a view, valid
        until the next call)."""

    def decode(self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """One token for each of slots at its position; logits [rows, vocab] indexed by slot (a view, valid
        until the next call; rows past the highest slot, and idle rows below it, hold nothing)."""

    def forward(self, rows: Sequence[StepRow]) -> np.ndarray:
        """Every row's tokens in one model call (distinct slots); logits [sum of rows' `logits`, vocab], row
        after row in the order given (a view, valid until the next call)."""

    def score(self, slot: int, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Write token_ids at positions start.. of one slot; the logits of every one of them [n, vocab] (a view,
        valid until the next call). Speculative decoding's verify pass: rejected positions are simply written
        over later (the caller counts only what it keeps)."""

    def read_kv(self, slot: int, start: int, end: int) -> np.ndarray:
        """K/V of positions [start, end) of a slot, copied to a new host array [layers, 2 (K, V), kv_heads,
        end - start, head_dim] (daemon/prefix_cache.py's block layout)."""

    def write_kv(self, slot: int, start: int, kv: np.ndarray) -> None:
        """Copy K/V as read_kv gives them into positions start.. of a slot."""

    def close(self) -> None: ...


def write_decode_inputs(input_ids: np.ndarray, row_positions: np.ndarray, slots: Sequence[int],
                        token_ids: Sequence[int], positions: Sequence[int]) -> None:
    """Fill a decode step's fixed buffers: each busy row's input id and position, -1 for an idle row.

    An idle row gets nothing written to its cache and its logits go unread; its input id is whatever valid
    token the row last held, so it needs no reset (a graph gathers it all the same)."""
    row_positions.fill(-1)
    for slot, token, position in zip(slots, token_ids, positions):
        input_ids[slot, 0] = token
        row_positions[slot] = position


def forward_as_calls(backend: Backend, rows: Sequence[StepRow], vocab_size: int) -> np.ndarray:
    """Backend.forward for a backend whose graph takes one kind of work per call (TensorRT's fixed-shape
    buckets): a prefill per prompt chunk, a score per verify row, then one decode of the single-token rows;
    logits [sum of rows' `logits`, vocab] in a new array."""
    out = np.empty((sum(r.logits for r in rows), vocab_size), np.float32)
    at, decoding = 0, []
    for r in rows:
        if len(r.token_ids) == 1 and r.logits == 1:
            decoding.append((at, r))
        elif r.logits == 1:
            out[at] = backend.prefill(r.slot, r.token_ids, r.start)
        elif r.logits == len(r.token_ids) and r.logits <= backend.max_score_tokens:  # a verify row
            out[at:at + r.logits] = backend.score(r.slot, r.token_ids, r.start)
        elif r.logits:
            raise ValueError(f"{backend.name}: a row gets the logits of its last token, or of every token of a verify "
                             f"row of at most {backend.max_score_tokens}")
        else:
            backend.prefill(r.slot, r.token_ids, r.start)
        at += r.logits
    if decoding:
        logits = backend.decode([r.slot for _, r in decoding], [r.token_ids[0] for _, r in decoding],
                                [r.start for _, r in decoding])
        for i, r in decoding:
            out[i] = logits[r.slot]
    return out
