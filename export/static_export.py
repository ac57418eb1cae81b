"""Export for an NPU (`edge-rt export ... --target-ep qnn`): the static-shape variants of the decoder, one weights file.

AR-1 runs decode and draft steps, AR-k (k = draft_max + 1) verifies drafts, AR-N runs prefill chunks.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from edge_runtime.errors import ExportError
from edge_runtime.manifest import Architecture, GraphSpec

from .builder import ModelWeights
from .static_builder import build_static_decoder, save_variants, variants

STATIC_DATA = "static.onnx.data"
VERIFY_TOKENS = 5      # k: the engine verifies up to draft_max (4) drafts + 1 bonus position in one call
PREFILL_TOKENS = 64    # N: prefill chunk
TARGET_EPS = ("cpu", "qnn")


def static_tokens(verify_tokens: int = VERIFY_TOKENS, prefill_tokens: int = PREFILL_TOKENS) -> tuple[int, ...]:
    return tuple(sorted({1, verify_tokens, prefill_tokens}))


def static_architecture(arch: Architecture, context: int) -> Architecture:
    """A static bundle's rotary table holds exactly `context` positions: the most any context can be."""
    if not 0 < context <= arch.max_position_embeddings:
        raise ExportError(f"--context {context} is out of range; this model takes 1..{arch.max_position_embeddings}")
    return replace(arch, max_position_embeddings=context)


def write_static_graphs(arch: Architecture, weights: ModelWeights, folder: Path, context: int,
                        tokens: tuple[int, ...], ep: str = "qnn") -> tuple[tuple[GraphSpec, ...], list[str]]:
    """Write AR-n graphs for every n in `tokens` into `folder`; return their GraphSpecs and the files written."""
    max_logits = sorted(tokens)[1] if len(tokens) > 1 else 1   # k: the verification width
    shapes = variants(context, tokens, max_logits)
    try:
        models = {s.name: build_static_decoder(arch, weights, s) for s in shapes}
    except ValueError as e:
        raise ExportError(f"cannot build static graphs: {e}") from None
    files = save_variants(models, folder, STATIC_DATA)
    specs = tuple(GraphSpec(role="target", file=f"{s.name}.onnx", kind="static", precision="fp32",
                            execution_provider=ep, data_files=(STATIC_DATA,), static_shapes=s.as_dict())
                  for s in shapes)
    return specs, files


def static_runtime_logits(bundle, ids: list[int], ep: str = "cpu") -> tuple[np.ndarray, list[int]]:
    """Logits of the static graphs through the runtime's StaticDecoder, and the positions they belong to.

    Exercises every variant: the first half in one call (AR-N, padded), then one AR-k call, then AR-1 steps.
    """
    from edge_runtime.static_decoder import load_static_decoder
    dec = load_static_decoder(bundle, "target", context=None, ep=ep)
    ids = ids[:dec.kv.capacity]
    rows, out = [], []
    split = max(1, min(len(ids) // 2, dec.max_chunk))
    keep = min(split, dec.max_logits)
    out.append(dec.forward(ids[:split], keep).copy())
    rows += range(split - keep, split)
    i, k = split, dec.max_logits
    if i + k <= len(ids):
        out.append(dec.forward(ids[i:i + k], k).copy())
        rows += range(i, i + k)
        i += k
    for j in range(i, len(ids)):
        out.append(dec.forward(ids[j:j + 1]).copy())
        rows.append(j)
    return np.concatenate(out), rows
