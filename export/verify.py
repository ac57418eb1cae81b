"""Export's last step: ONNX Runtime logits through the runtime's own decoder vs the PyTorch model."""
from __future__ import annotations

import numpy as np

from edge_runtime.bundle import Bundle
from edge_runtime.decoder import Decoder
from edge_runtime.session import create_session

# float32 graphs agree with PyTorch to ~3e-6 of the largest logit (SmolLM2: 1e-4 abs on logits near 39).
FP32_RELATIVE_TOLERANCE = 1e-4
# a float16 KV cache (attention in float16) rounds Q/K/V to 11 bits: 1.3e-3 of the largest logit on SmolLM2,
# 3e-3 on the tiny random model
FP16_KV_RELATIVE_TOLERANCE = 1e-2


def reference_logits(model, ids: list[int]) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()  # [S, vocab]


def runtime_logits(bundle: Bundle, ids: list[int], split: int) -> np.ndarray:
    """Prefill ids[:split] in one call, then one token per call: checks prompt and decode paths and the cache."""
    m = bundle.manifest
    spec = m.graph("target")
    dec = Decoder(create_session(bundle.file(spec.file)), m.architecture, spec.num_layers or m.architecture.num_layers,
                  capacity=len(ids), max_logits=split, kv_dtype=np.dtype(spec.kv_dtype))
    out = [dec.forward(ids[:split], keep=split).copy()]
    out += [dec.forward(ids[i:i + 1]).copy() for i in range(split, len(ids))]
    return np.concatenate(out)


def verify_bundle(bundle: Bundle, model, ids: list[int]) -> tuple[float, float]:
    """Return (max abs error, tolerance) of the bundle's logits against the PyTorch model's."""
    ref = reference_logits(model, ids)
    if bundle.manifest.graph("target").kind == "static":
        from .static_export import static_runtime_logits
        got, rows = static_runtime_logits(bundle, ids)
        ref = ref[rows]
    else:
        got = runtime_logits(bundle, ids, split=max(1, len(ids) // 2))
    err = float(np.abs(got - ref).max())
    relative = FP16_KV_RELATIVE_TOLERANCE if bundle.manifest.graph("target").kv_dtype == "float16" \
        else FP32_RELATIVE_TOLERANCE
    tol = relative * max(1.0, float(np.abs(ref).max()))
    return err, tol
