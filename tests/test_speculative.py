"""Speculative decoding on real ONNX Runtime sessions (tiny models) and the rejection rule in isolation."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from edge_runtime import Engine, SamplingParams
from edge_runtime.bundle import Bundle
from edge_runtime.cached import CachedDecoder
from edge_runtime.cli import cli
from edge_runtime.drafters import NgramDrafter
from edge_runtime.engine import make_decoder
from edge_runtime.errors import BundleError, InvalidArgumentError
from edge_runtime.sampling import make_logits_processor
from edge_runtime.speculative import DraftLength, verify
from tiny import save_tiny

PROMPTS = ["Hello! How are", "The capital of France", "def add(a, b):", "Café, naïve, 你好 and emoji"]

# chi-square critical values at significance 0.001 (a false alarm once in a thousand runs), by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59,
            11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70, 16: 39.25, 17: 40.79, 18: 42.31, 19: 43.82,
            20: 45.31, 25: 52.62, 30: 59.70, 40: 73.40, 50: 86.66, 60: 99.61, 80: 124.84, 100: 149.45}


def chi2_critical(dof: int) -> float:
    keys = sorted(CHI2_999)
    return CHI2_999[min((k for k in keys if k >= dof), default=keys[-1])] if dof <= keys[-1] else dof + 4 * dof ** .5


def chi_square(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic with cells of expected count < min_expected pooled into one."""
    n = counts.sum()
    expected = probs * n
    small = expected < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum() - 1)


def _engine(bundle, **kw) -> Engine:
    engine = Engine(Bundle.load(bundle), **kw)
    engine.eos = frozenset()  # run all max_tokens
    return engine


def _prompt_ids(engine, prompt):
    return engine.encode(prompt)


@pytest.fixture(scope="module")
def tiny_self_bundle(tiny_hf, tmp_path_factory):
    """The tiny target with a self-draft: its first layer only, INT4 (cpu-int4)."""
    from export.pipeline import export_bundle
    return export_bundle(str(tiny_hf), tmp_path_factory.mktemp("self") / "b", draft="self:cpu-int4:1").path


