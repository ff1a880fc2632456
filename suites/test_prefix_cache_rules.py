"""The prefix-caching rules every target is held to (``pytest --target NAME``).

Each rule names the capabilities it needs (``needs``); on a target without one it is reported
not applicable. Every rule that takes the hit path asserts the exact cached-token count the
target's declared granularity predicts, and every output equals the same target's cache-off
output token for token. References are taken first: a target may empty its cache to make them.
"""

import pytest

from suites.targets.scenario import Scenario

pytestmark = pytest.mark.model

MAX_TOKENS = 6


def needs(*capabilities: str):
    return pytest.mark.needs(*capabilities)


def assert_hit(completion, expected: int, where: str) -> None:
    assert completion.cached_tokens == expected, f"{where}: cached_tokens {completion.cached_tokens}, expected {expected}"


@needs("prefix_cache", "cached_tokens", "cache_off")
def test_a_repeated_prompt_is_served_from_the_cache_up_to_its_last_token(scenario: Scenario):
    prompt = scenario.prompts.family(41)
    (reference,) = scenario.target.reference([prompt], MAX_TOKENS)
    cold, expected = scenario.run_one(prompt, MAX_TOKENS)
    assert expected == 0
    assert_hit(cold, 0, "cold")
    assert cold.token_ids == reference
    warm, expected = scenario.run_one(prompt, MAX_TOKENS)
    assert expected > 0, "the scenario must take the hit path"
    assert_hit(warm, expected, "repeat")
    assert warm.token_ids == reference


@needs("prefix_cache", "cached_tokens", "cache_off")
def test_prompts_sharing_a_prefix_hit_the_shared_whole_units(scenario: Scenario):
    shared = scenario.prompts.family(37)
    first = scenario.prompts.diverging(shared, 52, [])
    second = scenario.prompts.diverging(shared, 45, [first])
    references = scenario.target.reference([first, second], MAX_TOKENS)
    scenario.run_one(first, MAX_TOKENS)
    hit, expected = scenario.run_one(second, MAX_TOKENS)
    assert expected == 37 // scenario.capabilities.hit_granularity * scenario.capabilities.hit_granularity > 0
    assert_hit(hit, expected, "shared prefix")
    assert hit.token_ids == references[1]


@needs("prefix_cache", "cached_tokens", "cache_off")
@pytest.mark.parametrize("shared", [1, 2, 15, 16, 17, 32])
def test_a_prefix_of_any_length_hits_its_whole_units(scenario: Scenario, shared: int):
    """One token shared is one token hit for a token trie (mlx-lm's #1495 says it never is);
    for a paged engine, the boundaries of its blocks."""
    prefix = scenario.prompts.family(shared)
    first = scenario.prompts.diverging(prefix, 40, [])
    second = scenario.prompts.diverging(prefix, 40, [first])
    (reference,) = scenario.target.reference([second], MAX_TOKENS)
    scenario.run_one(first, MAX_TOKENS)
    hit, expected = scenario.run_one(second, MAX_TOKENS)
    granularity = scenario.capabilities.hit_granularity
    assert expected == shared // granularity * granularity
    assert_hit(hit, expected, f"{shared} shared tokens")
    assert hit.token_ids == reference


@needs("prefix_cache", "cached_tokens", "cache_off")
def test_a_prompt_inside_a_cached_sequence_hits_all_of_it_but_its_last_token(scenario: Scenario):
    """The cached sequence is longer than the new prompt: served in part, never past n - 1."""
    long = scenario.prompts.family(60)
    short = long[:33]
    (reference,) = scenario.target.reference([short], MAX_TOKENS)
    scenario.run_one(long, MAX_TOKENS)
    hit, expected = scenario.run_one(short, MAX_TOKENS)
    assert expected == 32 // scenario.capabilities.hit_granularity * scenario.capabilities.hit_granularity > 0
    assert_hit(hit, expected, "prompt inside a cached one")
    assert hit.token_ids == reference


@needs("prefix_cache", "cached_tokens", "cache_off", "caches_output")
def test_a_follow_up_prompt_reuses_the_kv_of_the_previous_output(scenario: Scenario):
    prompt, _, follow_up = scenario.exchange(30, MAX_TOKENS, extra=9)
    (reference,) = scenario.target.reference([follow_up], MAX_TOKENS)
    scenario.run_one(prompt, MAX_TOKENS)
    hit, expected = scenario.run_one(follow_up, MAX_TOKENS)
    assert expected > len(prompt) // scenario.capabilities.hit_granularity * scenario.capabilities.hit_granularity
    assert_hit(hit, expected, "follow-up")
    assert hit.token_ids == reference


@needs("prefix_cache", "cached_tokens", "cache_off")
def test_a_prompt_equal_to_a_whole_previous_exchange_is_served_and_the_target_keeps_serving(scenario: Scenario):
    """Prompt + its full output as the next prompt: every token of it may be cached (mlx-lm's
    #1215: an exact full hit leaves nothing to compute and kills its generation thread)."""
    prompt, _, exchange = scenario.exchange(30, MAX_TOKENS)
    other = scenario.prompts.family(20)
    reference, other_reference = scenario.target.reference([exchange, other], MAX_TOKENS)
    scenario.run_one(prompt, MAX_TOKENS)
    hit, expected = scenario.run_one(exchange, MAX_TOKENS)
    assert expected > 0
    assert_hit(hit, expected, "whole exchange")
    assert hit.token_ids == reference
    after, _ = scenario.run_one(other, MAX_TOKENS)
    assert after.token_ids == other_reference


