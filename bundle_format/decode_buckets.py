"""The batch sizes a decode step runs at: powers of two up to the slot count, so the shapes stay few.

The scheduler picks one per step, the daemon warms each one up, and a TensorRT engine gets one static
optimization profile (and one CUDA graph) per size.
"""

from __future__ import annotations


def decode_bucket(highest_slot: int, slots: int) -> int:
    """Rows a decode step runs: the next power of two above the highest busy slot, at most `slots`."""
    rows = 1
    while rows <= highest_slot:
        rows *= 2
    return min(rows, slots)


def decode_buckets(slots: int) -> list[int]:
    """Every row count decode_bucket can return for `slots` slots, ascending."""
    return sorted({decode_bucket(s, slots) for s in range(slots)})
