"""The NPU path for real: the tiny model's static graphs, quantized with the qnn-* recipes, on onnxruntime-qnn's HTP
backend (the x86_64 simulator here) with CPU fallback disabled, against the CPU run of the same quantized graphs.

Tolerances (measured on the tiny model): the HTP's logits stay within 1.2% of the largest CPU logit of each call
(asserted: 5%) and pick the same token everywhere; quantized vs float top-1 agreement is 89% (asserted: 75%) for
qnn-w8a16.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import edge_runtime as ert
from edge_runtime.bundle import Bundle
from edge_runtime.errors import (BundleError, ContextFullError, ExecutionProviderError, InvalidArgumentError,
                                 QuantizationError)
from edge_runtime.providers import QNN_EP, create_ep_session, qnn_status
from edge_runtime.static_decoder import load_static_decoder

_QNN = qnn_status()
pytestmark = pytest.mark.skipif(not _QNN.available, reason=f"QNN EP cannot be registered: {_QNN.reason}")

QNN_RELATIVE_TOLERANCE = 0.05   # |qnn - cpu| <= 5% of the largest |cpu logit| of the call (measured: <= 2.9%)
MIN_TOP1_AGREEMENT_W8 = 0.75    # quantized vs float, teacher-forced (measured: 0.89)
PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and"  # 44 tokens
SHORT = "Paris is the capital of"  # 7 tokens: room for 24 more in the 64-slot context


@pytest.fixture(scope="module")
def w8_bundle(static_bundle, tmp_path_factory):
    from quant.qnn import quantize_static_bundle
    return quantize_static_bundle(static_bundle, tmp_path_factory.mktemp("qnn") / "tiny-w8a16", "qnn-w8a16").path


@pytest.fixture(scope="module")
def w4_bundle(tmp_path_factory):
    """A 3-layer tiny model: qnn-w4a16 keeps the first and last layers int8, so the middle one is int4."""
    from export.pipeline import export_bundle
    from quant.qnn import quantize_static_bundle
    from tiny import save_tiny
    src = save_tiny(tmp_path_factory.mktemp("tiny3") / "tiny3", layers=3)
    static = export_bundle(str(src), tmp_path_factory.mktemp("static3") / "static3", target_ep="qnn", context=64)
    return quantize_static_bundle(static, tmp_path_factory.mktemp("qnn") / "tiny3-w4a16", "qnn-w4a16").path


def _zero_feeds(session) -> dict[str, np.ndarray]:
    types = {"tensor(int32)": np.int32, "tensor(float)": np.float32}
    return {i.name: np.zeros(i.shape, types[i.type]) for i in session.get_inputs()}


def test_cpu_fallback_is_disabled(tiny_bundle):
    """A graph with a node HTP cannot take (the CPU graph's GroupQueryAttention) fails to load instead of
    quietly running that node on the CPU."""
    with pytest.raises(ExecutionProviderError, match="fallback to CPU EP has been explicitly disabled"):
        create_ep_session(tiny_bundle / "model.onnx", "qnn")


@pytest.mark.parametrize("variant", ["ar1.onnx", "ar5.onnx", "ar64.onnx"])
def test_every_node_of_every_variant_runs_on_htp(w8_bundle, variant):
    session = create_ep_session(w8_bundle / variant, "qnn",
                                config={"session.record_ep_graph_assignment_info": "1"})
    assigned = session.get_provider_graph_assignment_info()
    assert {sub.ep_name for sub in assigned} == {QNN_EP}
    # ORT duplicates shared DequantizeLinear nodes before assigning, so HTP holds at least every node of the file
    model = onnx.load(str(w8_bundle / variant), load_external_data=False)
    assert sum(len(sub.get_nodes()) for sub in assigned) >= len(model.graph.node)
    outputs = session.run(None, _zero_feeds(session))
    assert all(np.isfinite(o).all() for o in outputs)


def _calls(decoder, ids):
    """Prefill (AR-64, padded), three AR-1 steps, one AR-5 call, a padded AR-5 call: logits of each."""
    out = [decoder.prefill(ids[:20]).copy()]
    out += [decoder.forward([t]).copy() for t in ids[20:23]]
    out.append(decoder.forward(ids[23:28], keep=5).copy())
    out.append(decoder.forward(ids[28:30], keep=2).copy())
    return out


@pytest.mark.parametrize("which", ["w8", "w4"])
def test_qnn_logits_match_the_cpu_run_of_the_same_quantized_graphs(which, request):
    bundle = Bundle.load(request.getfixturevalue(f"{which}_bundle"))
    qnn = load_static_decoder(bundle, "target", None, ep="qnn")
    cpu = load_static_decoder(bundle, "target", None, ep="cpu")
    ids = ert.Engine(bundle, ep="cpu").encode(PROMPT * 2)[:30]
    for got, want in zip(_calls(qnn, ids), _calls(cpu, ids), strict=True):
        assert np.abs(got - want).max() <= QNN_RELATIVE_TOLERANCE * np.abs(want).max()
        assert (got.argmax(-1) == want.argmax(-1)).all()
    assert qnn.variant_calls == {1: 3, 5: 2, 64: 1}


def test_qnn_variants_agree(w8_bundle):
    """AR-1, AR-5 and AR-64 share every quantization parameter, so verifying k drafts sees what k decode steps would
    (up to float16 rounding in the float parts, which differs between shapes): the same token everywhere."""
    dec = load_static_decoder(Bundle.load(w8_bundle), "target", None, ep="qnn")
    ids = list(range(3, 23))
    dec.prefill(ids[:10])
    one = np.stack([dec.forward([t]).copy()[0] for t in ids[10:15]])
    dec.kv.rewind(5)
    five = dec.forward(ids[10:15], keep=5).copy()
    dec.kv.rewind(15)
    padded = dec.forward(ids[:15], keep=5).copy()
    for got in (one, padded):
        assert np.abs(got - five).max() <= 0.01 * np.abs(five).max()
        assert (got.argmax(-1) == five.argmax(-1)).all()


def test_qnn_greedy_generation_equals_cpu_greedy_of_the_same_graphs(w8_bundle):
    qnn, cpu = ert.Engine.load(w8_bundle, ep="qnn"), ert.Engine.load(w8_bundle, ep="cpu")
    ids = cpu.encode(SHORT)
    assert list(qnn.generate_step(ids, max_tokens=40)) == list(cpu.generate_step(ids, max_tokens=40))


def test_speculation_on_qnn_equals_target_only_greedy(w8_bundle):
    plain = ert.Engine.load(w8_bundle, ep="qnn")
    spec = ert.Engine.load(w8_bundle, ep="qnn", draft="ngram", adaptive=False)  # draft every round, whatever it costs
    ids = plain.encode("the lazy dog. the lazy dog. the lazy")  # 24 tokens the n-gram drafter can match
    assert list(spec.generate_step(ids, max_tokens=32)) == list(plain.generate_step(ids, max_tokens=32))
    assert spec.last_stats.drafted_tokens > 0


def test_heterogeneous_pair_qnn_target_cpu_draft_equals_the_qnn_target_alone(w8_bundle, tiny_bundle):
    """The target on QNN HTP (static graphs, CPU fallback off), the draft on the CPU: the float GQA bundle of the
    same tiny model, by path, on its own EP (the CPU) by default. Greedy tokens equal the QNN target alone's."""
    plain = ert.Engine.load(w8_bundle, ep="qnn")
    pair = ert.Engine.load(w8_bundle, ep="qnn", draft=str(tiny_bundle), draft_max=3, adaptive=False)
    target, draft = pair.decoder, pair.drafter.model.decoder
    assert all(v.session.get_providers()[0] == QNN_EP for v in target._variants)  # CPU EP listed, fallback off
    assert draft.session.get_providers() == ["CPUExecutionProvider"]
    assert draft.kv.capacity == target.kv.capacity == 64  # cut to the target's static C: never written past it
    pair.drafter.threshold = 0.0  # the random tiny model is unsure of everything: draft anyway
    plan = pair.memory_plan  # the plan sizes both caches as allocated
    assert plan.draft.capacity == 64 and plan.kv_bytes == target.kv.nbytes + draft.kv.nbytes
    ids = plain.encode(SHORT)
    assert list(pair.generate_step(ids, max_tokens=10)) == list(plain.generate_step(ids, max_tokens=10))
    assert pair.last_stats.accepted_tokens > 0  # float draft vs its w8a16 target: most drafts are accepted


def test_draft_ep_qnn_runs_a_static_draft_and_refuses_a_dynamic_one(w8_bundle, tiny_bundle):
    engine = ert.Engine.load(w8_bundle, ep="cpu", draft="target", draft_ep="qnn", draft_max=2, adaptive=False)
    assert all(v.session.get_providers()[0] == QNN_EP for v in engine.drafter.model.decoder._variants)
    engine.drafter.threshold = 0.0
    ids = engine.encode(SHORT)
    assert list(engine.generate_step(ids, max_tokens=4)) == list(ert.Engine.load(w8_bundle, ep="cpu").generate_step(
        ids, max_tokens=4))
    with pytest.raises(ExecutionProviderError, match="dynamic-shape graph .* --draft-ep cpu"):
        ert.Engine.load(w8_bundle, ep="qnn", draft=str(tiny_bundle), draft_ep="qnn")
    assert ert.Engine.load(tiny_bundle, draft="ngram", draft_ep="qnn").drafter.name == "ngram"  # runs no model


def test_quantized_graphs_agree_with_the_float_graphs(static_bundle, w8_bundle):
    from tiny import CORPUS
    flt, q = ert.Engine.load(static_bundle, ep="cpu"), ert.Engine.load(w8_bundle, ep="qnn")
    ids = flt.encode(" ".join(CORPUS))[:60]

    def top1(decoder):
        return np.array([decoder.prefill(ids[:1])[0].argmax()] + [decoder.forward([t])[0].argmax() for t in ids[1:]])
    assert (top1(flt.decoder) == top1(q.decoder)).mean() >= MIN_TOP1_AGREEMENT_W8


def _initializer_types(path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return {t.name: t.data_type for t in model.graph.initializer}, model


def test_recipes_produce_the_qdq_they_claim(w8_bundle, w4_bundle):
    T = onnx.TensorProto
    for bundle, recipe, middle in ((w8_bundle, "qnn-w8a16", T.INT8), (w4_bundle, "qnn-w4a16", T.INT4)):
        m = Bundle.load(bundle).manifest
        assert {g.precision for g in m.graphs} == {recipe.removeprefix("qnn-")}
        assert m.source["quantization"]["recipe"] == recipe
        types, model = _initializer_types(bundle / "ar1.onnx")
        last = m.architecture.num_layers - 1
        assert types["model.layers.0.mlp.down_proj.weight_quantized"] == T.INT8
        assert types[f"model.layers.{last}.attn.q_proj.weight_quantized"] == T.INT8
        assert types["model.layers.1.mlp.up_proj.weight_quantized"] == middle
        assert types["model.embed_tokens.weight_quantized"] == T.UINT8          # tied embedding / LM head
        scale = {t.name: t for t in model.graph.initializer}["model.layers.1.mlp.up_proj.weight_scale"]
        assert list(scale.dims) == [m.architecture.intermediate_size]          # per output channel
        embedding = "/model/embed_tokens/Gather/output_0"  # rows of the uint8 matrix
        quantized = {n.input[0]: n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear"}
        assert {types[zp] for name, zp in quantized.items() if name != embedding} == {T.UINT16}  # 16-bit activations
        produced_by = {o: n for n in model.graph.node for o in n.output}
        # what lies between the linears stays float (float16 on HTP): norms, softmax, the attention MatMuls
        assert not any(produced_by[name].op_type in ("ReduceMean", "Sqrt", "Div", "Softmax", "Sigmoid")
                       for name in quantized if name in produced_by)
        softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
        assert produced_by[softmax.input[0]].op_type == "Add"


def test_compiled_context_binaries_load_faster_and_a_tampered_one_is_refused(w8_bundle, tmp_path):
    from edge_runtime.compile import compile_bundle
    bundle = tmp_path / "compiled"
    shutil.copytree(w8_bundle, bundle)
    t0 = time.perf_counter()
    plain = ert.Engine.load(bundle, ep="qnn")
    plain_seconds = time.perf_counter() - t0

    compiled = compile_bundle(bundle, "qnn")
    specs = compiled.manifest.graphs
    assert all(g.ep_context and g.ep_context["ep"] == "qnn" and g.ep_context["binaries"] for g in specs)
    for g in specs:
        for name in (g.ep_context["file"], *g.ep_context["binaries"]):
            assert name in compiled.manifest.files
    t0 = time.perf_counter()
    fast = ert.Engine.load(bundle, ep="qnn")
    compiled_seconds = time.perf_counter() - t0
    print(f"load: {plain_seconds:.2f} s compiling at load, {compiled_seconds:.2f} s from context binaries",
          file=sys.stderr)
    assert compiled_seconds < plain_seconds
    ids = plain.encode(SHORT)
    assert list(fast.generate_step(ids, max_tokens=12)) == list(plain.generate_step(ids, max_tokens=12))

    binary = bundle / specs[0].ep_context["binaries"][0]
    data = bytearray(binary.read_bytes())
    data[len(data) // 2] ^= 0xFF
    binary.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt.*edge-rt compile"):
        ert.Engine.load(bundle, ep="qnn")
    compile_bundle(bundle, "qnn")                        # compiling again repairs it
    assert list(ert.Engine.load(bundle, ep="qnn").generate_step(ids, max_tokens=12)) == \
        list(plain.generate_step(ids, max_tokens=12))


def test_static_context_overflow_on_qnn_raises_context_full(w8_bundle):
    engine = ert.Engine.load(w8_bundle, ep="qnn")
    with pytest.raises(ContextFullError, match="context is full"):
        list(engine.generate_step(list(range(3, 3 + 60)), max_tokens=10))


def test_a_float_static_bundle_runs_on_qnn_in_float16(static_bundle):
    qnn = load_static_decoder(Bundle.load(static_bundle), "target", None, ep="qnn")
    cpu = load_static_decoder(Bundle.load(static_bundle), "target", None, ep="cpu")
    ids = list(range(3, 23))
    got, want = qnn.prefill(ids).copy(), cpu.prefill(ids).copy()
    assert np.abs(got - want).max() <= 0.01 * np.abs(want).max() and got.argmax() == want.argmax()


def test_quantize_refuses_what_it_cannot_do(static_bundle, w8_bundle, tiny_bundle, tmp_path):
    from quant.qnn import quantize_static_bundle
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_static_bundle(w8_bundle, tmp_path / "a", "qnn-w4a16")
    with pytest.raises(QuantizationError, match="--target-ep qnn"):
        quantize_static_bundle(tiny_bundle, tmp_path / "b", "qnn-w8a16")
    with pytest.raises(QuantizationError, match="unknown QNN recipe"):
        quantize_static_bundle(static_bundle, tmp_path / "c", "qnn-w2a4")
    empty, binary = tmp_path / "empty.txt", tmp_path / "blob.bin"
    empty.write_text("  \n")
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(InvalidArgumentError, match="empty"):
        quantize_static_bundle(static_bundle, tmp_path / "d", "qnn-w8a16", calibration=empty)
    with pytest.raises(InvalidArgumentError, match="not UTF-8 text"):
        quantize_static_bundle(static_bundle, tmp_path / "e", "qnn-w8a16", calibration=binary)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left behind


def test_cli_quantize_qnn_prints_the_quality_table(static_bundle, tmp_path):
    """Like the CPU recipes: perplexity, top-1 and KL against the float static bundle, scored on the CPU."""
    from edge_runtime.cli import cli
    result = CliRunner().invoke(cli, ["quantize", str(static_bundle), "--recipe", "qnn-w8a16", "-o",
                                      str(tmp_path / "w8")])
    assert result.exit_code == 0, result.output
    header, _, _, w8 = result.stdout.splitlines()[:4]
    assert "ppl" in header and "top-1" in header and "KL" in header
    cells = w8.split()  # name, precision, size (2 cells), size %, ppl, ppl +%, top-1, KL, tok/s, speed
    assert cells[:2] == ["w8", "w8a16"] and float(cells[-4].rstrip("%")) >= 100 * MIN_TOP1_AGREEMENT_W8
    assert "on the CPU" in result.stderr


def test_cli_generate_on_qnn_and_info(w8_bundle, tiny_bundle):
    from edge_runtime.cli import cli
    runner = CliRunner()
    engine = ert.Engine.load(w8_bundle, ep="qnn")
    want = engine.generate("Paris is", max_tokens=8)
    result = runner.invoke(cli, ["generate", str(w8_bundle), "-p", "Paris is", "--ep", "qnn", "--max-tokens", "8",
                                 "--temperature", "0", "--ep-option", "htp_performance_mode=burst"])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == want
    # the edge-rt program itself: one process-wide thread pool for the QNN target and its CPU draft, weights on
    # huge pages; greedy speculation gives the target's own answer
    done = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "generate", str(w8_bundle), "-p", "Paris is",
                           "--ep", "qnn", "--max-tokens", "8", "--temperature", "0", "--draft", str(tiny_bundle)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == want
    bad = runner.invoke(cli, ["generate", str(w8_bundle), "-p", "hi", "--ep", "qnn", "--ep-option", "burst"])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "KEY=VALUE" in bad.output
    pair = runner.invoke(cli, ["generate", str(w8_bundle), "-p", "hi", "--ep", "qnn", "--draft", str(tiny_bundle),
                               "--draft-ep", "qnn"])  # a dynamic-shape CPU draft cannot run on the NPU
    assert pair.exit_code == 1 and pair.output.count("\n") == 1 and pair.output.startswith("Error: draft ")
    assert "--draft-ep cpu" in pair.output
    info = runner.invoke(cli, ["info"])
    assert "QNN: available" in info.output and "HTP backend" in info.output
