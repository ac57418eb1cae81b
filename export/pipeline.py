"""SOURCE (card name, Hugging Face folder, .gguf) -> a verified bundle, written to a temp folder and renamed."""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from edge_runtime.bundle import Bundle, publish, sha256_file
from edge_runtime.cards import Card, get_card, looks_like_path
from edge_runtime.drafters import split_draft
from edge_runtime.errors import ExportError
from edge_runtime.manifest import FORMAT_VERSION, Defaults, GraphSpec, Manifest, TokenIds

from .self_draft import build_self_draft, parse_self_draft
from .builder import KV_DTYPES, build_decoder, save_model
from .source import architecture_of, load_source, weights_of
from .static_export import TARGET_EPS, static_architecture, static_tokens, write_static_graphs
from .tokenizer import save_tokenizer
from .verify import verify_bundle

GRAPH = "model.onnx"
GRAPH_DATA = "model.onnx.data"
MAX_ROTARY_POSITIONS = 32768  # cos/sin cache rows baked into the graph
VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France; 2 + 2 = 4."

Progress = Callable[[str], None]


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _token_ids(model, tokenizer) -> TokenIds:
    cfg, gen = model.config, getattr(model, "generation_config", None)
    eos = _ids(cfg.eos_token_id) + _ids(getattr(gen, "eos_token_id", None))
    if not eos:
        eos = _ids(tokenizer.eos_token_id)
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else tokenizer.pad_token_id
    return TokenIds(eos=tuple(dict.fromkeys(eos)), bos=bos, pad=pad)


def _defaults(card: Card | None, max_positions: int) -> Defaults:
    values = dict(card.defaults) if card else {}
    values["context"] = min(int(values.get("context", 2048)), max_positions)
    return Defaults(**{k: v for k, v in values.items() if k in Defaults.__dataclass_fields__})


def _runnable_draft(default: str, has_self_draft: bool) -> str:
    """The card's default draft as the manifest names it for the runtime: a self-draft spec (self:cpu-int8) is
    `self`, and without a self-draft graph (an NPU bundle) ngram+self falls back to ngram."""
    model, lookup = split_draft(default)
    if model is None or not model.startswith("self"):
        return default
    if has_self_draft:
        return "ngram+self" if lookup else "self"
    return "ngram" if lookup else "none"


def resolve_source(source: str) -> tuple[Path, Card | None]:
    """A card name becomes its fetched source file; a path stays a path."""
    if looks_like_path(source):
        return Path(source), None
    from .fetch import fetch
    card = get_card(source)
    return fetch(card), card


def export_bundle(source: str, out: Path, force: bool = False, progress: Progress | None = None,
                  kv_dtype: str = "float32", target_ep: str = "cpu", context: int | None = None,
                  draft: str | None = None) -> Bundle:
    """kv_dtype: the KV cache's element type, float32 or float16 (half the cache bytes; see builder.py).
    target_ep "qnn": static-shape graphs for the NPU (static_export.py) for a context of `context` tokens.
    draft "self[:RECIPE][:LAYERS]": add a self-draft graph (self_draft.py); a card's default self-draft (its draft
    self... or ngram+self...) is built too, for CPU bundles."""
    say = progress or (lambda _msg: None)
    out = Path(out)
    if kv_dtype not in KV_DTYPES:
        raise ExportError(f"KV cache dtype {kv_dtype!r} is not supported; pick one of {', '.join(KV_DTYPES)}")
    if target_ep not in TARGET_EPS:
        raise ExportError(f"target execution provider {target_ep!r} is not supported; pick one of "
                          f"{', '.join(TARGET_EPS)}")
    if target_ep != "cpu" and kv_dtype != "float32":
        raise ExportError(f"--target-ep {target_ep} graphs keep a float32 KV cache; drop the KV dtype option")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it or choose another -o")
    path, card = resolve_source(source)
    card_draft = split_draft(str(card.defaults.get("draft", "none")))[0] if card is not None else None
    if draft is None and target_ep == "cpu" and card_draft is not None and card_draft.startswith("self"):
        draft = card_draft  # the card's default self-draft is built with the bundle
    if draft is not None and (not draft.startswith("self") or target_ep != "cpu"):
        raise ExportError(f"--draft {draft!r}: export builds only self-drafts (self[:RECIPE][:LAYERS]) for CPU "
                          "bundles; a separate draft is a bundle of its own, passed to generate/chat with --draft")
    t0 = time.perf_counter()
    say("load source")
    src = load_source(path)
    arch = architecture_of(src.model, MAX_ROTARY_POSITIONS)
    if target_ep != "cpu":
        arch = static_architecture(arch, context or _defaults(card, arch.max_position_embeddings).context)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        say("build graph")
        if target_ep == "cpu":
            weights = weights_of(src.model, arch)
            graph = build_decoder(arch, weights, kv_dtype=kv_dtype)
            say("write graph")
            save_model(graph, tmp / GRAPH, GRAPH_DATA)
            del graph
            graphs = (GraphSpec(role="target", file=GRAPH, data_files=(GRAPH_DATA,), kind="gqa", precision="fp32",
                                kv_dtype=kv_dtype),)
            graph_files = [GRAPH, GRAPH_DATA]
        else:  # static variants for an NPU, sharing one weights file
            say("write graph")
            graphs, graph_files = write_static_graphs(arch, weights_of(src.model, arch), tmp,
                                                      arch.max_position_embeddings, static_tokens(), target_ep)
        say("write tokenizer")
        tok_file, tok_config = save_tokenizer(src.tokenizer, tmp)
        if draft is not None:
            say("build draft")
            calibration = src.tokenizer.encode(VERIFY_TEXT * 8, add_special_tokens=False)
            draft_graph, draft_files = build_self_draft(parse_self_draft(draft, arch.num_layers), arch, weights, tmp,
                                                        kv_dtype, calibration)
            graphs, graph_files = (*graphs, draft_graph), [*graph_files, *draft_files]
        files = {name: sha256_file(tmp / name) for name in (*graph_files, tok_file, tok_config)}
        defaults = _defaults(card, arch.max_position_embeddings)
        defaults = replace(defaults, draft=_runnable_draft(defaults.draft, draft is not None))
        if target_ep != "cpu":  # the static graphs' context is the default
            defaults = replace(defaults, context=arch.max_position_embeddings)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            name=card.name if card else path.stem,
            architecture=arch,
            tokens=_token_ids(src.model, src.tokenizer),
            graphs=graphs,
            tokenizer=tok_file,
            chat_template=getattr(src.tokenizer, "chat_template", None),
            files=files,
            defaults=defaults,
            source={"path": str(path), "card": card.name if card else None, "license": card.license if card else None},
        )
        manifest.write(tmp)
        say("verify")
        ids = src.tokenizer.encode(VERIFY_TEXT, add_special_tokens=False)[:24]
        err, tol = verify_bundle(Bundle.load(tmp), src.model, ids)
        if not err <= tol:
            raise ExportError(f"verification failed: ONNX Runtime logits differ from PyTorch by {err:.3g} "
                              f"(tolerance {tol:.3g}); the graph is wrong for this model")
        manifest = Manifest(**{**manifest.__dict__, "source": {**manifest.source, "verify_max_abs_error": err,
                                                               "verify_tolerance": tol,
                                                               "export_seconds": round(time.perf_counter() - t0, 1)}})
        manifest.write(tmp)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bundle.load(out)

