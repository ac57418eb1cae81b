"""Quantization recipes: one float graph file in, one quantized graph file (+ its external data) out.

    cpu-int8  every linear (LM head included) at 8 bits, MatMulNBits; the embedding at 8 bits
    cpu-int4  every linear at 4 bits with an importance-weighted scale search; at 8 bits the LM head (and so the
              embedding) and the linears measured most sensitive, up to INT4_EIGHT_BIT_SHARE of the rest
    cpu-int4-fast  cpu-int4 without the sensitivity measurement: only the LM head at 8 bits
    cpu-int4-all  every linear at 4 bits, the LM head (and so the embedding) too: onnxruntime-genai's int4
    auto      like cpu-int4, but the 8-bit linears are picked by measured sensitivity until --max-size is met

`quantize_graph(src, dst, recipe, **options)` runs one; RECIPES maps names to their functions, each taking the
source and destination paths plus its own keyword options and returning a small report (a JSON-able dict).
"""
from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable
from pathlib import Path

from onnx import numpy_helper

from edge_runtime.errors import QuantizationError
from edge_runtime.memory import format_size, parse_size

from . import graph as G
from .sensitivity import Probe, Sensitivity

DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits: 2-3x faster decode than fp32 activations
INT4_EIGHT_BIT_SHARE = 0.10  # cpu-int4: the most sensitive linears up to this share of the parameters go 8-bit
PROTO_BYTES_PER_LINEAR = 1024  # the .onnx file grows by less than this per quantized linear (names, attributes)

Progress = Callable[[str], None]
RECIPES: dict[str, Callable[..., dict]] = {}


def register(name: str):
    def add(fn):
        RECIPES[name] = fn
        return fn
    return add


def known_recipes() -> list[str]:
    """The CPU recipes here and the QNN ones of quant.qnn (static NPU graphs)."""
    try:
        from .qnn import RECIPES as QNN
    except ImportError:
        QNN = {}
    return sorted(RECIPES) + sorted(QNN)


def recipe_options(recipe: str) -> set[str]:
    """The keyword options a recipe takes; an unknown recipe is an error naming the known ones."""
    if recipe not in RECIPES:
        raise QuantizationError(f"unknown recipe {recipe!r}; choose one of: {', '.join(known_recipes())}")
    params = inspect.signature(RECIPES[recipe]).parameters.values()
    return {p.name for p in params if p.kind == p.KEYWORD_ONLY}


USER_OPTIONS = ("block_size", "accuracy_level", "max_size")  # what `edge-rt quantize` exposes as flags


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def check_options(recipe: str, options: dict) -> None:
    """Every option set (not None) must be one the recipe takes; a required one must be set."""
    takes = recipe_options(recipe)
    for name, value in options.items():
        if value is not None and name not in takes:
            flags = [_flag(t) for t in sorted(takes) if t in USER_OPTIONS]
            raise QuantizationError(f"recipe {recipe} does not take {_flag(name)}; "
                                    f"it takes {', '.join(flags) or 'none of the tuning options'}")
    params = inspect.signature(RECIPES[recipe]).parameters
    for name, p in params.items():
        if p.kind == p.KEYWORD_ONLY and p.default is inspect.Parameter.empty and options.get(name) is None:
            raise QuantizationError(f"recipe {recipe} needs {_flag(name)}")


def quantize_graph(src_onnx: Path, dst_onnx: Path, recipe: str, **options) -> dict:
    """Quantize one graph file of a bundle with `recipe`; writes dst_onnx and `<dst_onnx name>.data` next to it.

    Options (each recipe takes a subset; None means the default): block_size, accuracy_level, max_size (bytes,
    auto), calibration_ids (token ids; default: the shipped text through the bundle's tokenizer), threads,
    progress (a callable taking a short status string). Returns a report: recipe, precision, bits per linear
    count, the 8-bit linears, sizes, and (calibrated recipes) the measured sensitivities.
    """
    check_options(recipe, options)
    given = {k: v for k, v in options.items() if v is not None}
    src_onnx, dst_onnx = Path(src_onnx), Path(dst_onnx)
    t0 = time.perf_counter()
    report = RECIPES[recipe](src_onnx, dst_onnx, **given)
    return {"recipe": recipe, **report, "seconds": round(time.perf_counter() - t0, 1)}


