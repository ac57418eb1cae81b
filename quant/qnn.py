"""QNN recipes: static QDQ quantization of the static (NPU) graphs, in the form the QNN HTP backend takes.

    qnn-w8a16   activations uint16, every linear's weights int8 (symmetric, per output channel)
    qnn-w4a16   activations uint16, linear weights int4 per output channel; the first and the last decoder layer
                keep int8 (mixed per layer: the layers most often found sensitive); `bits` overrides any linear

What is quantized: the linear layers (uint16 activations in and out, 4/8-bit weights) and the table lookups
(embedding, rotary cos/sin: HTP takes no float Gather).
What runs between them - RMSNorm, residual adds, rotary, SiLU, the attention core (Q.K, mask, Softmax, probs.V) -
stays float (float16 on a device's HTP, v73 and newer; the x86_64 simulator computes it in float32). Measured on
the simulator, with those quantized too: HTP multiplies two 16-bit tensors at about 8-bit precision (the tiny
model's logits 5% of their range off an exact QDQ run), and on SmolLM2-135M the 16-bit norms and adds drifted ~1%
per layer over an outlier-heavy residual stream (|x| ~ 800), enough to derail greedy decoding after two tokens.
The tied embedding / LM head matrix is uint8 per tensor: one matrix read by the embedding Gather and the LM head
Gemm, and QNN's FullyConnected takes per-tensor 8-bit weights (it refuses 16-bit ones).

Calibration (MinMax) runs the float AR-N graph over calibration text with a real KV cache (the runtime's own
StaticDecoder on the CPU), recording each call's inputs. The ranges are computed once and cached; every variant
(AR-1, AR-k, AR-N) is quantized from the same cache, so a tensor has the same scale in all of them and
verification (AR-k) sees exactly the numbers decoding (AR-1) sees. Built on onnxruntime.quantization's QNN helpers
(`get_qnn_qdq_config`, `quantize_static`).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from edge_runtime.bundle import Bundle, publish, sha256_file
from edge_runtime.errors import QuantizationError
from edge_runtime.manifest import Architecture, GraphSpec, Manifest

from .calibration import load_text

CALIBRATION_TOKENS = 512      # at most this many calibration tokens (fewer if the context is shorter)
QUANTIZED_OPS = ["MatMul", "Gemm", "Gather"]
# ... but not these: the attention core's MatMuls (two activations) stay float
FLOAT_NODES = ("/attn/scores/MatMul", "/attn/context/MatMul")
ROTARY_TABLES = ("rotary_cos", "rotary_sin")  # looked up 16-bit (HTP takes no float Gather)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class QnnRecipe:
    name: str
    weight_bits: int                     # linear weights: 8 or 4 (per output channel, symmetric)
    int8_edge_layers: bool = False       # keep the first and last decoder layers at 8 bits
    bits: dict[str, int] = field(default_factory=dict)  # per linear ("layers.3.mlp.down_proj") overrides

    @property
    def precision(self) -> str:
        return f"w{self.weight_bits}a16"


RECIPES = {
    "qnn-w8a16": QnnRecipe("qnn-w8a16", weight_bits=8),
    "qnn-w4a16": QnnRecipe("qnn-w4a16", weight_bits=4, int8_edge_layers=True),
}


def get_recipe(name: str | QnnRecipe) -> QnnRecipe:
    if isinstance(name, QnnRecipe):
        return name
    if name not in RECIPES:
        raise QuantizationError(f"unknown QNN recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


# ---- calibration ------------------------------------------------------------------------------------------------

def _graph_shapes(session) -> tuple[int, int, int, int, int, int, int]:
    """(n, L, C, layers, kv_heads, head_dim, vocab) read off a static graph's inputs and outputs."""
    ins = {i.name: i.shape for i in session.get_inputs()}
    outs = {o.name: o.shape for o in session.get_outputs()}
    _, kvh, hd, C = ins["past_key.0"]
    layers = sum(1 for name in ins if name.startswith("past_key."))
    return ins["input_ids"][1], outs["logits"][1], C, layers, kvh, hd, outs["logits"][2]


