"""A model exported as static-shape graphs (an NPU's form) behind the same interface as `Decoder`.

The graphs (export/static_builder.py) read a cache of fixed length C and return only the new K/V; this decoder owns
that cache and writes what comes back at the write pointer:

    forward(ids):  pick the smallest variant with n >= len(ids) (AR-1, AR-k, AR-N), left-pad the ids to n,
                   mask = [valid cache slots 0..pos-1 | the real new positions], run,
                   cache[pos : pos + r] = new K/V of the r real positions, pos += r

Rewinding is still `pos -= n`: the mask is rebuilt from `pos`, so stale slots past it are never read.
Every buffer is allocated here, once, and bound to its session by pointer; a step copies ids in and the new K/V out.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .decoder import prefill_in_chunks
from .errors import BundleError, ExecutionProviderError, InvalidArgumentError
from .kvcache import KVCache
from .manifest import Architecture, GraphSpec


class StaticKVCache(KVCache):
    """One allocation like KVCache; each layer's keys are read as [1, kv, head_dim, C] (transposed, the layout
    the static graphs take so scores need no Transpose), values as [1, kv, C, head_dim]."""

    def keys(self, layer: int) -> np.ndarray:
        _, _, b, h, c, d = self.data.shape
        return self.data[0, layer].reshape(b, h, d, c)

    def values(self, layer: int) -> np.ndarray:
        return self.data[1, layer]

    def all_keys(self) -> np.ndarray:    # [layers, 1, kv, head_dim, C]
        two, layers, b, h, c, d = self.data.shape
        return self.data[0].reshape(layers, b, h, d, c)

    def all_values(self) -> np.ndarray:  # [layers, 1, kv, C, head_dim]
        return self.data[1]


@dataclass
class _Variant:
    """One fixed-shape graph, its session and its staging buffers, all bound once."""
    tokens: int                # n
    logits: int                # L: the graph returns logits of its last L positions
    session: ort.InferenceSession
    ids: np.ndarray            # input_ids [1, n] int32 (left-padded)
    positions: np.ndarray      # position_ids [1, n] int32
    mask: np.ndarray           # attention_mask [1, C + n]: valid cache slots, then the real new positions
    logits_out: np.ndarray     # logits [1, L, vocab]
    new_keys: np.ndarray       # [layers, 1, kv, head_dim, n]
    new_values: np.ndarray     # [layers, 1, kv, n, head_dim]
    binding: ort.IOBinding
    mask_pos: int = 0          # mask[0, :mask_pos] is 1 and mask[0, mask_pos:C] is 0
    pad: int = 0               # pad columns currently masked in the new part


class StaticDecoder:
    """Same interface as Decoder: kv, forward(ids, keep), prefill(ids, keep), max_chunk, max_logits."""

    def __init__(self, sessions: Mapping[int, tuple[ort.InferenceSession, int]], arch: Architecture,
                 num_layers: int, context: int, capacity: int | None = None):
        """sessions: n -> (session of the AR-n graph, L); context: the graphs' C; capacity: usable slots (<= C)."""
        if not sessions:
            raise BundleError("a static model needs at least one graph variant; re-export the bundle")
        capacity = context if capacity is None else capacity
        if not 0 < capacity <= context:
            raise InvalidArgumentError(f"context {capacity} is out of range; these static graphs were exported for "
                                       f"a context of {context} (re-export with --context to change it)")
        self.arch = arch
        self.num_layers = num_layers
        self.context = context
        self.kv = StaticKVCache(num_layers, arch.num_kv_heads, arch.head_dim, context)
        self.kv.capacity = capacity
        self._variants = [self._make_variant(n, session, logits) for n, (session, logits) in sorted(sessions.items())]
        self.max_chunk = self._variants[-1].tokens
        self._offsets = np.arange(self.max_chunk, dtype=np.int32)  # 0..N-1: positions are pos + these
        self.max_logits = max(v.logits for v in self._variants)
        self.variant_calls = {v.tokens: 0 for v in self._variants}  # how often each variant ran (for stats)

    def _make_variant(self, n: int, session: ort.InferenceSession, logits: int) -> _Variant:
        a, C, layers = self.arch, self.context, self.num_layers
        v = _Variant(
            tokens=n, logits=logits, session=session,
            ids=np.zeros((1, n), np.int32), positions=np.zeros((1, n), np.int32),
            mask=np.zeros((1, C + n), np.float32),
            logits_out=np.zeros((1, logits, a.vocab_size), np.float32),
            new_keys=np.zeros((layers, 1, a.num_kv_heads, a.head_dim, n), np.float32),
            new_values=np.zeros((layers, 1, a.num_kv_heads, n, a.head_dim), np.float32),
            binding=session.io_binding(),
        )
        v.mask[0, C:] = 1.0
        expected = {"input_ids", "position_ids", "attention_mask"} | {f"past_{k}.{i}" for k in ("key", "value")
                                                                     for i in range(layers)}
        got = {i.name for i in session.get_inputs()}
        if got != expected:
            raise BundleError(f"static graph AR-{n} has inputs {sorted(got - expected)} unexpected or "
                              f"{sorted(expected - got)} missing; re-export the bundle")

        def bind(name: str, arr: np.ndarray, output: bool = False) -> None:
            (v.binding.bind_output if output else v.binding.bind_input)(name, "cpu", 0, arr.dtype, list(arr.shape),
                                                                        arr.ctypes.data)
        bind("input_ids", v.ids)
        bind("position_ids", v.positions)
        bind("attention_mask", v.mask)
        bind("logits", v.logits_out, output=True)
        for i in range(layers):
            # past K/V: the cache itself, read in place; the graph never writes it
            bind(f"past_key.{i}", self.kv.keys(i))
            bind(f"past_value.{i}", self.kv.values(i))
            bind(f"new_key.{i}", v.new_keys[i], output=True)
            bind(f"new_value.{i}", v.new_values[i], output=True)
        return v

    def _variant_for(self, n: int) -> _Variant:
        return next(v for v in self._variants if v.tokens >= n)

    def forward(self, ids: Sequence[int], keep: int = 1) -> np.ndarray:
        """Run len(ids) tokens at positions pos..pos+n-1; return logits [keep, vocab] of the last `keep` of them.

        The returned array is a view into a buffer the next call overwrites.
        """
        r = len(ids)
        if not 0 < r <= self.max_chunk:
            raise ValueError(f"forward takes 1..{self.max_chunk} tokens, got {r}")
        v = self._variant_for(r)
        if not 0 < keep <= min(r, v.logits):
            raise ValueError(f"keep must be in 1..{min(r, v.logits)}, got {keep}")
        self.kv.reserve(r)
        pos, n, C = self.kv.pos, v.tokens, self.context
        pad = n - r
        v.ids[0, :pad] = 0
        v.ids[0, pad:] = ids
        v.positions[0, :pad] = 0
        np.add(self._offsets[:r], pos, out=v.positions[0, pad:])
        # the mask changes only between the old and the new write pointer
        if pos > v.mask_pos:
            v.mask[0, v.mask_pos:pos] = 1.0
        elif pos < v.mask_pos:
            v.mask[0, pos:v.mask_pos] = 0.0
        v.mask_pos = pos
        if pad != v.pad:
            v.mask[0, C:C + pad] = 0.0
            v.mask[0, C + pad:] = 1.0
            v.pad = pad
        v.session.run_with_iobinding(v.binding)
        self.variant_calls[n] += 1
        # write the r real positions' K/V at pos (keys are [.., head_dim, C]: positions on the last axis)
        self.kv.all_keys()[..., pos:pos + r] = v.new_keys[..., pad:]
        self.kv.all_values()[..., pos:pos + r, :] = v.new_values[..., pad:, :]
        self.kv.pos = pos + r
        return v.logits_out[0, v.logits - keep:]

    def prefill(self, ids: Sequence[int], keep: int = 1) -> np.ndarray:
        return prefill_in_chunks(self, ids, keep)