# ---- shared steps ----------------------------------------------------------------------------------------

def _load_float(src: Path) -> tuple:
    model = G.load(src)
    ops = G.quantized_ops(model)
    if ops:
        raise QuantizationError(f"{src} is already quantized (it has {', '.join(sorted(ops))}); "
                                "quantize the float bundle it was made from")
    linears = G.find_linears(model)
    if not linears:
        raise QuantizationError(f"{src} has no linear layer with float weights to quantize; re-export the bundle")
    return model, linears


def _default_calibration_ids(src: Path) -> list[int]:
    """The shipped text through the tokenizer of the bundle the graph sits in."""
    from edge_runtime.tokenizer import load_tokenizer

    from .calibration import shipped_text
    manifest = src.parent / "manifest.json"
    try:
        tokenizer = json.loads(manifest.read_text())["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError):
        raise QuantizationError(f"{src} is not inside a bundle, so there is no tokenizer for the calibration text; "
                                "pass calibration_ids") from None
    return load_tokenizer(src.parent / tokenizer).encode(shipped_text(), add_special_tokens=False).ids


def _fixed_nbytes(src: Path, model, linears: list[G.Linear], block_size: int) -> int:
    """Bytes of the quantized graph files that are not linear weights: norms, rotary tables, embeddings, the graph."""
    embeddings = G.find_embeddings(model, linears)
    quantized = {lin.weight for lin in linears} | {e.table for e in embeddings}
    other = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name not in quantized)
    tables = sum(G.embedding_nbytes(e, block_size) for e in embeddings)
    return other + tables + src.stat().st_size + PROTO_BYTES_PER_LINEAR * len(linears)


def _write(model, dst: Path, blocks: dict[str, G.Blocks], accuracy_level: int) -> tuple[int, dict[str, str]]:
    """Rewrite and save; returns the bytes written and how each embedding table was stored."""
    tables = G.rewrite(model, blocks, accuracy_level)
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = G.save(model, dst)
    return dst.stat().st_size + sum((dst.parent / d).stat().st_size for d in data), tables


def _precision(bits: dict[str, int]) -> str:
    return "+".join(f"int{b}" for b in sorted(set(bits.values())))


def _report(linears, bits: dict[str, int], written: tuple[int, dict[str, str]], float_size: int, block_size: int,
            accuracy_level: int, sens: list[Sensitivity] | None = None) -> dict:
    size, tables = written
    out = {
        "precision": _precision(bits),
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "linears": {f"int{b}": sum(1 for v in bits.values() if v == b) for b in sorted(set(bits.values()))},
        "int8": [lin.name for lin in linears if bits[lin.name] == 8],
        "embeddings": tables,
        "size_bytes": size,
        "float_size_bytes": float_size,
    }
    if sens is not None:
        out["sensitivity"] = [[s.name, round(s.kl, 6)] for s in sens]
    return out


def _float_size(src: Path) -> int:
    """The source graph's .onnx file plus the external data files it references."""
    import onnx
    proto = onnx.load(str(src), load_external_data=False)
    files = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    return src.stat().st_size + sum((src.parent / f).stat().st_size for f in files)


def _calibrated_int4(model, linears, src: Path, block_size: int, calibration_ids, threads, say: Progress,
                     measure: bool = True) -> tuple[dict[str, G.Blocks], list[Sensitivity] | None]:
    """Importance-weighted 4-bit blocks of the linears and (measure=True) their measured sensitivities."""
    ids = list(calibration_ids) if calibration_ids is not None else _default_calibration_ids(src)
    say("calibrate")
    probe = Probe(model, ids, threads)
    say("quantize to 4 bits")
    blocks4 = {lin.name: G.quantize_blocks(G.as_kn(probe.float_weights[lin.weight], lin), 4, block_size,
                                           probe.importance[lin.name]) for lin in linears}
    sens = probe.sensitivities(blocks4, lambda i, n: say(f"sensitivity {i + 1}/{n}")) if measure else None
    del probe
    return blocks4, sens