class _StaticFeeds:
    """A CalibrationDataReader: runs the float graph on the CPU through a StaticDecoder over the calibration ids,
    handing out each call's inputs (ids, positions, mask, the real KV cache) just before the call."""

    def __init__(self, graph: Path, ids: Sequence[int]):
        import onnxruntime as ort

        from edge_runtime.session import session_options
        from edge_runtime.static_decoder import StaticDecoder
        session = ort.InferenceSession(str(graph), sess_options=session_options(), providers=["CPUExecutionProvider"])
        n, L, C, layers, kvh, hd, vocab = _graph_shapes(session)
        arch = Architecture(family="llama", num_layers=layers, num_heads=kvh, num_kv_heads=kvh, head_dim=hd,
                            hidden_size=kvh * hd, intermediate_size=0, vocab_size=vocab, max_position_embeddings=C)
        self.decoder = StaticDecoder({n: (_Recorder(session, self), L)}, arch, layers, C)
        self.chunks = [list(ids[i:i + n]) for i in range(0, len(ids), n)]
        self.feed: dict[str, np.ndarray] | None = None
        self.budget = -1  # calls left in this stride (-1: no limit)

    def capture(self) -> None:
        """Called by the recorder right before a run: copy what the graph is about to read."""
        (v,) = self.decoder._variants
        kv = self.decoder.kv
        self.feed = {"input_ids": v.ids.copy(), "position_ids": v.positions.copy(), "attention_mask": v.mask.copy()}
        for i in range(self.decoder.num_layers):
            self.feed[f"past_key.{i}"] = kv.keys(i).copy()
            self.feed[f"past_value.{i}"] = kv.values(i).copy()

    def set_range(self, start_index: int, end_index: int) -> None:
        """Strided calibration asks for the next end - start calls (always in order)."""
        self.budget = end_index - start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if not self.chunks or self.budget == 0:
            return None
        self.budget -= 1
        chunk = self.chunks.pop(0)
        if len(chunk) > self.decoder.kv.free:
            self.decoder.kv.rewind(self.decoder.kv.pos)  # the context is full: start over
        self.decoder.forward(chunk)
        return self.feed

    def __len__(self) -> int:
        return len(self.chunks)


class _Recorder:
    """Session stand-in that lets _StaticFeeds copy the bound inputs before each run."""

    def __init__(self, session, feeds: _StaticFeeds):
        self.session, self.feeds = session, feeds

    def io_binding(self):
        return self.session.io_binding()

    def get_inputs(self):
        return self.session.get_inputs()

    def run_with_iobinding(self, binding) -> None:
        self.feeds.capture()
        self.session.run_with_iobinding(binding)


# ---- one graph --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Linear:
    name: str            # layers.3.mlp.down_proj, lm_head (the names the CPU recipes use too)
    weight: str          # its initializer
    transposed: bool     # Gemm(transB=1): the LM head, stored [V, H]