def test_self_draft_graph_is_in_the_bundle(tiny_self_bundle):
    m = Bundle.load(tiny_self_bundle).manifest
    draft = m.graph("draft")
    assert (draft.precision, draft.num_layers) == ("cpu-int4", 1)
    import onnx
    ops = {n.op_type for n in onnx.load(str(tiny_self_bundle / draft.file), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops


@pytest.mark.parametrize("spec, recipe, layers", [("self", "cpu-int8", None), ("self:cpu-int4", "cpu-int4", None),
                                                  ("self::2", "cpu-int8", 2), ("self:none:1", None, 1)])
def test_self_draft_spec_defaults_to_int8(spec, recipe, layers):
    """`--draft self` is INT8: on 2 AVX2 cores it drafts nearly as cheaply as INT4 and agrees far more (self_draft.py)."""
    from export.self_draft import parse_self_draft
    parsed = parse_self_draft(spec, 2)
    assert (parsed.recipe, parsed.layers) == (recipe, layers)


@pytest.mark.parametrize("draft", ["ngram", "target", "separate", "self"])
def test_greedy_output_equals_target_only(tiny_bundle, tiny_draft_bundle, tiny_self_bundle, draft):
    base = _engine(tiny_bundle)
    target = tiny_self_bundle if draft == "self" else tiny_bundle
    spec = _engine(target, draft=str(tiny_draft_bundle) if draft == "separate" else draft, draft_max=5,
                   adaptive=False)
    if draft != "ngram":
        spec.drafter.threshold = 0.0  # the random tiny drafts are unsure of everything: draft anyway
    drafted = 0
    for prompt in PROMPTS:
        ids = _prompt_ids(base, prompt)
        expected = list(base.generate_step(ids, max_tokens=128))
        assert list(spec.generate_step(ids, max_tokens=128)) == expected
        drafted += spec.last_stats.drafted_tokens
    assert drafted > 0  # speculation really ran


def _count_calls(obj, method: str) -> list:
    calls = []
    inner = getattr(obj, method)
    setattr(obj, method, lambda *a, **kw: calls.append(out := inner(*a, **kw)) or out)
    return calls


def test_lookup_then_model_keeps_greedy_output_and_uses_both(tiny_bundle, tiny_draft_bundle):
    """--draft ngram+DRAFT: lookup where the last tokens occurred before, the model elsewhere."""
    from edge_runtime.drafters import NgramDrafter
    base = _engine(tiny_bundle)
    spec = _engine(tiny_bundle, draft=f"ngram+{tiny_draft_bundle}", draft_max=5, adaptive=False)
    assert spec.drafter.name == f"ngram+{tiny_draft_bundle}" and spec.drafter.lookup.min_n == 3
    spec.drafter.lookup = NgramDrafter(min_n=1)  # the random tiny model seldom repeats 3 tokens: match on 1
    spec.drafter.model.threshold = 0.0
    lookup, model = _count_calls(spec.drafter.lookup, "propose"), _count_calls(spec.drafter.model, "propose")
    for prompt in PROMPTS:
        ids = _prompt_ids(base, prompt)
        assert list(spec.generate_step(ids, max_tokens=128)) == list(base.generate_step(ids, max_tokens=128))
    assert sum(map(bool, lookup)) > 10 and len(model) > 10  # both sources drafted
    assert len(model) == len(lookup) - sum(map(bool, lookup))  # the model only where lookup had nothing


def test_adaptive_length_keeps_greedy_output(tiny_bundle, tiny_draft_bundle):
    base = _engine(tiny_bundle)
    spec = _engine(tiny_bundle, draft=str(tiny_draft_bundle), draft_min=1, draft_max=6)
    for prompt in PROMPTS:
        ids = _prompt_ids(base, prompt)
        assert list(spec.generate_step(ids, max_tokens=96)) == list(base.generate_step(ids, max_tokens=96))


def test_target_as_its_own_draft_accepts_everything(tiny_bundle):
    spec = _engine(tiny_bundle, draft="target", draft_max=4, adaptive=False)
    spec.drafter.threshold = 0.0  # no entropy stop: every round drafts 4
    tokens = list(spec.generate_step(_prompt_ids(spec, PROMPTS[0]), max_tokens=100))
    s = spec.last_stats
    assert len(tokens) == 100
    assert s.drafted_tokens > 60 and s.accepted_tokens == s.drafted_tokens
    assert s.calls_per_token < 0.3  # 5 tokens per target call, near enough


def test_entropy_stop_applies_to_sampling_not_to_greedy(tiny_bundle):
    """AdaEDL stops an unsure draft when sampling, until the draft is measured to agree; greedy drafting leaves gamma
    to the length controller."""
    spec = _engine(tiny_bundle, draft="target", draft_max=4, adaptive=False)
    spec.drafter.threshold = 0.99  # the random tiny model is unsure of everything: a stop at every token
    ids = _prompt_ids(spec, PROMPTS[0])
    list(spec.generate_step(ids, max_tokens=20))
    assert spec.last_stats.drafted_tokens >= 12  # 4 per round
    spec.set_draft("target", 1, 4, adaptive=False)  # forget the acceptance measured above
    spec.drafter.threshold = 0.99
    list(spec.generate_step(ids, SamplingParams(temperature=1.0, seed=3), max_tokens=20))
    assert spec.last_stats.drafted_tokens == 0
    spec.draft_length.accepted = 99.0  # measured per-token acceptance 0.99: the entropy no longer predicts rejections
    list(spec.generate_step(ids, SamplingParams(temperature=1.0, seed=3), max_tokens=20))
    assert spec.last_stats.drafted_tokens >= 12


def test_rollback_leaves_the_cache_as_target_only_decoding(tiny_bundle, tiny_draft_bundle):
    spec = _engine(tiny_bundle, draft=str(tiny_draft_bundle), draft_max=4, adaptive=False)
    spec.drafter.threshold = 0.0  # the random draft is unsure of everything; draft anyway
    list(spec.generate_step(_prompt_ids(spec, PROMPTS[1]), max_tokens=60))
    s = spec.last_stats
    assert s.accepted_tokens < s.drafted_tokens  # some rounds were rejected and rolled back
    pos = spec.decoder.kv.pos
    assert pos == len(spec.target.tokens)
    fresh = CachedDecoder(make_decoder(spec.bundle, spec.manifest.graph("target"), spec.context))
    fresh.sync(spec.target.tokens)
    np.testing.assert_allclose(spec.decoder.kv.data[..., :pos, :], fresh.kv.data[..., :pos, :], atol=1e-4)


def _exact_pairs(engine: Engine, ids: list[int], params: SamplingParams) -> np.ndarray:
    """P(x1, x2) of target-only sampling: p(x1) * p(x2 | x1), flattened [V * V]."""
    process = make_logits_processor(params)
    target = engine.target
    logits, _ = target.sync(ids)
    p1 = process(logits[-1])
    vocab = p1.size
    joint = np.zeros((vocab, vocab))
    for x1 in np.flatnonzero(p1 > 0):
        logits, _ = target.sync([*ids, int(x1)])
        joint[x1] = p1[x1] * process(logits[-1])
    return joint.ravel()


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=7),
                                    SamplingParams(temperature=0.8, top_p=0.7, seed=11)],
                         ids=["t1", "t0.8-top_p0.7"])