def static_specs(manifest, role: str) -> list[GraphSpec]:
    """Every static variant of one role, smallest first; all must share one context."""
    specs = sorted((g for g in manifest.graphs if g.role == role and g.kind == "static"),
                   key=lambda g: (g.static_shapes or {}).get("tokens", 0))
    for g in specs:
        shapes = g.static_shapes or {}
        if not {"context", "tokens", "logits"} <= set(shapes):
            raise BundleError(f"static graph {g.file} has no static_shapes (context, tokens, logits); "
                              "re-export the bundle")
    if len({g.static_shapes["context"] for g in specs}) > 1:
        raise BundleError(f"the static {role} graphs were exported for different contexts; re-export the bundle")
    return specs


def load_static_decoder(bundle, role: str, context: int | None, threads: int | None = None, ep: str = "cpu",
                        ep_options: Mapping[str, str] | None = None) -> StaticDecoder:
    """Create one session per static variant of `role` (their compiled EPContext form when compiled for `ep`)."""
    from .providers import create_ep_session
    m = bundle.manifest
    specs = static_specs(m, role)
    if not specs:
        raise BundleError(f"bundle {bundle.path} has no static {role} graphs; export it with --target-ep qnn")
    C = specs[0].static_shapes["context"]
    sessions = {}
    for spec in specs:
        path, compiled = bundle.file(spec.file), spec.ep_context
        if compiled and compiled.get("ep") == ep:
            unlisted = [f for f in (compiled["file"], *compiled.get("binaries", ())) if f not in m.files]
            if unlisted:
                raise BundleError(f"compiled graph files {unlisted} have no sha256 in the manifest; run "
                                  f"`edge-rt compile {bundle.path} --ep {ep}` again")
            path = bundle.file(compiled["file"])
        # on the CPU a QDQ graph runs as written (dequantize, float op, quantize): ORT's QDQ fusions would
        # requantize 16-bit activations to 8 bits and drift ~200 LSB from what the NPU computes
        config = {"session.disable_quant_qdq": "1"} if ep == "cpu" and spec.precision != "fp32" else None
        try:
            session = create_ep_session(path, ep, ep_options, threads, config)
        except ExecutionProviderError as e:
            if spec.precision != "fp32" or ep == "cpu":
                raise
            raise ExecutionProviderError(f"{e}; the NPU runs quantized graphs: quantize the bundle first "
                                         "(`edge-rt quantize ... --recipe qnn-w8a16`)") from None
        sessions[spec.static_shapes["tokens"]] = (session, spec.static_shapes["logits"])
    arch = m.architecture
    return StaticDecoder(sessions, arch, specs[0].num_layers or arch.num_layers, C,
                         capacity=C if context is None else context)
