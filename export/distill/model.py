"""The draft: an EAGLE head (eagle.py) on the target's features, with a reduced-vocabulary LM head, in PyTorch for
training, then exported into a draft bundle the runtime's `--draft PATH` loads (graph kind "eagle").

    vocab_map = choose_vocab(data, recipe.vocab, target)      # [N] target ids, one per head row
    model = build_draft(target, layer, vocab_map)             # weights copied from the target bundle's graph
    export_draft(model, vocab_map, target, out, info, probe)  # verified bundle with vocab_map.npy

The draft reads target ids through a frozen copy of the target's embedding, stored as INT8 with one scale per row
(a quarter of the bytes; a Gather reads only the rows of the tokens it is given, so it costs nothing per step), and
writes logits over N rows: row i is target id vocab_map[i] (the target's own head rows, frozen). Why EAGLE: a draft
cut from the target's first layer reached 0.17 held-out acceptance after 26 minutes of training on SmolLM2; the
target's last hidden state already holds most of what predicts the next token.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from edge_runtime.bundle import Bundle, sha256_file
from edge_runtime.errors import DraftTrainingError
from edge_runtime.manifest import FORMAT_VERSION, Architecture, GraphSpec, Manifest

from .dataset import DistillSet

GRAPH, GRAPH_DATA, VOCAB_MAP = "model.onnx", "model.onnx.data", "vocab_map.npy"


# ---- the target's weights, read from its bundle ------------------------------------------------------------------
def read_initializers(bundle: Bundle, names: list[str]) -> dict[str, np.ndarray]:
    """Named float32 initializers of the bundle's target graph, reading only their bytes from the external data."""
    import onnx
    from onnx import numpy_helper
    spec = bundle.manifest.graph("target")
    graph = onnx.load(str(bundle.file(spec.file)), load_external_data=False).graph
    found = {t.name: t for t in graph.initializer if t.name in names}
    missing = [n for n in names if n not in found]
    if missing:
        raise DraftTrainingError(f"the target graph of {bundle.path} has no float32 weight {missing[0]!r} "
                                 f"(precision {spec.precision}); train a draft from the float32 bundle")
    out = {}
    for name, t in found.items():
        if t.data_type != onnx.TensorProto.FLOAT:
            raise DraftTrainingError(f"{name} in {bundle.path} is not float32; train a draft from the float32 bundle")
        ext = {e.key: e.value for e in t.external_data}
        if ext:
            count = int(np.prod(t.dims))
            with open(bundle.file(ext["location"]), "rb") as f:
                f.seek(int(ext.get("offset", 0)))
                out[name] = np.fromfile(f, np.float32, count).reshape(tuple(t.dims))
        else:
            out[name] = numpy_helper.to_array(t)
    return out


def _layer_names(i: int) -> list[str]:
    p = f"model.layers.{i}"
    return [f"{p}.input_layernorm.weight", f"{p}.attn.qkv_proj.weight", f"{p}.attn.o_proj.weight",
            f"{p}.post_attention_layernorm.weight", f"{p}.mlp.gate_up_proj.weight", f"{p}.mlp.down_proj.weight"]


def check_target(bundle: Bundle, layer: int) -> None:
    """Fail before minutes of generation if the draft cannot be built from this target."""
    import onnx
    arch = bundle.manifest.architecture
    if arch.family not in ("llama", "mistral"):
        raise DraftTrainingError(f"train-draft builds drafts for Llama-family targets without biases; "
                                 f"{bundle.path} is {arch.family}")
    spec = bundle.manifest.graph("target")
    graph = onnx.load(str(bundle.file(spec.file)), load_external_data=False).graph
    if "hidden_states" not in [o.name for o in graph.output]:
        raise DraftTrainingError(f"the target graph of {bundle.path} has no hidden_states output, which the EAGLE "
                                 "draft learns from; re-export it with this edge-runtime (`edge-rt export MODEL --force`)")
    fused = _layer_names(layer)[4]
    if fused not in {t.name for t in graph.initializer} and any(t.name.endswith(".mlp.up_proj.weight")
                                                                  for t in graph.initializer):
        raise DraftTrainingError(f"the target graph of {bundle.path} predates the fused {fused!r}; re-export it "
                                 "with this edge-runtime (`edge-rt export MODEL --force`)")
    read_initializers(bundle, [_layer_names(layer)[0]])  # float32 weights with the names we read


# ---- the vocabulary of the draft ---------------------------------------------------------------------------------
PRIOR = 0.1  # expected occurrences credited to token id 0, decaying as 1 / (1 + id / 1000)