def test_sampled_pairs_follow_the_target_distribution(tiny_bundle, tiny_draft_bundle, params):
    """4,000 speculative continuations of 2 tokens against the exact target distribution (chi-square, p = 0.001).

    The draft (another model) proposes x2, so x2 passes through the accept/resample rule."""
    spec = _engine(tiny_bundle, draft=str(tiny_draft_bundle), draft_min=1, draft_max=1, adaptive=False)
    spec.drafter.threshold = 0.0
    ids = _prompt_ids(spec, "Hello! How")
    exact = _exact_pairs(spec, ids, params)
    vocab = int(np.sqrt(exact.size))
    counts = np.zeros(exact.size)
    drafted = accepted = 0
    for i in range(4000):
        x1, x2 = spec.generate_step(ids, SamplingParams(params.temperature, params.top_k, params.top_p, seed=i),
                                    max_tokens=2)
        counts[x1 * vocab + x2] += 1
        drafted += spec.last_stats.drafted_tokens
        accepted += spec.last_stats.accepted_tokens
    assert drafted == 4000 and 0 < accepted < drafted  # both branches of the rule ran
    stat, dof = chi_square(counts, exact)
    assert stat < chi2_critical(dof), f"chi-square {stat:.1f} with {dof} dof"


def test_sampling_with_lookup_then_model_follows_the_target_distribution(tiny_bundle, tiny_draft_bundle):
    """The same chi-square test with proposals from both sources: lookup (one-hot q) where x1 occurred in the
    prompt (a 1-token match here, so that it happens often), the draft model (its q) elsewhere."""
    from edge_runtime.drafters import NgramDrafter
    params = SamplingParams(temperature=1.0)
    spec = _engine(tiny_bundle, draft=f"ngram+{tiny_draft_bundle}", draft_min=1, draft_max=1, adaptive=False)
    spec.drafter.lookup = NgramDrafter(max_n=1, min_n=1)
    spec.drafter.model.threshold = 0.0
    ids = list(range(3, 80))  # many distinct tokens: x1 is often one of them
    exact = _exact_pairs(spec, ids, params)
    vocab = int(np.sqrt(exact.size))
    lookup = _count_calls(spec.drafter.lookup, "propose")
    counts = np.zeros(exact.size)
    drafted = accepted = 0
    for i in range(4000):
        x1, x2 = spec.generate_step(ids, SamplingParams(1.0, seed=i), max_tokens=2)
        counts[x1 * vocab + x2] += 1
        drafted += spec.last_stats.drafted_tokens
        accepted += spec.last_stats.accepted_tokens
    looked_up = sum(map(bool, lookup))
    assert drafted == 4000 and 0 < accepted < drafted and 200 < looked_up < 3800  # both sources, both branches
    stat, dof = chi_square(counts, exact)
    assert stat < chi2_critical(dof), f"chi-square {stat:.1f} with {dof} dof"


def test_the_test_can_fail_a_biased_sampler(tiny_bundle):
    """The same statistic rejects draws from the draft-free distribution at another temperature."""
    engine = _engine(tiny_bundle)
    ids = _prompt_ids(engine, "Hello! How")
    exact = _exact_pairs(engine, ids, SamplingParams(temperature=1.0))
    wrong = _exact_pairs(engine, ids, SamplingParams(temperature=0.8))
    counts = np.random.default_rng(0).multinomial(4000, wrong)
    stat, dof = chi_square(counts.astype(float), exact)
    assert stat > chi2_critical(dof)


@pytest.mark.parametrize("one_hot", [False, True])
def test_verify_outputs_the_target_distribution(one_hot):
    """The first token out of verify() is distributed as p, whatever q proposes."""
    rng = np.random.default_rng(0)
    vocab = 6
    p = rng.dirichlet(np.ones(vocab))
    q = rng.dirichlet(np.ones(vocab))
    logits = np.log(np.stack([p, p]))  # rows: the draft's position, the bonus position
    process = make_logits_processor(SamplingParams(temperature=1.0))
    counts = np.zeros(vocab)
    for _ in range(20000):
        x = 2 if one_hot else int(rng.choice(vocab, p=q))
        qs = None if one_hot else q[None]
        accepted, nxt = verify(logits, [x], qs, False, process, rng)
        counts[x if accepted else nxt] += 1
    stat, dof = chi_square(counts, p)
    assert stat < chi2_critical(dof)


