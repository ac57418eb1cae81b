"""Export of a tiny config-built Llama: manifest, logits against PyTorch, greedy tokens against transformers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edge_runtime import Engine, SamplingParams
from edge_runtime.bundle import Bundle, sha256_file
from edge_runtime.errors import ExportError
from export.pipeline import export_bundle
from export.verify import reference_logits, runtime_logits
from tiny import save_tiny


@pytest.fixture(scope="module")
def hf_model(tiny_hf):
    return AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()


def test_manifest_describes_the_bundle(tiny_bundle, hf_model):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["format_version"] == 1
    arch = m["architecture"]
    c = hf_model.config
    assert (arch["num_layers"], arch["num_heads"], arch["num_kv_heads"], arch["head_dim"], arch["vocab_size"]) == (
        c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, 16, c.vocab_size)
    assert m["tokens"]["eos"] == [2]
    assert "<|im_start|>" in m["chat_template"]
    for name, digest in m["files"].items():
        assert sha256_file(tiny_bundle / name) == digest
    assert m["source"]["verify_max_abs_error"] <= m["source"]["verify_tolerance"]


@pytest.mark.parametrize("split", [1, 5, 17])
def test_logits_match_pytorch_through_the_kv_cache(tiny_bundle, hf_model, split):
    ids = [int(i) for i in np.random.default_rng(split).integers(3, hf_model.config.vocab_size, 24)]
    ref = reference_logits(hf_model, ids)
    got = runtime_logits(Bundle.load(tiny_bundle), ids, split)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_greedy_equals_transformers_for_64_tokens(tiny_bundle, tiny_hf, hf_model):
    tok = AutoTokenizer.from_pretrained(tiny_hf)
    engine = Engine.load(tiny_bundle)
    for prompt in ["Hello! How are", "The capital of France"]:
        ids = tok.encode(prompt, add_special_tokens=False)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)
        expected = out[0, len(ids):].tolist()
        engine.eos = frozenset()  # compare all 64 tokens, not just up to a random end-of-sequence
        got = list(engine.generate_step(ids, SamplingParams(), max_tokens=64))
        assert got == expected


def test_existing_output_is_refused_and_kept(tiny_hf, tiny_bundle):
    before = sha256_file(tiny_bundle / "manifest.json")
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(str(tiny_hf), tiny_bundle)
    assert sha256_file(tiny_bundle / "manifest.json") == before


def test_failed_export_leaves_nothing_behind(tiny_hf, tmp_path, monkeypatch):
    import export.pipeline as pipeline
    monkeypatch.setattr(pipeline, "verify_bundle", lambda bundle, model, ids: (1.0, 1e-3))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="verification failed"):
        export_bundle(str(tiny_hf), out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_other_llama_family_architectures_export(tmp_path, model_type):
    src = save_tiny(tmp_path / model_type, model_type=model_type, seed=1)
    bundle = export_bundle(str(src), tmp_path / "bundle")
    m = bundle.manifest
    assert m.architecture.family == model_type
    assert m.source["verify_max_abs_error"] <= m.source["verify_tolerance"]


@pytest.mark.parametrize("card_draft, has_self, written", [
    ("ngram+self", True, "ngram+self"), ("ngram+self:cpu-int8", True, "ngram+self"), ("self:cpu-int4:16", True, "self"),
    ("ngram+self", False, "ngram"), ("self", False, "none"), ("ngram", True, "ngram"), ("none", False, "none")])
def test_the_manifest_names_the_cards_draft_as_the_bundle_can_run_it(card_draft, has_self, written):
    """A self-draft spec becomes `self`; an NPU bundle, which has no self-draft graph, falls back to lookup."""
    from export.pipeline import _runnable_draft
    assert _runnable_draft(card_draft, has_self) == written
