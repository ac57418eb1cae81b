"""The draft: a Llama with a few of the target's layers and a reduced-vocabulary LM head, in PyTorch for training,
then exported into a draft bundle the runtime's `--draft PATH` loads.

    vocab_map = choose_vocab(data, recipe.vocab, target)      # [N] target ids, one per draft row
    model = build_draft(target, layers, vocab_map)            # weights copied from the target bundle's graph
    export_draft(model, vocab_map, target, out, info)         # verified bundle with vocab_map.npy

Draft ids: 0..N-1 stand for target ids vocab_map[0..N-1]; input id N is the shared row of every other target id.
The embedding has N + 1 rows and is tied to the LM head like the target's (half the bytes of a separate head, so
16k rows and 2 layers stay within 15% of SmolLM2); the runtime never proposes row N (logits past the map).
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
def draft_config(arch: Architecture, num_layers: int, rows: int):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=rows, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=arch.num_heads,
                       num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                       max_position_embeddings=arch.max_position_embeddings, rope_theta=arch.rope_theta,
                       rms_norm_eps=arch.rms_norm_eps, tie_word_embeddings=True, attention_bias=False,
                       mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def new_draft(arch: Architecture, num_layers: int, vocab: int):
    """An untrained draft of the right shape (weights come from build_draft or a checkpoint)."""
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(draft_config(arch, num_layers, vocab + 1)).float().train()


def build_draft(target: Bundle, layers: tuple[int, ...], vocab_map: np.ndarray):
    """The draft initialised from the target: embedding (= head) rows of vocab_map (the shared input row is the mean
    of the others), the listed layers, the final norm. Checks that its rotary matches the graph's cos/sin cache."""
    import torch
    arch = target.manifest.architecture
    names = ["model.embed_tokens.weight", "model.norm.weight", "cos_cache", "sin_cache"]
    names += [n for i in layers for n in _layer_names(i)]
    head_name = [] if arch.tie_word_embeddings else ["lm_head.weight"]
    w = read_initializers(target, names + head_name)
    model = new_draft(arch, len(layers), len(vocab_map))
    embed = w["model.embed_tokens.weight"]
    if "lm_head.weight" in w:  # an untied target: its head rows serve as the draft's tied matrix
        embed = w["lm_head.weight"]
    others = np.setdiff1d(np.arange(arch.vocab_size), vocab_map)
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim

    def put(param, array: np.ndarray) -> None:
        with torch.no_grad():
            param.copy_(torch.tensor(np.asarray(array, np.float32)))

    put(model.model.embed_tokens.weight, np.concatenate([embed[vocab_map], embed[others].mean(0, keepdims=True)
                                                         if others.size else embed[:1] * 0]))
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


# ---- the draft bundle --------------------------------------------------------------------------------------------
def _verify(bundle: Bundle, model, ids: list[int]) -> tuple[float, float]:
    import torch

    from export.verify import FP32_RELATIVE_TOLERANCE, runtime_logits
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    got = runtime_logits(bundle, ids, split=max(1, len(ids) // 2))
    return float(np.abs(got - ref).max()), FP32_RELATIVE_TOLERANCE * max(1.0, float(np.abs(ref).max()))


def export_draft(model, vocab_map: np.ndarray, target: Bundle, out: Path, info: dict) -> Bundle:
    """Write a verified draft bundle to a temp folder next to `out`, then rename it into place."""
    from .. import builder, source
    tm = target.manifest
    n = len(vocab_map)
    arch = Architecture(**{**tm.architecture.__dict__, "num_layers": model.config.num_hidden_layers,
                           "vocab_size": n + 1, "tie_word_embeddings": True})  # logits: the map's rows + the shared
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model.eval()
        weights = source.weights_of(model, arch)
        builder.save_model(builder.build_decoder(arch, weights), tmp / GRAPH, GRAPH_DATA)
        tok_files = [tm.tokenizer] + [f for f in ("tokenizer_config.json",) if f in tm.files]
        for name in tok_files:
            shutil.copyfile(target.file(name), tmp / name)
        np.save(tmp / VOCAB_MAP, vocab_map.astype(np.int64), allow_pickle=False)
        files = {name: sha256_file(tmp / name) for name in (GRAPH, GRAPH_DATA, VOCAB_MAP, *tok_files)}
        manifest = Manifest(
            format_version=FORMAT_VERSION, name=f"{tm.name}-draft", architecture=arch, tokens=tm.tokens,
            graphs=(GraphSpec(role="target", file=GRAPH, data_files=(GRAPH_DATA,), kind="gqa", precision="fp32"),),
            tokenizer=tm.tokenizer, chat_template=tm.chat_template, files=files, defaults=tm.defaults,
            source={"draft_of": tm.name, "target_graph_sha256": tm.files.get(tm.graph("target").file), **info},
            vocab_map=VOCAB_MAP)
        manifest.write(tmp)
        probe = [i for i in range(n) if i % 7 == 3][:24]
        err, tol = _verify(Bundle.load(tmp), model, probe)
        if not err <= tol:
            raise DraftTrainingError(f"the exported draft differs from the trained one by {err:.3g} (tolerance "
                                     f"{tol:.3g}); this is a bug in the draft export")
        manifest = Manifest(**{**manifest.__dict__, "source": {**manifest.source, "verify_max_abs_error": err,
                                                               "exported": time.strftime("%Y-%m-%d %H:%M:%S")}})
        manifest.write(tmp)
        if out.exists():
            raise DraftTrainingError(f"{out} appeared while the draft was trained; it was left alone, the draft "
                                     f"is not written")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bundle.load(out)
