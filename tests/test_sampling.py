"""Sampling: parameter validation, greedy, top-k / top-p support, and the empirical distribution."""

import numpy as np
import pytest

from edge_runtime.errors import InvalidArgumentError
from edge_runtime.sampling import SamplingParams, make_logits_processor, make_sampler

# Chi-square critical value for df = 9 at significance 0.001 (chi2.ppf(0.999, 9)); the draws are seeded, so a
# correct sampler passes deterministically and a wrong distribution lands far above it.
CHI2_CRIT_DF9_P001 = 27.877


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Straightforward full-sort version of temperature -> top-k -> top-p (the HF order)."""
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    if top_k:
        order = order[:top_k]
    p = softmax(logits[order].astype(np.float64) / temperature)
    kept = 0
    mass = 0.0
    while kept < len(p) and (kept == 0 or mass < top_p):
        mass += p[kept]
        kept += 1
    out = np.zeros(len(logits))
    out[order[:kept]] = p[:kept] / p[:kept].sum()
    return out


def draw(sampler, logits: np.ndarray, n: int) -> np.ndarray:
    return np.array([sampler(logits) for _ in range(n)])


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"seed": -3}, "seed"),
    ],
)
def test_invalid_params_raise_naming_the_value(kwargs, name):
    with pytest.raises(InvalidArgumentError) as exc:
        SamplingParams(**kwargs)
    message = str(exc.value)
    assert name in message and "\n" not in message
    assert repr(next(iter(kwargs.values()))) in message


def test_valid_edges_accepted():
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=1e-6, top_k=0, top_p=1.0).greedy
    SamplingParams(temperature=2.0, top_k=1, top_p=1e-9, seed=0)


def test_greedy_is_argmax():
    rng = np.random.default_rng(1)
    sampler = make_sampler(SamplingParams())
    process = make_logits_processor(SamplingParams())
    for _ in range(50):
        logits = rng.normal(size=1000).astype(np.float32)
        assert sampler(logits) == int(np.argmax(logits))
        probs = process(logits)
        assert probs.dtype == np.float64 and probs.sum() == 1.0 and probs[np.argmax(logits)] == 1.0


def test_top_k_1_is_argmax_even_when_hot():
    rng = np.random.default_rng(2)
    sampler = make_sampler(SamplingParams(temperature=5.0, top_k=1, seed=0))
    for _ in range(200):
        logits = rng.normal(size=500).astype(np.float32)
        assert sampler(logits) == int(np.argmax(logits))


def test_top_p_support_is_the_nucleus():
    # p = [0.5, 0.3, 0.15, 0.05] in shuffled positions; top_p = 0.75 -> smallest set with mass >= 0.75 is {0.5, 0.3}.
    probs = np.array([0.15, 0.5, 0.05, 0.3])
    logits = np.log(probs).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=3)
    samples = draw(make_sampler(params), logits, 3000)
    assert set(np.unique(samples).tolist()) == {1, 3}
    # Within the nucleus the mass is renormalised: 0.5 / 0.8 = 0.625.
    assert abs(np.mean(samples == 1) - 0.625) < 0.03
    np.testing.assert_allclose(make_logits_processor(params)(logits), [0, 0.625, 0, 0.375], atol=1e-6)


def test_top_p_keeps_at_least_one_token():
    logits = np.array([0.0, 3.0, 1.0], dtype=np.float32)
    params = SamplingParams(temperature=1.0, top_p=1e-9, seed=0)
    assert set(draw(make_sampler(params), logits, 200).tolist()) == {1}


def test_top_k_support():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=2000).astype(np.float32)
    top5 = set(np.argsort(-logits)[:5].tolist())
    samples = draw(make_sampler(SamplingParams(temperature=1.0, top_k=5, seed=4)), logits, 2000)
    assert set(np.unique(samples).tolist()) == top5


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 40, 1.0), (0.8, 40, 0.8), (1.0, 3, 0.5), (2.0, 0, 0.3), (1.0, 5000, 0.95)],
)
def test_processor_matches_full_sort_reference(temperature, top_k, top_p):
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=4096) * 3).astype(np.float32)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    probs = make_logits_processor(params)(logits)
    assert probs.shape == logits.shape and probs.dtype == np.float64
    assert abs(probs.sum() - 1.0) < 1e-12
    np.testing.assert_allclose(probs, reference_probs(logits, temperature, top_k, top_p), rtol=1e-9, atol=1e-15)


def test_processor_is_pure():
    logits = np.random.default_rng(6).normal(size=300).astype(np.float32)
    before = logits.copy()
    process = make_logits_processor(SamplingParams(temperature=0.9, top_k=20, top_p=0.9))
    first = process(logits)
    np.testing.assert_array_equal(process(logits), first)
    np.testing.assert_array_equal(logits, before)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_empirical_frequencies_match_softmax(temperature):
    logits = np.random.default_rng(7).normal(size=10).astype(np.float32)
    expected = softmax(logits.astype(np.float64) / temperature)
    sampler = make_sampler(SamplingParams(temperature=temperature, seed=8))
    counts = np.bincount(draw(sampler, logits, 20_000), minlength=10)
    assert chi_square(counts, expected) < CHI2_CRIT_DF9_P001
    # The bound has power: the same counts are rejected against a different temperature.
    assert chi_square(counts, softmax(logits.astype(np.float64) / (temperature * 1.5))) > CHI2_CRIT_DF9_P001


def test_large_vocab_sampling_stays_in_top_k():
    logits = np.random.default_rng(9).normal(size=49152).astype(np.float32)
    top50 = set(np.argpartition(logits, -50)[-50:].tolist())
    sampler = make_sampler(SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=9))
    assert set(draw(sampler, logits, 500).tolist()) <= top50


def test_same_seed_same_sequence_different_seed_differs():
    logits = np.zeros(1000, dtype=np.float32)  # uniform: sequences of 100 draws collide with negligible probability
    params = SamplingParams(temperature=1.0, seed=42)
    a = draw(make_sampler(params), logits, 100)
    b = draw(make_sampler(params), logits, 100)
    c = draw(make_sampler(SamplingParams(temperature=1.0, seed=43)), logits, 100)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rng_is_exposed_and_drives_the_draws():
    params = SamplingParams(temperature=1.0, seed=11)
    sampler = make_sampler(params)
    assert isinstance(sampler.rng, np.random.Generator)
    logits = np.zeros(1000, dtype=np.float32)
    first = sampler(logits)
    # Re-seeding the exposed generator replays the draw: the sampler has no other randomness.
    sampler.rng.bit_generator.state = np.random.default_rng(11).bit_generator.state
    assert sampler(logits) == first
