"""The KV cache: one allocation per model at load; `pos` is the write pointer; rewinding is `pos -= n`."""
from __future__ import annotations

import numpy as np

from .errors import ContextFullError


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype=np.float32):
        # data: (2 [key, value], layer, 1, kv_heads, capacity, head_dim). BNSH per layer is the layout
        # GroupQueryAttention reads and writes in place when past and present share one buffer.
        self.data = np.zeros((2, num_layers, 1, num_kv_heads, capacity, head_dim), dtype=dtype)
        self.capacity = capacity
        self.pos = 0  # positions 0..pos-1 hold valid K/V; the next token is written at pos

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype=np.float32) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * np.dtype(dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def keys(self, layer: int) -> np.ndarray:
        return self.data[0, layer]

    def values(self, layer: int) -> np.ndarray:
        return self.data[1, layer]

    @property
    def free(self) -> int:
        return self.capacity - self.pos

    def reserve(self, n: int) -> None:
        """Raise before a forward pass that would write past the end."""
        if n > self.free:
            raise ContextFullError(
                f"context is full: {self.pos} of {self.capacity} positions used, {n} more needed; "
                "start a new conversation or load the model with a larger context"
            )

    def rewind(self, n: int) -> None:
        """Forget the last n positions (rejected drafts, or a prompt that diverges from the cached one)."""
        if not 0 <= n <= self.pos:
            raise ValueError(f"cannot rewind {n} positions from pos {self.pos}")
        self.pos -= n
