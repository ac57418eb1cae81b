"""Static-shape (NPU) graphs on the CPU: the float static graphs against the float GQA graph, the runtime's variant
choice, padding and masking, rewinding, context overflow, and what the bundle records."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import edge_runtime as ert
from edge_runtime.bundle import Bundle
from edge_runtime.errors import BundleError, ContextFullError, ExecutionProviderError, InvalidArgumentError
from edge_runtime.manifest import Manifest

CONTEXT = 64  # conftest's static_bundle
PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


def test_static_bundle_records_variants_and_shares_one_weights_file(static_bundle):
    m = Bundle.load(static_bundle).manifest
    shapes = [g.static_shapes for g in m.graphs]
    assert [s["tokens"] for s in shapes] == [1, 5, 64]
    assert [s["logits"] for s in shapes] == [1, 5, 5]
    assert {s["context"] for s in shapes} == {CONTEXT}
    assert {g.kind for g in m.graphs} == {"static"} and {g.execution_provider for g in m.graphs} == {"qnn"}
    assert {g.data_files for g in m.graphs} == {("static.onnx.data",)}
    assert m.defaults.context == CONTEXT == m.architecture.max_position_embeddings
    assert m.source["verify_max_abs_error"] <= m.source["verify_tolerance"]
    # every weight is stored once: the data file is no bigger than one variant's weights
    model = onnx.load(str(static_bundle / "ar1.onnx"), load_external_data=False)
    external = sum(int(dict((e.key, e.value) for e in t.external_data)["length"]) for t in model.graph.initializer
                   if t.data_location == onnx.TensorProto.EXTERNAL)
    assert (static_bundle / "static.onnx.data").stat().st_size < 1.1 * external + 3 * 4096


def test_static_graphs_use_standard_onnx_operators_only(static_bundle):
    for name in ("ar1.onnx", "ar5.onnx", "ar64.onnx"):
        model = onnx.load(str(static_bundle / name), load_external_data=False)
        assert {n.domain for n in model.graph.node} <= {""}, "contrib operators cannot run on QNN HTP"
        assert {o.domain for o in model.opset_import} == {""}
        for value in [*model.graph.input, *model.graph.output]:
            dims = value.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), f"{name}: {value.name} has a dynamic dimension"


def test_old_manifest_without_static_fields_still_loads(tiny_bundle):
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    for graph in data["graphs"]:
        graph.pop("static_shapes", None)
        graph.pop("ep_context", None)
    engine = ert.Engine(Bundle(tiny_bundle, Manifest.from_dict(data)))
    assert engine.manifest.graphs[0].ep_context is None and engine.manifest.graphs[0].static_shapes is None


def _logits_per_position(decoder, ids):
    """Prefill the first 9 ids in one call, then one id per call: logits of positions 8.. ."""
    out = [decoder.prefill(ids[:9]).copy()]
    out += [decoder.forward([t]).copy() for t in ids[9:]]
    return np.concatenate(out)


def test_float_static_graphs_match_the_float_gqa_graph(static_bundle, tiny_bundle):
    static = ert.Engine.load(static_bundle, ep="cpu")
    gqa = ert.Engine.load(tiny_bundle, context=CONTEXT)
    ids = static.encode(PROMPT)[:30]
    a = _logits_per_position(static.decoder, ids)
    b = _logits_per_position(gqa.decoder, ids)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    static.reset(), gqa.reset()
    assert list(static.generate_step(ids[:12], max_tokens=40)) == list(gqa.generate_step(ids[:12], max_tokens=40))


def test_every_variant_gives_the_same_logits_and_rewind_is_a_pointer_move(static_bundle):
    dec = ert.Engine.load(static_bundle, ep="cpu").decoder
    ids = list(range(3, 23))
    dec.prefill(ids[:10])
    one = np.stack([dec.forward([t]).copy()[0] for t in ids[10:15]])   # AR-1 x 5
    dec.kv.rewind(5)
    assert dec.kv.pos == 10
    five = dec.forward(ids[10:15], keep=5).copy()                      # AR-5
    dec.kv.rewind(15)
    padded = dec.forward(ids[:15], keep=5).copy()                      # AR-64, 49 pad positions masked
    dec.kv.rewind(15)
    short = dec.forward(ids[:3], keep=3).copy()                        # AR-5 left-padded by 2
    assert np.abs(one - five).max() < 1e-4 and np.abs(padded - five).max() < 1e-4
    dec.kv.rewind(3)
    ref = np.stack([dec.forward([t]).copy()[0] for t in ids[:3]])
    assert np.abs(short - ref).max() < 1e-4
    assert dec.variant_calls == {1: 8, 5: 2, 64: 2}


def test_forward_arguments_are_checked(static_bundle):
    dec = ert.Engine.load(static_bundle, ep="cpu").decoder
    assert (dec.max_chunk, dec.max_logits) == (64, 5)
    with pytest.raises(ValueError, match="1..64"):
        dec.forward(list(range(65)))
    with pytest.raises(ValueError, match="keep"):
        dec.forward([1, 2, 3], keep=4)


def test_static_context_overflow_raises_context_full(static_bundle):
    engine = ert.Engine.load(static_bundle, ep="cpu")
    dec = engine.decoder
    dec.prefill(list(range(3, 3 + CONTEXT - 1)))
    dec.forward([5])                          # the last slot
    with pytest.raises(ContextFullError, match="context is full"):
        dec.forward([5])
    engine.reset()
    with pytest.raises(ContextFullError):     # generation past the context: the API raises, the chat trims
        list(engine.generate_step(list(range(3, 3 + CONTEXT - 4)), max_tokens=10))


def test_context_larger_than_the_static_graphs_is_refused(static_bundle):
    with pytest.raises(InvalidArgumentError, match="1..64"):
        ert.Engine.load(static_bundle, ep="cpu", context=CONTEXT + 1)
    small = ert.Engine.load(static_bundle, ep="cpu", context=16)
    assert small.context == 16


def test_qnn_ep_on_a_dynamic_bundle_is_a_clear_error(tiny_bundle):
    with pytest.raises(ExecutionProviderError, match="--target-ep qnn"):
        ert.Engine.load(tiny_bundle, ep="qnn")
    with pytest.raises(InvalidArgumentError, match="unknown execution provider"):
        ert.Engine.load(tiny_bundle, ep="gpu")


def test_static_manifest_without_shapes_is_refused(static_bundle, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(static_bundle, bad)
    data = json.loads((bad / "manifest.json").read_text())
    data["graphs"][1]["static_shapes"] = None
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="static_shapes"):
        ert.Engine.load(bad, ep="cpu")


def test_eval_scores_a_text_longer_than_the_static_context(static_bundle, tiny_bundle):
    """quant.eval.compare() over windows of C = 64 in chunks of 5 (the AR-5 logits): 64 is no multiple of 5, and
    a full window must not feed its last token (only a target), or it would run past the cache. Scores match the
    float GQA graph's over the same windows."""
    from quant.eval import compare
    static = ert.Engine(Bundle.load(static_bundle), ep="cpu")
    gqa = ert.Engine(Bundle.load(tiny_bundle), context=CONTEXT)
    ids = static.encode(PROMPT * 8)[:150]  # two full windows and a part
    nll, kl, agree, positions = compare([static, gqa], ids)
    assert positions == len(ids) - 1
    assert agree == positions and kl < 1e-3 * positions and abs(nll[0] - nll[1]) < 1e-3 * nll[1]