def _validate(block_size: int, accuracy_level: int) -> None:
    G.validate_block_size(block_size)
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise QuantizationError(f"accuracy level {accuracy_level} is not one of MatMulNBits' 0-4 "
                                "(4: int8 activations, fastest on CPU; 0: unset, float)")


def _eight_bit(linears, bits: dict[str, int], block_size: int, model) -> dict[str, G.Blocks]:
    inits = {t.name: t for t in model.graph.initializer}
    return {lin.name: G.quantize_blocks(G.as_kn(numpy_helper.to_array(inits[lin.weight]), lin), 8, block_size)
            for lin in linears if bits[lin.name] == 8}


def _quiet(_msg: str) -> None:
    pass


# ---- recipes ---------------------------------------------------------------------------------------------

@register("cpu-int8")
def cpu_int8(src: Path, dst: Path, *, block_size: int = DEFAULT_BLOCK_SIZE,
             accuracy_level: int = DEFAULT_ACCURACY_LEVEL, progress: Progress | None = None) -> dict:
    """Every linear at 8 bits (MatMulNBits bits=8), the embedding too."""
    say = progress or _quiet
    _validate(block_size, accuracy_level)
    model, linears = _load_float(src)
    float_size = _float_size(src)
    bits = {lin.name: 8 for lin in linears}
    say("quantize to 8 bits")
    blocks = _eight_bit(linears, bits, block_size, model)
    say("write")
    written = _write(model, dst, blocks, accuracy_level)
    return _report(linears, bits, written, float_size, block_size, accuracy_level)


@register("cpu-int4")
def cpu_int4(src: Path, dst: Path, *, block_size: int = DEFAULT_BLOCK_SIZE,
             accuracy_level: int = DEFAULT_ACCURACY_LEVEL, calibration_ids: list[int] | None = None,
             threads: int | None = None, progress: Progress | None = None) -> dict:
    """4 bits; the LM head and the linears measured most sensitive (up to INT4_EIGHT_BIT_SHARE of the other
    linears' parameters) at 8 bits."""
    return _int4(src, dst, block_size, accuracy_level, calibration_ids, threads, progress, INT4_EIGHT_BIT_SHARE)


@register("cpu-int4-fast")
def cpu_int4_fast(src: Path, dst: Path, *, block_size: int = DEFAULT_BLOCK_SIZE,
                  accuracy_level: int = DEFAULT_ACCURACY_LEVEL, calibration_ids: list[int] | None = None,
                  threads: int | None = None, progress: Progress | None = None) -> dict:
    """cpu-int4 without the per-linear sensitivity pass (seconds instead of minutes): every linear at 4 bits but
    the LM head at 8. For drafts and quick builds; it loses more (SmolLM2: +11% perplexity against +5%)."""
    return _int4(src, dst, block_size, accuracy_level, calibration_ids, threads, progress, 0.0)


@register("cpu-int4-all")
def cpu_int4_all(src: Path, dst: Path, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 accuracy_level: int = DEFAULT_ACCURACY_LEVEL, calibration_ids: list[int] | None = None,
                 threads: int | None = None, progress: Progress | None = None) -> dict:
    """Every linear at 4 bits, the LM head included (what onnxruntime-genai's builder makes with -p int4): the
    smallest and fastest CPU recipe, and the one that loses the most."""
    return _int4(src, dst, block_size, accuracy_level, calibration_ids, threads, progress, 0.0, head_bits=4)


