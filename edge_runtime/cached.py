"""A decoder plus the token ids its KV cache holds, so a request reuses the longest cached prefix.

`tokens[i]` is the token whose K/V sit at cache position i; len(tokens) == decoder.kv.pos after every call.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class CachedDecoder:
    def __init__(self, decoder):
        self.decoder = decoder
        self.tokens: list[int] = []

    @property
    def kv(self):
        return self.decoder.kv

    def truncate(self, n: int) -> None:
        """Keep the first n cached positions: a pointer move, nothing is copied or cleared."""
        self.decoder.kv.rewind(self.decoder.kv.pos - n)
        del self.tokens[n:]

    def sync(self, ids: Sequence[int], known: int = 0) -> tuple[np.ndarray, int]:
        """Make the cache hold `ids`; return logits [1, vocab] of the last id and how many positions ran.

        Only the part past the longest common prefix runs; at least the last id runs, to give logits.
        `known`: the caller vouches that ids[:known] are already cached, so only the tail is compared
        (the decode loop passes it to keep a step's work independent of the context length).
        """
        known = min(known, len(self.tokens), len(ids))
        common = known + common_prefix(self.tokens[known:], ids[known:])
        common = min(common, len(ids) - 1)
        self.truncate(common)
        new = list(ids[common:])
        logits = self.decoder.prefill(new)
        self.tokens.extend(new)
        return logits, len(new)

    def extend(self, ids: Sequence[int], keep: int = 1) -> np.ndarray:
        """Append ids (one forward call); logits [keep, vocab] of the last `keep` of them."""
        logits = self.decoder.forward(ids, keep)
        self.tokens.extend(ids)
        return logits
