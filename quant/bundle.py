"""A float bundle -> a quantized bundle: every graph quantized, other files copied, a new manifest.

Written to a temp folder next to the output and renamed, so a failure leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from edge_runtime.bundle import Bundle, sha256_file
from edge_runtime.errors import QuantizationError
from edge_runtime.manifest import MANIFEST, GraphSpec, Manifest
from edge_runtime.memory import parse_size
from edge_runtime.tokenizer import load_tokenizer

from .calibration import load_text
from .recipes import check_options, quantize_graph, recipe_options

FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
MANIFEST_GROWTH = 8 * 1024  # the new manifest is at most twice the old one plus this (the quantization report)


def _graph_files(spec: GraphSpec) -> list[str]:
    return [spec.file, *spec.data_files]


def quantize_bundle(bundle_dir: str | Path, out_dir: str | Path, recipe: str, draft_recipe: str | None = None,
                    calibration: str | Path | None = None, progress: Callable[[str], None] | None = None,
                    **options) -> tuple[Bundle, dict[str, dict]]:
    """Quantize the graphs of a float bundle into out_dir: the target with `recipe`, a draft with `draft_recipe`.

    A float draft takes draft_recipe (default: the target's recipe, or cpu-int4 when that is auto); a draft that
    is already quantized (an exported self-draft) is copied as it is. options go to quantize_graph: block_size,
    accuracy_level, max_size (auto: the whole output bundle's bytes, or a size string like "120MB"), threads.
    calibration: a UTF-8 text file [the shipped corpus]. Returns the new bundle and each quantized graph's report.
    """
    say = progress or (lambda _msg: None)
    src = Bundle.load(bundle_dir)
    m = src.manifest
    out = Path(out_dir)
    if out.exists():
        raise QuantizationError(f"{out} already exists; choose another -o or remove it")
    static = [g.file for g in m.graphs if g.kind != "gqa"]
    if static:
        raise QuantizationError(f"bundle {src.path} has static (NPU) graphs; quantize it with a qnn-* recipe")
    target, draft = m.graph("target"), m.graph("draft")
    if target.precision not in FLOAT_PRECISIONS:
        raise QuantizationError(f"bundle {src.path} is already quantized (target precision {target.precision}); "
                                "quantize the float bundle it was made from")
    draft_is_float = draft is not None and draft.precision in FLOAT_PRECISIONS
    if draft_recipe is not None and not draft_is_float:
        why = "has no draft graph" if draft is None else f"has a draft that is already quantized ({draft.precision})"
        raise QuantizationError(f"bundle {src.path} {why}; drop --draft-recipe")
    if draft_recipe is None:
        draft_recipe = "cpu-int4" if recipe == "auto" else recipe
    if draft_is_float and draft_recipe == "auto":
        raise QuantizationError("the draft cannot take recipe auto (--max-size budgets the target); "
                                "give --draft-recipe cpu-int4 or cpu-int8")
    max_size = options.pop("max_size", None)
    max_size = None if max_size is None else parse_size(max_size)
    check_options(recipe, {**options, "max_size": max_size})
    if draft_is_float:
        check_options(draft_recipe, options)
    text = load_text(calibration)  # a bad --calibration file fails before any work
    ids = load_tokenizer(src.file(m.tokenizer)).encode(text, add_special_tokens=False).ids
    jobs = ([(draft, draft_recipe)] if draft_is_float else []) + [(target, recipe)]  # the draft first: see max_size
    quantized = {f for spec, _ in jobs for f in _graph_files(spec)}
    copied = [name for name in m.files if name not in quantized]

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        for name in copied:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src.file(name), tmp / name)
        reports, specs = {}, {}
        for spec, name in jobs:
            opts = dict(options)
            if "calibration_ids" in recipe_options(name):
                opts["calibration_ids"] = ids
            if spec.role == "target" and max_size is not None:
                # the target gets what the copied files and the draft leave of the budget
                opts["max_size"] = max_size
                manifest = 2 * (src.path / MANIFEST).stat().st_size + MANIFEST_GROWTH
                opts["other_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) + manifest
            say(f"{spec.role}: {name}")
            report = quantize_graph(src.file(spec.file), tmp / spec.file, name,
                                    progress=lambda msg, role=spec.role: say(f"{role}: {msg}"), **opts)
            reports[spec.role] = report
            specs[spec.role] = dataclasses.replace(spec, precision=report["precision"], ep_context=None,
                                                   data_files=(f"{spec.file}.data",))
        say("write manifest")
        graphs = tuple(specs.get(spec.role, spec) for spec in m.graphs)
        files = {name: sha256_file(tmp / name) for name in copied}
        files.update({f: sha256_file(tmp / f) for g in graphs for f in _graph_files(g)})
        summary = {role: {k: v for k, v in r.items() if k != "sensitivity"} for role, r in reports.items()}
        quantization = {"recipe": recipe, "draft_recipe": draft_recipe if draft_is_float else None,
                        "from": {"name": m.name, "path": str(src.path)},
                        "calibration": "shipped" if calibration is None else str(calibration),
                        "options": {k: v for k, v in {**options, "max_size": max_size}.items() if v is not None},
                        "graphs": summary}
        new = Manifest(**{**m.__dict__, "graphs": graphs, "files": files,
                          "source": {**m.source, "quantization": quantization}})
        new.write(tmp)
        Bundle.load(tmp)  # the manifest must describe what is on disk
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        if max_size is not None and size > max_size:
            raise QuantizationError(f"the quantized bundle came out at {size} bytes, over --max-size {max_size}; "
                                    "lower it by a few KB")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bundle.load(out), reports