def _linears(model: onnx.ModelProto) -> list[_Linear]:
    """The static graph's linear layers: MatMuls with an initializer weight, and the Gemm LM head."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            name = node.name.strip("/").rsplit("/", 1)[0].removeprefix("model.")
            out.append(_Linear(name, node.input[1], node.op_type == "Gemm"))
    return out


def linear_bits(model: onnx.ModelProto, recipe: QnnRecipe) -> dict[str, int]:
    """Weight bits of every linear of the graph (the LM head: always 8)."""
    linears = _linears(model)
    layers = sorted({int(lin.name.split(".")[1]) for lin in linears if lin.name.startswith("layers.")})
    edges = {f"layers.{layers[0]}.", f"layers.{layers[-1]}."} if layers and recipe.int8_edge_layers else set()
    bits = {}
    for lin in linears:
        b = 8 if lin.name == "lm_head" or any(lin.name.startswith(e) for e in edges) else recipe.weight_bits
        bits[lin.name] = recipe.bits.get(lin.name, b) if lin.name != "lm_head" else 8
        if bits[lin.name] not in (4, 8):
            raise QuantizationError(f"{lin.name}: {bits[lin.name]} bits asked; QNN recipes take 4 or 8")
    return bits


def _overrides(model: onnx.ModelProto, bits: dict[str, int]) -> dict[str, list[dict]]:
    from onnxruntime.quantization import QuantType

    overrides: dict[str, list[dict]] = {}
    for lin in _linears(model):
        if lin.transposed:  # the LM head (and the tied embedding): per tensor, 8 bits (see the module docstring)
            overrides[lin.weight] = [{"quant_type": QuantType.QUInt8}]
        else:
            qtype = QuantType.QInt8 if bits[lin.name] == 8 else QuantType.QInt4
            overrides[lin.weight] = [{"quant_type": qtype, "symmetric": True, "axis": 1}]
    inits = {t.name for t in model.graph.initializer}
    for name in ROTARY_TABLES:
        if name in inits:
            overrides[name] = [{"quant_type": QuantType.QUInt16}]
    return overrides


def quantize_qnn(src_onnx: str | Path, dst_onnx: str | Path, recipe: str | QnnRecipe,
                 calibration_ids: Sequence[int] | None = None, calibration_cache: str | Path | None = None) -> dict:
    """Quantize one static graph to QDQ for QNN HTP. Returns {linear: weight bits}.

    Ranges come from `calibration_cache` when that file exists (written by an earlier call), otherwise from running
    this graph (float) over `calibration_ids`, and are then saved to `calibration_cache` if given.
    `dst_onnx` gets its weights in `<dst_onnx>.data`.
    """
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    recipe = get_recipe(recipe)
    src, dst = Path(src_onnx), Path(dst_onnx)
    cached = calibration_cache is not None and Path(calibration_cache).is_file()
    if not cached and not calibration_ids:
        raise QuantizationError("calibration needs some token ids (or an existing calibration cache)")
    model = onnx.load(str(src), load_external_data=False)
    bits = linear_bits(model, recipe)
    reader = None if cached else _StaticFeeds(src, calibration_ids)
    exclude = [n.name for n in model.graph.node if n.name.endswith(FLOAT_NODES)]
    config = get_qnn_qdq_config(model, reader, activation_type=QuantType.QUInt16, weight_type=QuantType.QUInt8,
                                init_overrides=_overrides(model, bits), op_types_to_quantize=QUANTIZED_OPS,
                                nodes_to_exclude=exclude)
    # one call per stride: ranges are merged after each call and its intermediate tensors dropped
    extra = {**config.extra_options, "CalibStridedMinMax": 1}
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the tool warns about pre-processing we do not need
    try:
        quantize_static(str(src), str(dst), reader, quant_format=config.quant_format,
                        op_types_to_quantize=config.op_types_to_quantize, nodes_to_exclude=config.nodes_to_exclude,
                        per_channel=config.per_channel, activation_type=config.activation_type,
                        weight_type=config.weight_type, use_external_data_format=True,
                        calibrate_method=config.calibrate_method, extra_options=extra,
                        calibration_cache_path=str(calibration_cache) if calibration_cache else None)
    finally:
        logging.getLogger().setLevel(quiet)
    return bits


def _compiled_files(spec: GraphSpec) -> list[str]:
    c = spec.ep_context or {}
    return [c["file"], *c.get("binaries", ())] if c else []


# ---- a bundle ---------------------------------------------------------------------------------------------------

def quantize_static_bundle(bundle: str | Path | Bundle, out: str | Path, recipe: str | QnnRecipe,
                           calibration: str | Path | None = None, force: bool = False,
                           progress: Progress | None = None) -> Bundle:
    """Quantize every static graph of a bundle (exported with --target-ep qnn) into a new bundle `out`."""
    from export.static_builder import save_variants
    from export.static_export import STATIC_DATA

    from edge_runtime.static_decoder import static_specs
    from edge_runtime.tokenizer import load_tokenizer

    say = progress or (lambda _msg: None)
    recipe = get_recipe(recipe)
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    m, out = bundle.manifest, Path(out)
    if out.exists() and not force:
        raise QuantizationError(f"{out} already exists; pass --force to replace it or choose another -o")
    if out.resolve() == bundle.path.resolve():
        raise QuantizationError("the output folder is the input bundle; choose another -o")
    specs = static_specs(m, "target")
    if not specs or any(g.kind != "static" for g in m.graphs):
        raise QuantizationError(f"{recipe.name} quantizes static graphs; export the model with "
                                "`edge-rt export ... --target-ep qnn` first")
    if any(g.precision != "fp32" for g in m.graphs):
        raise QuantizationError(f"bundle {bundle.path} is already quantized ({specs[0].precision}); "
                                "quantize the float bundle")
    text = load_text(calibration)
    C = specs[0].static_shapes["context"]
    ids = load_tokenizer(bundle.file(m.tokenizer)).encode(text, add_special_tokens=False).ids
    ids = ids[:CALIBRATION_TOKENS]  # past the context, calibration starts over
    if len(ids) < 2:
        raise QuantizationError("the calibration text has fewer than 2 tokens; pass a longer text")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with tempfile.TemporaryDirectory(prefix="edge-rt-qnn-") as work:
            work = Path(work)
            cache = work / "calibration.json"
            models, bits = {}, {}
            # the largest variant calibrates (most positions per call); the others reuse its ranges
            for spec in sorted(specs, key=lambda g: -g.static_shapes["tokens"]):
                say(f"quantize {spec.file}" if cache.exists() else f"calibrate and quantize {spec.file}")
                dst = work / spec.file
                bits = quantize_qnn(bundle.file(spec.file), dst, recipe, ids, cache)
                models[Path(spec.file).stem] = onnx.load(str(dst))
            say("write graphs")
            written = save_variants(dict(sorted(models.items())), tmp, STATIC_DATA)
            del models
        graph_files = {f for g in m.graphs for f in (g.file, *g.data_files, *_compiled_files(g))}
        for name in set(m.files) - graph_files:  # tokenizer files and whatever else the bundle carries
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle.file(name), tmp / name)
        files = {name: sha256_file(tmp / name) for name in sorted(set(written) | set(m.files) - graph_files)}
        graphs = tuple(replace(g, precision=recipe.precision, data_files=(STATIC_DATA,), ep_context=None)
                       for g in m.graphs)
        source = {**m.source, "quantization": {"recipe": recipe.name, "calibration_tokens": len(ids),
                                               "calibration": str(calibration or "shipped corpus"),
                                               "weight_bits": bits}}
        Manifest(**{**m.__dict__, "graphs": graphs, "files": files, "source": source}).write(tmp)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bundle.load(out)