def test_ngram_drafter_proposes_what_followed_the_last_match():
    d = NgramDrafter(max_n=3)
    history = [5, 6, 7, 8, 9, 1, 5, 6, 7]
    assert d.propose(history, 3) == [8, 9, 1]
    history.append(4)  # 7, 4 never seen: falls back to the 1-gram "4" which never occurred either
    assert d.propose(history, 3) == []


def test_draft_length_backs_off_when_drafts_do_not_pay():
    length = DraftLength(1, 4)
    assert length.next_k() == 0  # measures a plain step first
    length.record(0, 0, 0, 0.010)
    for _ in range(30):  # the draft costs half a target step and is never accepted
        length.record(4, 4, 0, 0.010 + 4 * 0.005)
    ks = [length.next_k() for _ in range(32)]
    assert ks.count(0) >= 30 and max(ks) == 1  # off, with rare probes
    for _ in range(30):  # a cheap draft that is always accepted
        length.record(4, 4, 4, 0.010 + 4 * 0.0003)
    assert length.next_k() == 4


def test_draft_length_goes_off_when_drafting_rounds_deliver_less_than_plain_ones():
    """A draft that is right when it proposes, but most rounds stops before its first token (its step paid, no
    token): the per-draft model looks good, the delivered tokens per second do not."""
    length = DraftLength(1, 4)
    length.record(0, 0, 0, 0.010)
    for i in range(40):
        if i % 4:
            length.record(4, 0, 0, 0.014)            # asked, proposed nothing: 1 token in 1.4 plain rounds
        else:
            length.record(4, 1, 1, 0.010 + 0.005)    # proposed 1, accepted: 2 tokens in 1.5 rounds
    assert [length.next_k() for _ in range(8)].count(0) == 8


def test_draft_length_counts_what_a_draft_adds_to_the_whole_round():
    """Accepted 80% of the time, but each draft adds 60% of a plain round (its steps, the longer verify, the
    Python between): E(1) = 1.8 tokens for 1.6 rounds' time is a gain, so k >= 1; at 95% of a plain round per draft
    no k pays and the draft goes off."""
    length = DraftLength(1, 4)
    length.record(0, 0, 0, 0.010)
    for _ in range(40):
        length.record(2, 2, 2 if _ % 5 else 1, 0.010 + 2 * 0.006)
    assert length.next_k() >= 1
    for _ in range(60):
        length.record(2, 2, 2 if _ % 5 else 1, 0.010 + 2 * 0.0095)
    assert [length.next_k() for _ in range(8)].count(0) == 8


def test_draft_errors(tiny_bundle, tmp_path):
    with pytest.raises(InvalidArgumentError, match="draft-max"):
        Engine(Bundle.load(tiny_bundle), draft="ngram", draft_max=0)
    with pytest.raises(InvalidArgumentError, match="draft-max"):
        Engine(Bundle.load(tiny_bundle), draft="ngram", draft_max=16)
    with pytest.raises(BundleError, match="no self-draft"):
        Engine(Bundle.load(tiny_bundle), draft="self")
    from export.pipeline import export_bundle
    import tiny
    other = tmp_path / "other"
    save_tiny(other, seed=2, layers=1)
    # another family: a different vocabulary
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(other)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    model = tiny.make_model(len(tok), seed=2, layers=1)
    model.save_pretrained(other)
    bundle = export_bundle(str(other), tmp_path / "other-bundle")
    with pytest.raises(BundleError, match="vocabulary"):
        Engine(Bundle.load(tiny_bundle), draft=str(bundle.path))


@pytest.mark.parametrize("args, word", [(["--draft", "ngram", "--draft-max", "0"], "draft-max"),
                                        (["--draft", "self"], "self-draft"),
                                        (["--draft", "nosuch-card"], "no model card"),
                                        (["--draft", "ngram+"], "ngram+self"),
                                        (["--draft", "ngram+ngram"], "ngram+self"),
                                        (["--draft", "ngram+self"], "self-draft")])
def test_draft_errors_on_the_command_line(tiny_bundle, args, word):
    result = CliRunner().invoke(cli, ["generate", str(tiny_bundle), "-p", "hi", *args])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and word in lines[0]