def choose_vocab(data: DistillSet, size: int, vocab_size: int, always: tuple[int, ...] = ()) -> np.ndarray:
    """The `size` target ids the draft can propose: `always` (end-of-sequence), then by expected count on the
    training answers (probability mass in the kept top-k) plus a small prior that favours low ids (BPE merge order
    roughly follows frequency), so a token seen once at 1e-4 does not outrank a common one the set lacks. On
    SmolLM2 (32 training answers) 8192 rows cover 90.7% of held-out answer tokens (90.0% without the prior),
    16384 rows 95.0%. Held-out answers are not looked at. Sorted ascending."""
    size = min(size, vocab_size)
    score = PRIOR / (1.0 + np.arange(vocab_size) / 1000.0)
    for ids, logp, held in zip(data.top_ids, data.top_logp, data.heldout):
        if not held:
            np.add.at(score, ids.ravel(), np.exp(logp.astype(np.float64)).ravel())
    score[list(always)] = np.inf
    return np.sort(np.argsort(-score, kind="stable")[:size]).astype(np.int64)


# ---- the PyTorch draft -------------------------------------------------------------------------------------------
EMBED = "model.embed_tokens.weight"


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 per row: w ~ q * scale[:, None]."""
    scale = np.maximum(np.abs(w).max(1), 1e-12) / 127.0
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def build_draft(target: Bundle, layer: int, vocab_map: np.ndarray):
    """The EAGLE draft initialised from the target: its layer from target layer `layer`, the final norm, the
    embedding (INT8-rounded, as exported) and head rows = the target's head rows of vocab_map (both frozen)."""
    import torch

    from .eagle import EagleDraft
    arch = target.manifest.architecture
    names = [EMBED, "model.norm.weight", "cos_cache", "sin_cache", *_layer_names(layer)]
    w = read_initializers(target, names + ([] if arch.tie_word_embeddings else ["lm_head.weight"]))
    codes, scale = quantize_rows(w[EMBED])
    torch.manual_seed(0)
    model = EagleDraft(arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.intermediate_size,
                       arch.rms_norm_eps, codes * scale[:, None], w.get("lm_head.weight", w[EMBED])[vocab_map],
                       w["cos_cache"], w["sin_cache"])
    q, kv, H = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, arch.hidden_size

    def put(param, array: np.ndarray) -> None:
        with torch.no_grad():
            param.copy_(torch.tensor(np.asarray(array, np.float32)))

    norm1, qkv, o, norm2, gate_up, down = (w[n] for n in _layer_names(layer))
    gate, up = np.split(gate_up, 2, axis=1)  # [H, 2I]: gate's columns, then up's
    # fc starts as [I, 0]: the draft begins as the target's layer on the token alone (a cut-layer draft, SmolLM2
    # held-out first-draft agreement 0.08; from the last layer with [I, I]: 0.00) and learns to read the feature
    put(model.fc.weight, np.concatenate([np.eye(H), np.zeros((H, H))], 1))  # Linear: [out, in]
    put(model.fc.bias, np.zeros(H))
    put(model.input_norm, norm1)
    put(model.q.weight, qkv[:, :q].T)          # the graph stores [in, out]; Linear is [out, in]
    put(model.k.weight, qkv[:, q:q + kv].T)
    put(model.v.weight, qkv[:, q + kv:].T)
    put(model.o.weight, o.T)
    put(model.post_norm, norm2)
    put(model.gate.weight, gate.T)
    put(model.up.weight, up.T)
    put(model.down.weight, down.T)
    put(model.norm, w["model.norm.weight"])
    return model.float().train()


def trained_state(model) -> dict:
    """What a checkpoint keeps: the trained tensors (the embedding, head and rotary tables are the target's)."""
    return model.state_dict()


# ---- the draft bundle --------------------------------------------------------------------------------------------
def _int8_embedding(graph_model, embed: np.ndarray) -> None:
    """Store the embedding Gather's table as INT8 codes + per-row scales: Gather(codes) -> Cast -> Mul(Gather(scales))."""
    from onnx import TensorProto, helper, numpy_helper
    g = graph_model.graph
    codes, scale = quantize_rows(embed)
    at = next(i for i, t in enumerate(g.initializer) if t.name == EMBED)
    g.initializer[at].CopyFrom(numpy_helper.from_array(codes, f"{EMBED}.int8"))
    g.initializer.append(numpy_helper.from_array(scale[:, None], f"{EMBED}.scale"))  # [V, 1]
    k = next(i for i, n in enumerate(g.node) if n.op_type == "Gather" and n.input[0] == EMBED)
    gather = g.node[k]
    out = gather.output[0]
    gather.input[0], gather.output[0] = f"{EMBED}.int8", f"{out}/int8"
    p = "/model/embed_tokens"
    new = [helper.make_node("Cast", [f"{out}/int8"], [f"{out}/float"], name=f"{p}/Cast", to=TensorProto.FLOAT),
           helper.make_node("Gather", [f"{EMBED}.scale", gather.input[1]], [f"{out}/scale"], name=f"{p}/scale/Gather"),
           helper.make_node("Mul", [f"{out}/float", f"{out}/scale"], [out], name=f"{p}/Mul")]
    for j, node in enumerate(new):
        g.node.insert(k + 1 + j, node)


