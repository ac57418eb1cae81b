"""The draft: a Llama with a few of the target's layers and a reduced-vocabulary LM head, in PyTorch for training,
then exported into a draft bundle the runtime's `--draft PATH` loads.

    vocab_map = choose_vocab(data, recipe.vocab, target)      # [N] target ids, one per head row
    model = build_draft(target, layers, vocab_map)            # weights copied from the target bundle's graph
    export_draft(model, vocab_map, target, out, info)         # verified bundle with vocab_map.npy

The draft reads target ids through a frozen copy of the target's embedding, stored as INT8 with one scale per row
(a quarter of the bytes; a Gather reads only the rows of the tokens it is given, so it costs nothing per step), and
writes logits over N rows: row i is target id vocab_map[i]. The input side must cover the whole vocabulary: SmolLM2's
default system prompt holds a token (`LM`) that no 16k-row answer vocabulary contains, and one shared row for such
tokens cut the held-out acceptance of even the full 30-layer model from 0.95 to 0.77.
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
            f"{p}.post_attention_layernorm.weight", f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight",
            f"{p}.mlp.down_proj.weight"]


def check_target(bundle: Bundle, layers: tuple[int, ...]) -> None:
    """Fail before minutes of generation if the draft cannot be built from this target."""
    arch = bundle.manifest.architecture
    if arch.family not in ("llama", "mistral"):
        raise DraftTrainingError(f"train-draft builds drafts for Llama-family targets without biases; "
                                 f"{bundle.path} is {arch.family}")
    read_initializers(bundle, [_layer_names(i)[0] for i in layers])  # float32 weights with the names we read


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


def new_draft(arch: Architecture, num_layers: int, head_rows: int):
    """An untrained draft of the right shape: embedding over the target's vocabulary (frozen), `num_layers` layers,
    a separate head of `head_rows` rows. Weights come from build_draft (and a checkpoint)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                         intermediate_size=arch.intermediate_size, num_hidden_layers=num_layers,
                         num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
                         head_dim=arch.head_dim, max_position_embeddings=arch.max_position_embeddings,
                         rope_theta=arch.rope_theta, rms_norm_eps=arch.rms_norm_eps, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config)
    model.lm_head = torch.nn.Linear(arch.hidden_size, head_rows, bias=False)
    model.model.embed_tokens.weight.requires_grad_(False)
    return model.float().train()


def build_draft(target: Bundle, layers: tuple[int, ...], vocab_map: np.ndarray):
    """The draft initialised from the target: the embedding (INT8-rounded, as exported), the listed layers, the
    final norm, head rows = the target's head rows of vocab_map. Checks its rotary against the graph's cos cache."""
    import torch
    arch = target.manifest.architecture
    names = [EMBED, "model.norm.weight", "cos_cache"] + [n for i in layers for n in _layer_names(i)]
    w = read_initializers(target, names + ([] if arch.tie_word_embeddings else ["lm_head.weight"]))
    model = new_draft(arch, len(layers), len(vocab_map))
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim

    def put(param, array: np.ndarray) -> None:
        with torch.no_grad():
            param.copy_(torch.tensor(np.asarray(array, np.float32)))

    codes, scale = quantize_rows(w[EMBED])
    put(model.model.embed_tokens.weight, codes * scale[:, None])
    put(model.lm_head.weight, w.get("lm_head.weight", w[EMBED])[vocab_map])
    put(model.model.norm.weight, w["model.norm.weight"])
    for layer, i in zip(model.model.layers, layers):
        norm1, qkv, o, norm2, gate, up, down = (w[n] for n in _layer_names(i))
        a, mlp = layer.self_attn, layer.mlp
        put(layer.input_layernorm.weight, norm1)
        put(a.q_proj.weight, qkv[:, :q].T)          # the graph stores [in, out]; Linear is [out, in]
        put(a.k_proj.weight, qkv[:, q:q + kv].T)
        put(a.v_proj.weight, qkv[:, q + kv:].T)
        put(a.o_proj.weight, o.T)
        put(layer.post_attention_layernorm.weight, norm2)
        put(mlp.gate_proj.weight, gate.T)
        put(mlp.up_proj.weight, up.T)
        put(mlp.down_proj.weight, down.T)
    positions = torch.arange(min(arch.max_position_embeddings, 4096))[None]
    with torch.no_grad():
        cos, _ = model.model.rotary_emb(torch.zeros(1), positions)
    half = arch.head_dim // 2
    err = float(np.abs(cos[0, :, :half].numpy() - w["cos_cache"][:positions.shape[1]]).max())
    if err > 1e-4:
        raise DraftTrainingError(f"the target's rotary embedding differs from plain RoPE (max error {err:.2g}): "
                                 "rope scaling is not supported by train-draft")
    return model


def trained_state(model) -> dict:
    """What a checkpoint keeps: everything but the frozen embedding (rebuilt from the target)."""
    return {k: v for k, v in model.state_dict().items() if k != EMBED}


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


def _verify(bundle: Bundle, model, ids: list[int]) -> tuple[float, float]:
    import torch

    from export.verify import FP32_RELATIVE_TOLERANCE, runtime_logits
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    got = runtime_logits(bundle, ids, split=max(1, len(ids) // 2))
    return float(np.abs(got - ref).max()), FP32_RELATIVE_TOLERANCE * max(1.0, float(np.abs(ref).max()))


def export_draft(model, vocab_map: np.ndarray, target: Bundle, out: Path, info: dict, probe: list[int]) -> Bundle:
    """Write a draft bundle to a temp folder next to `out`, check its logits against the PyTorch draft on the
    target ids `probe`, then rename it into place."""
    from .. import builder, source
    tm = target.manifest
    arch = Architecture(**{**tm.architecture.__dict__, "num_layers": model.config.num_hidden_layers,
                           "vocab_size": len(vocab_map), "tie_word_embeddings": False})  # vocab_size: logit rows
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model.eval()
        weights = source.weights_of(model, arch)
        graph = builder.build_decoder(arch, weights)
        _int8_embedding(graph, weights.embed)
        builder.save_model(graph, tmp / GRAPH, GRAPH_DATA)
        tok_files = [tm.tokenizer] + [f for f in ("tokenizer_config.json",) if f in tm.files]
        for name in tok_files:
            shutil.copyfile(target.file(name), tmp / name)
        np.save(tmp / VOCAB_MAP, vocab_map.astype(np.int64), allow_pickle=False)
        files = {name: sha256_file(tmp / name) for name in (GRAPH, GRAPH_DATA, VOCAB_MAP, *tok_files)}
        manifest = Manifest(
            format_version=FORMAT_VERSION, name=f"{tm.name}-draft", architecture=arch, tokens=tm.tokens,
            graphs=(GraphSpec(role="target", file=GRAPH, data_files=(GRAPH_DATA,), kind="gqa",
                              precision="fp32, int8 embedding"),),
            tokenizer=tm.tokenizer, chat_template=tm.chat_template, files=files, defaults=tm.defaults,
            source={"draft_of": tm.name, "target_graph_sha256": tm.files.get(tm.graph("target").file), **info},
            vocab_map=VOCAB_MAP)
        manifest.write(tmp)
        err, tol = _verify(Bundle.load(tmp), model, probe)
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
