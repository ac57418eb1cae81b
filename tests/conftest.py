from __future__ import annotations

import pytest

from tiny import save_tiny


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """User paths point into a temp dir: tests never touch ~/.cache."""
    monkeypatch.setenv("EDGE_RT_HOME", str(tmp_path_factory.getbasetemp() / "edge-rt-home"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """A 2-layer Llama Hugging Face folder (config, safetensors, tokenizer with a ChatML template)."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_hf, tmp_path_factory):
    from export.pipeline import export_bundle
    return export_bundle(str(tiny_hf), tmp_path_factory.mktemp("bundles") / "tiny-llama").path


@pytest.fixture(scope="session")
def tiny_draft_bundle(tmp_path_factory):
    """A separate 1-layer draft with other weights but the same tokenizer as tiny_hf (the tokenizer is trained
    deterministically), so it agrees with the target only sometimes."""
    from export.pipeline import export_bundle
    src = save_tiny(tmp_path_factory.mktemp("tiny-draft") / "tiny-draft", seed=1, layers=1)
    return export_bundle(str(src), tmp_path_factory.mktemp("bundles") / "tiny-draft").path


STATIC_CONTEXT = 64


@pytest.fixture(scope="session")
def static_bundle(tiny_hf, tmp_path_factory):
    """The tiny model exported for QNN: float AR-1 / AR-5 / AR-64 graphs over a 64-slot cache, one weights file."""
    from export.pipeline import export_bundle
    return export_bundle(str(tiny_hf), tmp_path_factory.mktemp("static") / "tiny-static", target_ep="qnn",
                         context=STATIC_CONTEXT).path
