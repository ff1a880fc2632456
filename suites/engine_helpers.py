"""Small shared pieces of the engine-level suites."""

import numpy as np

from engine import SamplingParams
from suites.conformance_report import REPORT
from suites.exactness import NOISE_BOUND, logits_are_bit_exact_here

# Prompts whose greedy continuation emits the end-of-text id, and the step where it does.
# Found once by a fixed search: for seeds 0, 1, ... the 64 prompts token_prompts(seed,
# [12] * 64), each run greedily for 16 tokens with ignore_eos=True; these are the first
# hits whose end of text comes after a few other tokens (qwen3: seed 0, prompt 25; llama:
# seed 1, prompt 44). Every step up to it has a top-1/top-2 logit margin of 0.07 or more.
EOS_PROMPTS = {
    "tiny-qwen3": ([116, 11, 105, 374, 113, 81, 265, 668, 537, 281, 973, 719], 4),
    "tiny-llama": ([588, 846, 806, 64, 281, 96, 514, 986, 818, 771, 771, 346], 8),
}


def token_prompts(seed: int, lengths: list[int], prefix: list[int] | None = None, vocab: int = 1024) -> list[list[int]]:
    """Deterministic token-id prompts (ids 1.. to avoid the end-of-text id 0)."""
    rng = np.random.default_rng(seed)
    head = list(prefix or [])
    return [head + rng.integers(1, vocab, size=n - len(head)).tolist() for n in lengths]


def greedy(max_tokens: int = 8, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, return_logits=True, **extra)


def counters(llm) -> tuple[int, int]:
    stats = llm.prefix_cache_stats()
    return stats.queries, stats.hits


def comparable_steps(reference_logits: np.ndarray) -> int:
    """How many leading steps of a greedy run must give the reference's tokens here.

    All of them where logits are bit-exact. Elsewhere logits move by up to the backend's
    noise, so a step whose reference top-1/top-2 margin is below NOISE_BOUND may pick
    either token, and the run may legitimately part from the reference there: compare up
    to that step, and report the steps left uncompared.
    """
    if logits_are_bit_exact_here():
        return len(reference_logits)
    top_two = np.sort(reference_logits, axis=-1)[:, -2:]
    thin = np.flatnonzero(top_two[:, 1] - top_two[:, 0] < NOISE_BOUND)
    steps = int(thin[0]) if len(thin) else len(reference_logits)
    REPORT.measured.steps_not_comparable += len(reference_logits) - steps
    return steps


def assert_same_outputs_bit_for_bit(actual, expected) -> None:
    """Tokens equal, and logits equal bit for bit where the backend allows it (MLX's CPU
    device with its reference BLAS); elsewhere tokens equal over ``comparable_steps`` and
    the largest logit difference goes in the report."""
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        steps = comparable_steps(want.logits)
        assert got.token_ids[:steps] == want.token_ids[:steps]
        if steps:
            REPORT.record_logit_difference(float(np.abs(got.logits[:steps] - want.logits[:steps]).max()))
        if logits_are_bit_exact_here():
            np.testing.assert_array_equal(got.logits, want.logits)