@needs("prefix_cache", "cached_tokens", "cache_off", "concurrent")
def test_concurrent_requests_sharing_a_prefix_equal_cache_off_and_then_hit_exactly(scenario: Scenario):
    shared = scenario.prompts.family(40)
    batch: list[list[int]] = []
    for length in (47, 55, 63, 41, 70, 52):
        batch.append(scenario.prompts.diverging(shared, length, batch))
    references = scenario.target.reference(batch, MAX_TOKENS)
    together = scenario.run(batch, MAX_TOKENS)
    assert [c.token_ids for c in together] == references
    expected = [scenario.expected_hit(prompt) for prompt in batch]
    again = scenario.run(batch, MAX_TOKENS)
    scenario.record_hits(batch, expected, again)
    assert all(hit > 0 for hit in expected)
    assert [c.cached_tokens for c in again] == expected
    assert [c.token_ids for c in again] == references


@needs("cache_off", "token_prompts")
def test_the_cache_off_output_equals_the_golden(scenario: Scenario, target_golden):
    """The target's own cache-off reference is the cache-off golden of this suite (on MLX's CPU
    backend mlx-lm and this engine agree with it bit for bit; the golden's margins keep its
    tokens stable elsewhere)."""
    prompts = [record["prompt_token_ids"] for _, record in target_golden]
    by_length: dict[int, list[int]] = {}
    for index, (case, _) in enumerate(target_golden):
        by_length.setdefault(case.max_tokens, []).append(index)
    for max_tokens, indices in by_length.items():
        outputs = scenario.target.reference([prompts[i] for i in indices], max_tokens)
        for index, output in zip(indices, outputs, strict=True):
            case, record = target_golden[index]
            assert output == record["token_ids"], case.name


@needs("prefix_cache", "cached_tokens", "token_prompts", "reset")
def test_the_golden_cases_cold_and_warm_equal_the_golden_with_exact_hits(scenario: Scenario, target_golden):
    """Every golden case, one request at a time, twice: tokens as the golden, hits as the
    target's granularity predicts from what the earlier cases left cached."""
    assert scenario.target.reset_prefix_cache() is True
    for label in ("cold", "warm"):
        for case, record in target_golden:
            completion, expected = scenario.run_one(record["prompt_token_ids"], case.max_tokens)
            assert completion.token_ids == record["token_ids"], f"{label}: {case.name}"
            assert_hit(completion, expected, f"{label}: {case.name}")
    assert sum(hit["observed"] for hit in scenario.hits) > 0


@needs("prefix_cache", "cached_tokens", "cache_salt")
def test_a_different_cache_salt_never_shares_and_the_same_salt_does(scenario: Scenario):
    prompt = scenario.prompts.family(40)
    scenario.target.generate([prompt], MAX_TOKENS, cache_salt="tenant-a")
    (other,) = scenario.target.generate([prompt], MAX_TOKENS, cache_salt="tenant-b")
    (unsalted,) = scenario.target.generate([prompt], MAX_TOKENS)
    (same,) = scenario.target.generate([prompt], MAX_TOKENS, cache_salt="tenant-a")
    granularity = scenario.capabilities.hit_granularity
    assert other.cached_tokens == 0 and unsalted.cached_tokens == 0
    assert same.cached_tokens == 39 // granularity * granularity > 0
    assert other.token_ids == unsalted.token_ids == same.token_ids


@needs("prefix_cache", "cached_tokens", "reset")
def test_after_a_reset_nothing_is_served_from_the_cache(scenario: Scenario):
    prompt = scenario.prompts.family(40)
    scenario.run_one(prompt, MAX_TOKENS)
    before_reset, expected = scenario.run_one(prompt, MAX_TOKENS)
    assert expected > 0
    assert_hit(before_reset, expected, "before the reset")
    assert scenario.target.reset_prefix_cache() is True
    scenario.cached.clear()
    after_reset, expected = scenario.run_one(prompt, MAX_TOKENS)
    assert expected == 0
    assert_hit(after_reset, 0, "after the reset")
    assert after_reset.token_ids == before_reset.token_ids


@needs("prefix_cache", "cached_tokens", "counters")
def test_the_counters_count_every_prompt_token_looked_up_and_every_token_served(scenario: Scenario):
    prompts = [scenario.prompts.family(33)]
    prompts.append(scenario.prompts.diverging(prompts[0][:20], 44, prompts))
    prompts.append(list(prompts[0]))
    queries_before, hits_before = scenario.target.counters()
    served = []
    for prompt in prompts:
        completion, expected = scenario.run_one(prompt, MAX_TOKENS)
        assert_hit(completion, expected, "counted request")
        served.append(expected)
    assert sum(served) > 0
    queries, hits = scenario.target.counters()
    assert (queries - queries_before, hits - hits_before) == (sum(map(len, prompts)), sum(served))
