"""The decode bucket policy: the row counts a decode step runs at (scheduler, warm-up and TensorRT profiles)."""

from __future__ import annotations

import pytest

from bundle_format.decode_buckets import decode_bucket, decode_buckets


def test_decode_buckets_are_powers_of_two():
    assert [decode_bucket(s, 8) for s in range(8)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert decode_bucket(5, 6) == 6
    assert decode_buckets(6) == [1, 2, 4, 6]


@pytest.mark.parametrize("slots", [1, 3, 4, 6, 8, 16])
def test_decode_buckets_cover_every_row_count_a_step_picks(slots):
    sizes = decode_buckets(slots)
    assert sizes == sorted(set(sizes))
    assert {decode_bucket(h, slots) for h in range(slots)} == set(sizes)
    assert max(sizes) == slots