def test_generate_with_a_draft_prints_speculation_stats(tiny_bundle):
    result = CliRunner().invoke(cli, ["generate", str(tiny_bundle), "-p", "hi", "--draft", "target", "--stats",
                                      "--max-tokens", "16"])
    assert result.exit_code == 0, result.output
    plain = CliRunner().invoke(cli, ["generate", str(tiny_bundle), "-p", "hi", "--max-tokens", "16"])
    assert result.stdout == plain.stdout
    assert "acceptance" in result.stderr


def test_bench_compares_drafts_side_by_side(tiny_bundle):
    import json
    prompts = ["--prompt", "chat=Hello! How are you?", "--prompt", "copy=Repeat: the quick brown fox jumps",
               "--prompt", "summarize=Paris is the capital of France", "--prompt", "code=def add(a, b):"]
    result = CliRunner().invoke(cli, ["bench", str(tiny_bundle), "--runs", "1", "--max-tokens", "12", "--draft",
                                      "ngram", "--draft", "target", "--json", *prompts])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {(r["draft"], r["prompt"]) for r in rows} == {(d, p) for d in ("none", "ngram", "target")
                                                          for p in ("chat", "summarize", "copy", "code")}
    assert all(r["identical"] for r in rows)
    assert all(r["speedup"] == 1.0 for r in rows if r["draft"] == "none")
    assert all(r["acceptance_rate"] == 1.0 for r in rows if r["draft"] == "target" and r["calls_per_token"] < 1)
    table = CliRunner().invoke(cli, ["bench", str(tiny_bundle), "--runs", "1", "--max-tokens", "8", *prompts])
    assert table.exit_code == 0 and "speedup" in table.stdout and "ngram" in table.stdout


def test_bench_flips_the_draft_order_every_run(tiny_bundle, monkeypatch):
    """Whatever always ran first would carry the machine's drift (an INT4 target read 0.87x with ngram for it)."""
    from edge_runtime.bench import run_bench
    engine = _engine(tiny_bundle)
    order = []
    set_draft = engine.set_draft
    monkeypatch.setattr(engine, "set_draft", lambda draft, *a: (order.append(draft), set_draft(draft, *a)))
    rows = run_bench(engine, ["ngram", "target"], prompts={"p": "Hello"}, runs=2, max_tokens=4)
    assert order == ["none", "ngram", "target", "target", "ngram", "none", "none", "ngram", "target"]
    assert [r.draft for r in rows] == ["none", "ngram", "target"] and all(r.identical for r in rows)


def test_memory_plan_of_lookup_then_model_counts_the_model(tiny_self_bundle):
    from edge_runtime.memory import plan_memory
    b = Bundle.load(tiny_self_bundle)
    assert plan_memory(b, 64, "ngram+self").total == plan_memory(b, 64, "self").total > plan_memory(b, 64, "ngram").total


def test_a_model_draft_reads_the_prompt_during_the_prefill(tiny_bundle, tiny_draft_bundle):
    """The draft's cache holds the prompt before the first token is out, so no decoding round pays for it, and
    the prefill time counts it; the next turn reuses the draft's cached prefix like the target's."""
    spec = _engine(tiny_bundle, draft=f"ngram+{tiny_draft_bundle}", adaptive=False)
    ids = _prompt_ids(spec, PROMPTS[1])
    steps = spec.generate_step(ids, max_tokens=8)
    next(steps)  # the prefill is done, nothing decoded yet
    assert spec.drafter.model.model.tokens == ids
    steps.close()
    decoder, fed = spec.drafter.model.model.decoder, []
    prefill = decoder.prefill
    decoder.prefill = lambda new, *a: (fed.append(len(new)), prefill(new, *a))[1]
    spec.generate_step(ids + [5, 6], max_tokens=1).__next__()
    assert fed == [2] and spec.drafter.model.model.tokens == ids + [5, 6]  # only the two new ids ran


def test_bench_of_a_bundle_with_a_self_draft_compares_every_kind_by_default(tiny_self_bundle):
    import json
    result = CliRunner().invoke(cli, ["bench", str(tiny_self_bundle), "--runs", "1", "--max-tokens", "4", "--json",
                                      "--prompt", "p=Hello"])
    assert result.exit_code == 0, result.output
    assert [r["draft"] for r in json.loads(result.stdout)] == ["none", "ngram", "self", "ngram+self"]
    assert all(r["identical"] for r in json.loads(result.stdout))
