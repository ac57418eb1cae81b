"""`edge-rt train-draft` on a tiny target: the loss falls and held-out acceptance rises, the exported EAGLE draft
(reduced vocabulary, reading the target's features) keeps greedy output identical (and sampling exact), resume
continues, bad inputs (and a target without the hidden-state output) give one-line errors.

A random tiny model has nothing a draft could learn that carries over to unseen prompts (its greedy acceptance
stays at chance, ~5%), so the target here is the tiny Llama taught the tiny corpus for a few seconds first.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edge_runtime import Engine, SamplingParams
from edge_runtime.bundle import Bundle, sha256_file
from edge_runtime.cli import cli
from edge_runtime.errors import BundleError, DraftTrainingError
from export.distill import Recipe, parse_settings, train_draft, work_dir
from test_speculative import _exact_pairs, chi2_critical, chi_square
from tiny import CORPUS, make_model, make_tokenizer

# an EAGLE draft from the target's first layer, with a 128-row head over the target's 320 tokens (exercises the id map)
RECIPE = ["layers=0", "vocab=128", "max_tokens=32", "steps=200", "lr=3e-3", "eval_every=50", "threads=1"]


def _teach(model, tokenizer, steps: int = 40) -> None:
    """Fit the model to continue each corpus sentence from any cut, in the chat template (a few seconds)."""
    pairs = []
    for text in CORPUS:
        words = text.split(" ")
        for cut in range(1, len(words)):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": " ".join(words[:cut])}],
                                                   tokenize=False, add_generation_prompt=True)
            pairs.append((tokenizer.encode(prompt, add_special_tokens=False),
                          tokenizer.encode(" ".join(words[cut:]) + "<|im_end|>", add_special_tokens=False)))
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        batch = [pairs[i] for i in torch.randint(len(pairs), (16,)).tolist()]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for b, (p, a) in enumerate(batch):
            ids[b, :len(p) + len(a)] = torch.tensor(p + a)
            labels[b, len(p):len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def taught_bundle(tmp_path_factory):
    from export.pipeline import export_bundle
    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    _teach(model, tokenizer)
    folder = tmp_path_factory.mktemp("taught") / "hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return export_bundle(str(folder), folder.parent / "bundle").path


def _prompts(n: int, seed: int = 0) -> list[str]:
    """Beginnings of corpus sentences."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        words = r.choice(CORPUS).split(" ")
        out.append(" ".join(words[:r.randint(1, len(words) - 1)]))
    return out


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# corpus beginnings\n" + "\n".join(_prompts(40)) + "\n")
    return path


class Recorder:
    """A Progress that keeps what it was told and can interrupt like Ctrl-C at a given step of a stage."""

    def __init__(self, stop: tuple[str, int] | None = None):
        self.stop, self.stages, self.updates, self.notes = stop, [], [], []
        self.current = None

    def stage(self, name, total, done=0):
        self.current = name
        self.stages.append((name, total, done))

    def update(self, done, figures):
        self.updates.append((self.current, done, figures))
        if self.stop and self.stop == (self.current, done):
            raise KeyboardInterrupt

    def note(self, message):
        self.notes.append(message)


