"""The geometry of a bundle's static KV cache, as its manifest records it."""

from __future__ import annotations

from dataclasses import dataclass


KV_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}  # the cache types bundles hold: bytes each


@dataclass(frozen=True)
class KvCacheLayout:
    """Geometry of the static KV cache the graph expects, per layer and per K/V."""

    num_layers: int
    num_kv_heads: int
    max_seq: int
    head_dim: int
    dtype: str  # float32, float16, bfloat16, or int8 (a CPU bundle built with --kv-cache int8)

    @property
    def itemsize(self) -> int:
        return KV_DTYPES[self.dtype]

    def tensor_row_bytes(self) -> int:
        """One layer's K (or V) cache of one row (slot): the stride between rows of a cache tensor."""
        return self.num_kv_heads * self.max_seq * self.head_dim * self.itemsize

    def bytes_per_row(self) -> int:
        return 2 * self.num_layers * self.tensor_row_bytes()