def _eagle_weights(model, vocab_map: np.ndarray):
    from .. import builder

    def np_(t) -> np.ndarray:
        return t.detach().float().numpy()

    m = model
    layer = builder.LayerWeights(
        input_norm=np_(m.input_norm), qkv=np.concatenate([np_(m.q.weight).T, np_(m.k.weight).T, np_(m.v.weight).T], 1),
        o=np_(m.o.weight).T, post_norm=np_(m.post_norm), gate=np_(m.gate.weight).T, up=np_(m.up.weight).T,
        down=np_(m.down.weight).T)
    return builder.EagleWeights(embed=np_(m.embed), fc=np_(m.fc.weight).T, fc_bias=np_(m.fc.bias), layer=layer,
                                final_norm=np_(m.norm), head=np_(m.head), cos=np_(m.cos), sin=np_(m.sin))


def _verify(bundle: Bundle, model, ids: list[int], feats: np.ndarray) -> tuple[float, float]:
    """Max abs error of the graph's last-position logits against the PyTorch draft's, for `ids` (token t+1) and
    features [n, H]; and the tolerance."""
    import onnxruntime as ort
    import torch

    from export.verify import FP32_RELATIVE_TOLERANCE
    with torch.no_grad():
        f = model.unroll(torch.tensor([ids]), torch.tensor(feats[None], dtype=torch.float32), 1)[0]
        ref = model.logits(f)[0, -1].numpy()
    a = bundle.manifest.architecture
    sess = ort.InferenceSession(str(bundle.file(GRAPH)), providers=["CPUExecutionProvider"])
    n = len(ids)
    kv = np.zeros((1, a.num_kv_heads, n, a.head_dim), np.float32)
    got = sess.run(["logits"], {"input_ids": np.asarray([ids], np.int64), "features": feats[None].astype(np.float32),
                                "seqlens_k": np.array([n - 1], np.int32), "total_sequence_length": np.array(n, np.int32),
                                "past_key.0": kv, "past_value.0": kv})[0][0, -1]
    return float(np.abs(got - ref).max()), FP32_RELATIVE_TOLERANCE * max(1.0, float(np.abs(ref).max()))


def export_draft(model, vocab_map: np.ndarray, target: Bundle, out: Path, info: dict, probe: list[int],
                 probe_features: np.ndarray) -> Bundle:
    """Write a draft bundle to a temp folder next to `out`, check its logits against the PyTorch draft on the
    target ids `probe` (token t+1 at position t) with features [len(probe), H], then rename it into place."""
    from .. import builder
    tm = target.manifest
    arch = Architecture(**{**tm.architecture.__dict__, "num_layers": 1, "vocab_size": len(vocab_map),
                           "tie_word_embeddings": False})  # vocab_size: logit rows
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model.eval()
        weights = _eagle_weights(model, vocab_map)
        graph = builder.build_eagle(arch, weights)
        _int8_embedding(graph, weights.embed)
        builder.save_model(graph, tmp / GRAPH, GRAPH_DATA)
        tok_files = [tm.tokenizer] + [f for f in ("tokenizer_config.json",) if f in tm.files]
        for name in tok_files:
            shutil.copyfile(target.file(name), tmp / name)
        np.save(tmp / VOCAB_MAP, vocab_map.astype(np.int64), allow_pickle=False)
        files = {name: sha256_file(tmp / name) for name in (GRAPH, GRAPH_DATA, VOCAB_MAP, *tok_files)}
        manifest = Manifest(
            format_version=FORMAT_VERSION, name=f"{tm.name}-draft", architecture=arch, tokens=tm.tokens,
            graphs=(GraphSpec(role="target", file=GRAPH, data_files=(GRAPH_DATA,), kind="eagle", num_layers=1,
                              precision="fp32, int8 embedding"),),
            tokenizer=tm.tokenizer, chat_template=tm.chat_template, files=files, defaults=tm.defaults,
            source={"draft_of": tm.name, "target_graph_sha256": tm.files.get(tm.graph("target").file), **info},
            vocab_map=VOCAB_MAP)
        manifest.write(tmp)
        err, tol = _verify(Bundle.load(tmp), model, probe, probe_features)
        if not err <= tol:
            raise DraftTrainingError(f"the exported draft differs from the trained one by {err:.3g} (tolerance "
                                     f"{tol:.3g}); this is a bug in the draft export")
        manifest = Manifest(**{**manifest.__dict__, "source": {**manifest.source, "verify_max_abs_error": err,
                                                               "exported": time.strftime("%Y-%m-%d %H:%M:%S")}})
        manifest.write(tmp)
        if out.exists():
            raise DraftTrainingError(f"{out} appeared while the draft was trained; it was left alone and the draft "
                                     "not written")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bundle.load(out)