@pytest.fixture(scope="module")
def trained(taught_bundle, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("drafts") / "draft"
    progress = Recorder()
    result = train_draft(taught_bundle, out, prompt_file, minutes=10, recipe=parse_settings(RECIPE),
                         progress=progress)
    return result, progress


def test_training_lowers_the_loss_and_raises_heldout_acceptance(trained):
    result, progress = trained
    history = [f for stage, _, f in progress.updates if stage == "train draft" and "acceptance" in f]
    assert result.steps == 200 and len(history) == 5  # step 0 and every 50 steps
    first, last = history[0], history[-1]
    assert last["heldout_loss"] < 0.7 * first["heldout_loss"], (first, last)
    assert last["acceptance"] > first["acceptance"] + 0.15, (first, last)
    losses = [f["loss"] for stage, _, f in progress.updates if stage == "train draft" and f.get("loss")]
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    best = max(history, key=lambda f: f["acceptance"])  # the exported weights: the best held-out acceptance
    assert result.final["acceptance"] == best["acceptance"] and result.bundle.manifest.source["exported_step"] > 0
    assert any("held-out greedy acceptance" in n for n in progress.notes)


def test_the_draft_bundle_has_a_reduced_vocabulary_mapped_to_target_ids(trained, taught_bundle):
    result, _ = trained
    m = result.bundle.manifest
    vmap = np.load(result.bundle.file(m.vocab_map))
    assert m.architecture.vocab_size == 128 == len(vmap) == len(np.unique(vmap))
    assert vmap.max() < Bundle.load(taught_bundle).manifest.architecture.vocab_size
    assert 2 in vmap  # the end-of-sequence token is always proposable
    assert m.architecture.num_layers == 1 and m.source["steps"] == 200
    assert m.graph("target").kind == "eagle" and m.source["architecture"] == "eagle"
    with pytest.raises(BundleError, match="reduced vocabulary"):
        Engine(result.bundle)  # a draft is not a model to chat with


def test_exported_draft_keeps_greedy_output_identical(trained, taught_bundle):
    result, _ = trained
    base = Engine(Bundle.load(taught_bundle))
    spec = Engine(Bundle.load(taught_bundle), draft=str(result.bundle.path), draft_max=4, adaptive=False)
    base.eos = spec.eos = frozenset()  # run all the tokens: past the answer the model wanders, drafts get rejected
    accepted = drafted = 0
    for prompt in [*_prompts(6, seed=1), "Hello! How", "def add(a, b):", "ünïcödé 🙂 text"]:
        ids = base.chat_ids([{"role": "user", "content": prompt}])
        expected = list(base.generate_step(ids, max_tokens=64))
        assert list(spec.generate_step(ids, max_tokens=64)) == expected, prompt
        accepted += spec.last_stats.accepted_tokens
        drafted += spec.last_stats.drafted_tokens
    assert drafted > 0 and 0 < accepted < drafted  # the draft ran, was right often and wrong sometimes


def test_sampling_with_the_reduced_vocabulary_draft_follows_the_target(trained, taught_bundle):
    """1,000 two-token continuations at temperature 1 against the exact target distribution (chi-square,
    p = 0.001): q is zero outside the draft's rows and the rejection rule still returns the target's p."""
    result, _ = trained
    spec = Engine(Bundle.load(taught_bundle), draft=str(result.bundle.path), draft_min=1, draft_max=1,
                  adaptive=False)
    spec.drafter.threshold = 0.0
    spec.eos = frozenset()
    ids = spec.chat_ids([{"role": "user", "content": "The quick"}])
    exact = _exact_pairs(spec, ids, SamplingParams(temperature=1.0))
    vocab = int(np.sqrt(exact.size))
    counts = np.zeros(exact.size)
    accepted = 0
    for i in range(1000):
        x1, x2 = spec.generate_step(ids, SamplingParams(temperature=1.0, seed=i), max_tokens=2)
        counts[x1 * vocab + x2] += 1
        accepted += spec.last_stats.accepted_tokens
    assert 0 < accepted < 1000
    stat, dof = chi_square(counts, exact)
    assert stat < chi2_critical(dof), f"chi-square {stat:.1f} with {dof} dof"


def test_resume_continues_from_the_checkpoint(taught_bundle, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([p for p in _prompts(20, seed=2) if "\n" not in p][:12]))
    recipe = parse_settings(["vocab=128", "max_tokens=16", "steps=40", "eval_every=10", "threads=1"])
    out = tmp_path / "draft"
    # Ctrl-C while answering prompts, then while training
    first = Recorder(stop=("answer prompts", 5))
    with pytest.raises(KeyboardInterrupt):
        train_draft(taught_bundle, out, prompts, minutes=10, recipe=recipe, progress=first)
    second = Recorder(stop=("train draft", 25))
    with pytest.raises(KeyboardInterrupt):
        train_draft(taught_bundle, out, minutes=10, resume=True, progress=second)
    assert ("answer prompts", 12, 5) in second.stages  # answering went on from prompt 5
    ckpt = torch.load(work_dir(out) / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["step"] == 25 and not out.exists()

    third = Recorder()
    result = train_draft(taught_bundle, out, minutes=10, resume=True, progress=third)
    assert not any(stage == "answer prompts" for stage, _, _ in third.stages)  # the set was complete
    steps = [done for stage, done, _ in third.updates if stage == "train draft"]
    assert steps[0] == 26 and steps[-1] == 40 and result.steps == 40  # continued, not restarted
    assert result.initial["step"] == 0  # the history came along with the checkpoint
    assert any("resuming training at step 25" in n for n in third.notes)
    assert Bundle.load(out).manifest.source["steps"] == 40


def _one_line_error(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    return lines[0]


@pytest.mark.parametrize("content, word", [(b"", "holds 0 prompt"), (b"# only a comment\n\n", "holds 0 prompt"),
                                           (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "not a text file"),
                                           (b"caf\xe9 au lait\nsecond\n", "not UTF-8")],
                         ids=["empty", "comments-only", "binary", "latin-1"])
def test_a_bad_prompt_file_is_a_one_line_error(taught_bundle, tmp_path, content, word):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(content)
    line = _one_line_error(["train-draft", taught_bundle, "-o", tmp_path / "d", "--prompts", bad])
    assert word in line
    assert not (tmp_path / "d").exists() and not work_dir(tmp_path / "d").exists()  # nothing left behind


def test_an_existing_output_and_other_misuse_are_one_line_errors(taught_bundle, tmp_path):
    (tmp_path / "exists").mkdir()
    assert "already exists" in _one_line_error(["train-draft", taught_bundle, "-o", tmp_path / "exists"])
    assert "nothing to resume" in _one_line_error(["train-draft", taught_bundle, "-o", tmp_path / "d", "--resume"])
    assert "KEY=VALUE" in _one_line_error(["train-draft", taught_bundle, "-o", tmp_path / "d", "--set", "nope=1"])
    assert "does not fit" in _one_line_error(["train-draft", taught_bundle, "-o", tmp_path / "d", "--set",
                                              "layers=0,7"])
    assert "-o/--output" in _one_line_error(["train-draft", taught_bundle])
    assert "--train-draft" in _one_line_error(["chat", taught_bundle, "--draft", "trained"])


def test_a_tampered_vocabulary_map_is_refused(trained, taught_bundle, tmp_path):
    import json
    import shutil
    result, _ = trained
    copy = tmp_path / "draft"
    shutil.copytree(result.bundle.path, copy)
    vmap = np.load(copy / "vocab_map.npy")
    vmap[1] = vmap[0]  # two rows for one target id
    np.save(copy / "vocab_map.npy", vmap)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["vocab_map.npy"] = sha256_file(copy / "vocab_map.npy")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="distinct target ids"):
        Engine(Bundle.load(taught_bundle), draft=str(copy))


def test_recipe_settings_are_typed():
    r = parse_settings(["vocab=4096", "layers=0,-1", "temperature=0.5"])
    assert (r.vocab, r.layer_ids(30), r.temperature) == (4096, (0, 29), 0.5)
    assert Recipe().layer_ids(30) == (0,)
    with pytest.raises(DraftTrainingError, match="takes a int"):
        parse_settings(["vocab=lots"])


def test_chat_train_draft_uses_a_built_draft_and_a_default_never_trains(trained, taught_bundle, tmp_path):
    import json
    import shutil

    from edge_runtime import paths
    result, _ = trained
    name = Bundle.load(taught_bundle).manifest.name
    plain = CliRunner().invoke(cli, ["chat", str(taught_bundle), "--max-tokens", "12"], input="hello\n")
    # a bundle whose card names the trained draft as its default, and no draft built yet: ngram, with a notice
    copy = tmp_path / "bundle"
    shutil.copytree(taught_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["defaults"]["draft"] = "trained"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    fallback = CliRunner().invoke(cli, ["chat", str(copy), "--max-tokens", "12", "--stats"], input="hello\n")
    assert fallback.exit_code == 0, fallback.output
    assert "no trained draft" in fallback.stderr and "speculation (ngram)" in fallback.stderr
    assert fallback.stdout == plain.stdout
    # --train-draft with the draft already in the cache: used as is, nothing is trained
    shutil.copytree(result.bundle.path, paths.bundles_dir() / f"{name}-draft")
    try:
        spec = CliRunner().invoke(cli, ["chat", str(taught_bundle), "--train-draft", "--max-tokens", "12", "--stats"],
                                  input="hello\n")
        assert spec.exit_code == 0, spec.output
        assert "training a draft" not in spec.stderr and f"speculation ({paths.bundles_dir()}" in spec.stderr
        assert spec.stdout == plain.stdout
    finally:
        shutil.rmtree(paths.bundles_dir() / f"{name}-draft")


def test_the_runtime_draft_drafts_what_the_trained_one_predicts(trained, taught_bundle):
    """The exported graph driven by EagleModel (catch-up on the target's features, then drafting on its own) proposes
    what the PyTorch draft's unrolled steps predict for the same start: the training replay measures real runs."""
    from export.distill.model import build_draft
    result, _ = trained
    target = Bundle.load(taught_bundle)
    ckpt = torch.load(work_dir(result.bundle.path) / "checkpoint.pt", weights_only=False)
    vmap = ckpt["vocab_map"]
    model = build_draft(target, target.manifest.architecture.num_layers - 1, vmap).eval()
    model.load_state_dict(ckpt["best_weights"])
    spec = Engine(target, draft=str(result.bundle.path), draft_max=4, adaptive=False)
    spec.drafter.threshold = 0.0
    history = spec.chat_ids([{"role": "user", "content": "Paris is the"}])
    for _ in range(12):  # the target's greedy continuation, so its features are in the decoder's buffer
        history.append(int(np.argmax(spec.target.sync(history)[0][-1])))
    spec.target.sync(history[:-1])  # the target holds history[:-1]: features f_0..f_{len-2}, as in a round
    spec.drafter.reset()
    drafts = spec.drafter.propose(history, 4)
    assert len(drafts) == 4
    n = len(history) - 1
    feats = torch.from_numpy(spec.decoder.features[:n].copy())[None]
    tokens = torch.tensor([history[1:] + drafts])  # step j from start n-1 reads token n+j-2: draft j-1
    with torch.no_grad():
        steps = model.unroll(tokens, torch.nn.functional.pad(feats, (0, 0, 0, len(drafts))), len(drafts))
    preds = [int(vmap[model.logits(f[0, n - 1]).argmax()]) for f in steps]
    assert drafts == preds


def _without_hidden_output(bundle_path, folder):
    """A copy of a target bundle exported before the hidden-state output existed."""
    import json
    import shutil

    import onnx
    shutil.copytree(bundle_path, folder)
    spec = Bundle.load(folder).manifest.graph("target")
    model = onnx.load(str(folder / spec.file), load_external_data=False)
    keep = [o for o in model.graph.output if o.name != "hidden_states"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save_model(model, str(folder / spec.file))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][spec.file] = sha256_file(folder / spec.file)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_target_without_the_hidden_state_output_is_a_clear_error(trained, taught_bundle, tmp_path):
    old = _without_hidden_output(taught_bundle, tmp_path / "old-target")
    assert Engine(Bundle.load(old)).decoder.features is None  # it still runs alone
    with pytest.raises(BundleError, match="no hidden_states output.*re-export"):
        Engine(Bundle.load(old), draft=str(trained[0].bundle.path))
    line = _one_line_error(["train-draft", old, "-o", tmp_path / "d"])
    assert "hidden_states" in line and "re-export" in line
    assert not (tmp_path / "d").exists() and not work_dir(tmp_path / "d").exists()


def test_a_saved_set_loads_into_one_copy_of_its_arrays(tmp_path):
    """Loading a set of many answers holds its features once: slicing a fresh read of the .npz array per
    answer kept one whole copy alive per answer (96 SmolLM2 answers: 1.7 GB; 447: out of memory at 24 GB)."""
    import tracemalloc

    from export.distill.dataset import DistillSet
    rng = np.random.default_rng(0)
    data = DistillSet(top_k=4)
    for _ in range(60):
        n = int(rng.integers(20, 40))
        data.add(list(rng.integers(0, 300, n + 5)), 5, False, rng.integers(0, 300, (n, 4)), rng.normal(size=(n, 4)),
                 rng.normal(size=(n + 4, 256)))
    path = tmp_path / "data.npz"
    data.save(path)
    tracemalloc.start()
    loaded = DistillSet.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * path.stat().st_size, (peak, path.stat().st_size)
    for a, b in zip(loaded.features, data.features):
        np.testing.assert_array_equal(a, b)
    assert [s.tolist() for s in loaded.seqs] == [s.tolist() for s in data.seqs]


def test_later_passes_answer_the_training_prompts_again_never_the_held_out_ones():
    from export.distill.dataset import prompt_plan
    prompts = [f"prompt {i}" for i in range(50)]
    one = prompt_plan(prompts, parse_settings(["passes=1"]))
    three = prompt_plan(prompts, parse_settings(["passes=3"]))
    assert three[:len(one)] == one  # the first pass (and so the held-out choice) does not depend on passes
    held = {p for p, h in one if h}
    train = [p for p, h in one if not h]
    assert held and len(three) == len(one) + 2 * len(train)
    for k in (1, 2):
        later = three[len(one) + (k - 1) * len(train):len(one) + k * len(train)]
        assert sorted(p for p, _ in later) == sorted(train) and not any(h for _, h in later)
        assert [p for p, _ in later] != train  # a new order each pass
    with pytest.raises(DraftTrainingError, match="passes"):
        parse_settings(["passes=0"])
