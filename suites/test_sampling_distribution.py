"""The sampler's temperature, top-k and top-p shape the distribution it draws from, checked on
``sample_token`` itself: the engine-level suites compare the engine's draws with
``sample_token``, so a fault inside it moves both sides alike."""

import numpy as np

from engine import SamplingParams
from engine.sampling import sample_token


def draws(logits, params: SamplingParams, count: int = 600) -> np.ndarray:
    """``count`` seeded draws from one row of logits (seed 0, steps 0 .. count - 1)."""
    row = np.asarray(logits, dtype=np.float32)
    return np.array([sample_token(row, params, seed=0, step=step) for step in range(count)])


def test_temperature_sharpens_and_flattens_the_distribution():
    """Kills ``temperature-ignored``: softmax(logits / T), not softmax(logits)."""
    logits = [2.0, 1.0, 0.0]
    cold = draws(logits, SamplingParams(temperature=0.05, seed=0))
    assert set(cold) == {0}, "at T = 0.05 the runner-up is e^-20 times less likely"
    for temperature in (1.0, 2.0):
        expected = np.exp(np.array(logits) / temperature)
        expected /= expected.sum()
        sampled = draws(logits, SamplingParams(temperature=temperature, seed=0))
        observed = np.bincount(sampled, minlength=3) / len(sampled)
        np.testing.assert_allclose(observed, expected, atol=0.07)


def test_top_k_samples_only_the_k_most_likely_tokens():
    """Kills ``top-k-ignored``."""
    logits = np.linspace(0.0, 0.5, 10)  # nearly flat: without the cut every token shows up
    assert set(draws(logits, SamplingParams(temperature=1.0, top_k=3, seed=0))) == {7, 8, 9}
    assert set(draws(logits, SamplingParams(temperature=1.0, seed=0))) == set(range(10))


def test_top_p_keeps_the_smallest_head_whose_mass_reaches_top_p():
    """Kills ``top-p-keeps-one-more``: probabilities 0.5, 0.3, 0.15, 0.05."""
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.7, seed=0))) == {0, 1}
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.4, seed=0))) == {0}
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.9, seed=0))) == {0, 1, 2}
