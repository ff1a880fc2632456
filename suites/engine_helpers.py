"""Small shared pieces of the engine-level suites."""

import numpy as np

from engine import SamplingParams
from suites.conformance_report import REPORT, logits_are_bit_exact_here


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


def assert_same_outputs_bit_for_bit(actual, expected) -> None:
    """Tokens equal, and logits equal bit for bit where the backend allows it (MLX's CPU
    device with its reference BLAS); elsewhere the largest difference goes in the report."""
    assert [o.token_ids for o in actual] == [o.token_ids for o in expected]
    for got, want in zip(actual, expected, strict=True):
        REPORT.record_logit_difference(float(np.abs(got.logits - want.logits).max()))
        if logits_are_bit_exact_here():
            np.testing.assert_array_equal(got.logits, want.logits)
