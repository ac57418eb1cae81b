"""The self-draft: the target's own weights, quantized harder and optionally cut to its first layers
(LayerSkip style: first N layers + the final norm + the LM head), stored as a second graph of the bundle.

`--draft self[:RECIPE][:LAYERS]`, e.g. `self` (cpu-int8, every layer), `self:cpu-int4`, `self:cpu-int4:24`, `self:none:16`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from edge_runtime.errors import ExportError
from edge_runtime.manifest import Architecture, GraphSpec

from .builder import ModelWeights, build_decoder, save_model

DRAFT = "draft.onnx"
# cpu-int8, not cpu-int4: on 2 AVX2 cores both run MatMulNBits on int8 activations, compute-bound, so INT4 saves
# only ~20% of a draft step (SmolLM2: 7.2 vs 8.9 ms, float32 target 19.7 ms) while INT8 agrees far more (chat
# acceptance 0.97 vs 0.61): `edge-rt bench` chat 1.53x vs 1.17x of target-only (README, speculative decoding).
DEFAULT_RECIPE = "cpu-int8"


@dataclasses.dataclass(frozen=True)
class SelfDraft:
    recipe: str | None  # a quant recipe, or None to keep the float weights
    layers: int | None  # None: every layer


def parse_self_draft(spec: str, num_layers: int) -> SelfDraft:
    parts = spec.split(":")
    if parts[0] != "self" or len(parts) > 3:
        raise ExportError(f"--draft {spec!r} is not of the form self[:RECIPE][:LAYERS]")
    recipe = parts[1] if len(parts) > 1 and parts[1] else DEFAULT_RECIPE
    layers = None
    if len(parts) > 2:
        if not parts[2].isdigit() or not 1 <= int(parts[2]) <= num_layers:
            raise ExportError(f"self-draft layers must be 1..{num_layers}, got {parts[2]!r}")
        layers = int(parts[2])
    return SelfDraft(None if recipe == "none" else recipe, layers)


def build_self_draft(spec: SelfDraft, arch: Architecture, weights: ModelWeights, folder: Path,
                     kv_dtype: str = "float32", calibration_ids: list[int] | None = None) -> tuple[GraphSpec, list[str]]:
    """Write the draft graph into folder; return its GraphSpec and the files it wrote.

    calibration_ids: token ids for recipes that measure sensitivity (cpu-int4, auto)."""
    layers = spec.layers or arch.num_layers
    cut = dataclasses.replace(weights, layers=weights.layers[:layers])
    float_name = DRAFT if spec.recipe is None else "draft-float.onnx"
    save_model(build_decoder(arch, cut, kv_dtype=kv_dtype), folder / float_name, float_name + ".data")
    if spec.recipe is None:
        files = [DRAFT, DRAFT + ".data"]
    else:
        try:
            from quant.recipes import quantize_graph
        except ImportError as e:
            raise ExportError(f"a quantized self-draft needs the quant package ({e})") from None
        before = set(p.name for p in folder.iterdir())
        from quant.recipes import recipe_options
        options = {"calibration_ids": calibration_ids} if "calibration_ids" in recipe_options(spec.recipe) else {}
        quantize_graph(folder / float_name, folder / DRAFT, spec.recipe, **options)
        (folder / float_name).unlink()
        (folder / (float_name + ".data")).unlink()
        files = sorted(set(p.name for p in folder.iterdir()) - before | {DRAFT})
    data = tuple(f for f in files if f != DRAFT)
    graph = GraphSpec(role="draft", file=DRAFT, data_files=data, kind="gqa", precision=spec.recipe or "fp32",
                      kv_dtype=kv_dtype, num_layers=layers)
    return graph, files