def _int4(src: Path, dst: Path, block_size: int, accuracy_level: int, calibration_ids, threads, progress,
          share: float, head_bits: int = 8) -> dict:
    say = progress or _quiet
    _validate(block_size, accuracy_level)
    model, linears = _load_float(src)
    float_size = _float_size(src)
    body = [lin for lin in linears if not G.is_head(lin)]
    four = body if head_bits == 8 else linears
    blocks4, sens = _calibrated_int4(model, four, src, block_size, calibration_ids, threads, say, measure=share > 0)
    bits = {lin.name: head_bits if G.is_head(lin) else 4 for lin in linears}
    allowance = share * sum(lin.params for lin in body)
    params = {lin.name: lin.params for lin in linears}
    for s in sens or ():  # most sensitive first; one too big for what is left is skipped for the next
        if params[s.name] <= allowance:
            bits[s.name] = 8
            allowance -= params[s.name]
    blocks = {**{k: v for k, v in blocks4.items() if bits[k] == 4}, **_eight_bit(linears, bits, block_size, model)}
    say("write")
    written = _write(model, dst, blocks, accuracy_level)
    return _report(linears, bits, written, float_size, block_size, accuracy_level, sens)


def _sizes(src: Path, model, linears, block_size: int, other_bytes: int) -> tuple[int, dict[str, dict[int, int]]]:
    """(bytes that do not depend on the bits, {linear: {bits: bytes}})."""
    fixed = _fixed_nbytes(src, model, linears, block_size) + other_bytes
    return fixed, {lin.name: {b: G.blocks_nbytes(lin.k, lin.n, b, block_size) for b in (4, 8)} for lin in linears}


def size_range(src_onnx: Path, block_size: int = DEFAULT_BLOCK_SIZE, other_bytes: int = 0) -> tuple[int, int]:
    """What auto can make of a float graph: (every linear at 4 bits, every linear at 8 bits), in bytes, plus
    other_bytes; an estimate a little above what is written (it reserves room for the graph's own growth)."""
    src_onnx = Path(src_onnx)
    G.validate_block_size(block_size)
    model, linears = _load_float(src_onnx)
    fixed, cost = _sizes(src_onnx, model, linears, block_size, other_bytes)
    return fixed + sum(c[4] for c in cost.values()), fixed + sum(c[8] for c in cost.values())


@register("auto")
def auto(src: Path, dst: Path, *, max_size: int | str, block_size: int = DEFAULT_BLOCK_SIZE,
         accuracy_level: int = DEFAULT_ACCURACY_LEVEL, calibration_ids: list[int] | None = None,
         other_bytes: int = 0, threads: int | None = None, progress: Progress | None = None) -> dict:
    """4 bits, then 8 bits for the linears measured most sensitive, in that order, while the graph plus
    `other_bytes` (the rest of its bundle) fits max_size (a linear that does not fit is skipped for the next)."""
    say = progress or _quiet
    _validate(block_size, accuracy_level)
    max_size = parse_size(max_size) if isinstance(max_size, str) else int(max_size)
    model, linears = _load_float(src)
    float_size = _float_size(src)
    fixed, cost = _sizes(src, model, linears, block_size, other_bytes)
    smallest = fixed + sum(c[4] for c in cost.values())
    if smallest > max_size:
        what = "bundle" if other_bytes else "graph"
        raise QuantizationError(f"--max-size {format_size(max_size)} is below the smallest this {what} gets, "
                                f"{format_size(smallest)} (every linear at 4 bits); raise it")
    blocks4, sens = _calibrated_int4(model, linears, src, block_size, calibration_ids, threads, say)
    bits = {lin.name: 4 for lin in linears}
    room = max_size - smallest
    for s in sens:  # most sensitive first
        extra = cost[s.name][8] - cost[s.name][4]
        if extra <= room:
            bits[s.name] = 8
            room -= extra
    say("write")
    written = _write(model, dst, {**blocks4, **_eight_bit(linears, bits, block_size, model)}, accuracy_level)
    if written[0] + other_bytes > max_size:  # the estimate of the graph's own bytes was short: fail, not overshoot
        raise QuantizationError(f"the quantized {'bundle' if other_bytes else 'graph'} came out at "
                                f"{written[0] + other_bytes} bytes, over --max-size {max_size}; lower it by a few KB")
    report = _report(linears, bits, written, float_size, block_size, accuracy_level, sens)
    return {**report, "max_size": max_size}
