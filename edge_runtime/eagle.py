"""An EAGLE draft's graph bound to its own one-layer KV cache, fed the target's features (Li et al. 2024).

Position t of the draft reads (token t+1, the target's feature f_t) and predicts f_{t+1}, whose head row gives token
t+2. `sync` runs the positions whose true features the target has just computed (rewinding over the previous round's
drafts, which ran on predicted features); `extend` drafts one more token on the draft's own last predicted feature.
Both look like CachedDecoder's, so ModelDrafter drives either. Every buffer is allocated here, once.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from .cached import common_prefix
from .errors import BundleError
from .kvcache import KVCache
from .manifest import Architecture


class EagleModel:
    def __init__(self, session: ort.InferenceSession, arch: Architecture, capacity: int,
                 target_features: np.ndarray | None, max_chunk: int = 256, target_name: str = "the target"):
        if target_features is None:
            raise BundleError(f"{target_name} has no hidden_states output, which an EAGLE draft reads; re-export it "
                              "with this edge-runtime (`edge-rt export MODEL --force`)")
        self.session, self.max_chunk = session, max_chunk
        H = arch.hidden_size
        self.target_features = target_features                 # [target capacity, H] float32, the target's buffer
        self.kv = KVCache(1, arch.num_kv_heads, arch.head_dim, capacity)
        self.tokens: list[int] = []                             # history[:valid + 1]: what positions 0..valid-1 saw
        self.valid = 0                                          # positions 0..valid-1 ran on true features
        self._ids = np.zeros((1, max_chunk), np.int64)          # input_ids [1, n]
        self._seqlens = np.zeros((1,), np.int32)                # pos + n - 1
        self._total = np.zeros((), np.int32)                    # pos + n
        self._feat = np.zeros((1, 1, H), np.float32)            # features input while drafting: the last prediction
        self._out = np.zeros((1, 1, H), np.float32)             # hidden_states [1, 1, H]: the predicted feature
        self._logits = np.zeros((1, 1, arch.vocab_size), np.float32)  # logits [1, 1, N] over the head's rows
        self._row_bytes = target_features.strides[0]
        self._target_at = target_features.ctypes.data
        self._binding = b = session.io_binding()
        for name, arr in (("seqlens_k", self._seqlens), ("total_sequence_length", self._total)):
            b.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        for kind, buf in (("key", self.kv.keys(0)), ("value", self.kv.values(0))):
            b.bind_input(f"past_{kind}.0", "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            b.bind_output(f"present_{kind}.0", "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        for name, arr in (("hidden_states", self._out), ("logits", self._logits)):
            b.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        self._feat_at = self._feat.ctypes.data
        self._ids_at = self._ids.ctypes.data

    def _run(self, ids: Sequence[int], features_at: int) -> np.ndarray:
        """ids at positions pos..pos+n-1 with features [n, H] at address features_at; logits [1, N] of the last."""
        n, pos = len(ids), self.kv.pos
        self.kv.reserve(n)
        self._ids[0, :n] = ids
        self._seqlens[0] = pos + n - 1
        self._total[...] = pos + n
        H = self._out.shape[2]
        self._binding.bind_input("input_ids", "cpu", 0, np.int64, [1, n], self._ids_at)
        self._binding.bind_input("features", "cpu", 0, np.float32, [1, n, H], features_at)
        self.session.run_with_iobinding(self._binding)
        self.kv.pos = pos + n
        return self._logits[0]

    def sync(self, history: Sequence[int], known: int = 0) -> tuple[np.ndarray, int]:
        """Run positions up to len(history) - 2 on the target's true features (the target holds f_0..f_{len-2});
        logits [1, N] of the last (its prediction of the token after history). `known`: history[:known] was synced
        by the previous call, so only the tail is compared."""
        n_true = len(history) - 1
        start = min(max(known - 1, 0), len(self.tokens))
        same = start + common_prefix(self.tokens[start:], history[start:])  # history[:same] is what the cache saw
        # position t depends on tokens 0..t+1; at least one position runs, for its logits
        common = max(0, min(same - 1, self.valid, n_true - 1))
        self.kv.pos = common  # drop drafted positions and any divergence: a pointer move
        logits = None
        for at in range(common, n_true, self.max_chunk):
            end = min(at + self.max_chunk, n_true)
            logits = self._run(history[at + 1:end + 1], self._target_at + at * self._row_bytes)
        del self.tokens[common:]
        self.tokens.extend(history[common:n_true + 1])
        self.valid = n_true
        self._feat[...] = self._out
        return logits, n_true - common

    def extend(self, ids: Sequence[int], keep: int = 1) -> np.ndarray:
        """Draft one token past the last position on the draft's own predicted feature; logits [1, N]."""
        logits = self._run(ids, self._feat_at)
        self._feat[...] = self._out
        return logits
