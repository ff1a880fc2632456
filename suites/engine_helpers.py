"""Small shared pieces of the engine-level suites."""

import numpy as np

from engine import SamplingParams


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
    """Tokens equal, and logits equal bit for bit (the CPU backend allows it)."""
    assert [o.token_ids for o in actual] == [o.token_ids for o in expected]
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(got.logits, want.logits)
