"""The geometry of a bundle's static KV cache, as its manifest records it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The cache types bundles hold, each with the numpy type its values are stored as. numpy has no bfloat16: such a
# cache is held as its raw 16-bit words (copied, never computed on here).
KV_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int8": np.int8}


@dataclass(frozen=True)
class KvCacheLayout:
    """Geometry of the static KV cache the graph expects, per layer and per K/V."""

    num_layers: int
    num_kv_heads: int
    max_seq: int
    head_dim: int
    dtype: str  # float32, float16, bfloat16, or int8 (a CPU bundle built with --kv-cache int8)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(KV_DTYPES[self.dtype])

    @property
    def itemsize(self) -> int:
        return self.np_dtype.itemsize

    def tensor_row_bytes(self) -> int:
        """One layer's K (or V) cache of one row (slot): the stride between rows of a cache tensor."""
        return self.num_kv_heads * self.max_seq * self.head_dim * self.itemsize

    def bytes_per_row(self) -> int:
        return 2 * self.num_layers * self.tensor_row_bytes()
