"""One decoder graph bound to its own KV cache: run n new tokens at the write pointer, get the last k logits.

Every buffer is allocated here, once; `forward` copies the new token ids in, runs, and returns a view.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from .kvcache import KVCache
from .manifest import Architecture


class Decoder:
    def __init__(self, session: ort.InferenceSession, arch: Architecture, num_layers: int, capacity: int,
                 max_chunk: int = 256, max_logits: int = 16, kv_dtype=np.float32):
        self.session = session
        self.arch = arch
        self.num_layers = num_layers
        self.max_chunk = max_chunk
        self.max_logits = max_logits
        self.kv = KVCache(num_layers, arch.num_kv_heads, arch.head_dim, capacity, kv_dtype)
        # Staging buffers bound by pointer: writing into them is all a step does before run().
        self._ids = np.zeros((1, max_chunk), np.int64)           # input_ids [1, n]
        self._seqlens = np.zeros((1,), np.int32)                  # seqlens_k: pos + n - 1
        self._total = np.zeros((), np.int32)                      # total_sequence_length: pos + n
        self._keep = np.zeros((1,), np.int64)                     # logits_to_keep: k
        self._logits = np.zeros((1, max_logits, arch.vocab_size), np.float32)  # logits [1, k, vocab]
        # features [capacity, H]: row t is the final-normed hidden state at position t (what an EAGLE draft reads),
        # indexed like the KV cache, so a rewind is the same pointer move. Only for graphs that output it.
        has_features = any(o.name == "hidden_states" for o in session.get_outputs())
        self.features = np.zeros((capacity, arch.hidden_size), np.float32) if has_features else None
        self._features_at = self.features.ctypes.data if has_features else 0  # address of row 0
        self._binding = session.io_binding()
        self._bind_static()
        self._shape = None  # (n, k) of the last binding of input_ids / logits

    def _bind_ptr(self, name: str, arr: np.ndarray, shape, output: bool = False) -> None:
        bind = self._binding.bind_output if output else self._binding.bind_input
        bind(name, "cpu", 0, arr.dtype, list(shape), arr.ctypes.data)

    def _bind_static(self) -> None:
        self._bind_ptr("seqlens_k", self._seqlens, self._seqlens.shape)
        self._bind_ptr("total_sequence_length", self._total, ())
        self._bind_ptr("logits_to_keep", self._keep, self._keep.shape)
        for i in range(self.num_layers):
            for kind, buf in (("key", self.kv.keys(i)), ("value", self.kv.values(i))):
                # past and present are one buffer: GroupQueryAttention writes the new K/V at pos in place.
                self._bind_ptr(f"past_{kind}.{i}", buf, buf.shape)
                self._bind_ptr(f"present_{kind}.{i}", buf, buf.shape, output=True)

    def forward(self, ids: Sequence[int], keep: int = 1) -> np.ndarray:
        """Run len(ids) tokens at positions pos..pos+n-1; return logits [keep, vocab] of the last `keep` of them.

        The returned array is a view into a buffer the next call overwrites.
        """
        n = len(ids)
        if not 0 < n <= self.max_chunk:
            raise ValueError(f"forward takes 1..{self.max_chunk} tokens, got {n}")
        if not 0 < keep <= min(n, self.max_logits):
            raise ValueError(f"keep must be in 1..{min(n, self.max_logits)}, got {keep}")
        self.kv.reserve(n)
        pos = self.kv.pos
        self._ids[0, :n] = ids
        self._seqlens[0] = pos + n - 1
        self._total[...] = pos + n
        self._keep[0] = keep
        if self._shape != (n, keep):
            self._bind_ptr("input_ids", self._ids, (1, n))
            self._bind_ptr("logits", self._logits, (1, keep, self.arch.vocab_size), output=True)
            self._shape = (n, keep)
        if self.features is not None:  # rows pos..pos+n-1 of the feature buffer
            self._binding.bind_output("hidden_states", "cpu", 0, np.float32, [1, n, self.arch.hidden_size],
                                      self._features_at + pos * self.arch.hidden_size * 4)
        self.session.run_with_iobinding(self._binding)
        self.kv.pos = pos + n
        return self._logits[0, :keep]

    def prefill(self, ids: Sequence[int], keep: int = 1) -> np.ndarray:
        return prefill_in_chunks(self, ids, keep)


def prefill_in_chunks(decoder, ids: Sequence[int], keep: int = 1) -> np.ndarray:
    """Feed any number of tokens in chunks of decoder.max_chunk through decoder.forward; logits of the last `keep`
    (keep <= the last chunk). Shared by Decoder and StaticDecoder: the cache is checked for room once, up front."""
    decoder.kv.reserve(len(ids))
    logits = None
    for start in range(0, len(ids), decoder.max_chunk):
        chunk = ids[start:start + decoder.max_chunk]
        logits = decoder.forward(chunk, keep=min(keep, len(chunk)))
    return logits
