"""With the prefix cache on, outputs equal the cache-off outputs bit for bit, and the
cache is provably used: every test asserts each request's exact ``num_cached_tokens``
and the exact change of the ``queries`` and ``hits`` counters."""

import pytest

from suites.engine_helpers import assert_same_outputs_bit_for_bit, counters, greedy, token_prompts
from suites.prefix_oracle import kv_sequence, predicted_batch_hits

pytestmark = pytest.mark.model


def cache_off_reference(llm, prompts, params):
    llm.reconfigure(enable_prefix_caching=False)
    outputs = llm.generate(prompts, params)
    assert counters(llm) == (0, 0), "caching off must not count lookups"
    assert all(o.num_cached_tokens == 0 for o in outputs)
    llm.reconfigure(enable_prefix_caching=True)
    return outputs


@pytest.mark.parametrize("model", ["tiny-qwen3", "tiny-llama"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_cold_and_warm_passes_equal_cache_off_with_exact_hits(llm, model, block_size):
    llm.reconfigure(model=model, block_size=block_size)
    shared = token_prompts(1, [3 * block_size + 5])[0]
    prompts = token_prompts(2, [3 * block_size + 9, 4 * block_size, 5 * block_size + 1], prefix=shared[: 3 * block_size + 2])
    prompts += token_prompts(3, [block_size - 1, block_size, block_size + 1, 2 * block_size])
    params = greedy(max_tokens=10)
    reference = cache_off_reference(llm, prompts, params)
    total = sum(len(p) for p in prompts)

    cold = llm.generate(prompts, params)
    cold_hits = predicted_batch_hits(prompts, [], block_size)
    assert [o.num_cached_tokens for o in cold] == cold_hits
    assert cold_hits[1] == 3 * block_size, "the family must share its prefix on the cold pass"
    assert counters(llm) == (total, sum(cold_hits))
    assert_same_outputs_bit_for_bit(cold, reference)

    warm = llm.generate(prompts, params)
    cached = [kv_sequence(p, o.token_ids) for p, o in zip(prompts, cold)]
    warm_hits = predicted_batch_hits(prompts, cached, block_size)
    assert [o.num_cached_tokens for o in warm] == warm_hits
    assert warm_hits == [(len(p) - 1) // block_size * block_size for p in prompts]
    assert counters(llm) == (2 * total, sum(cold_hits) + sum(warm_hits))
    assert_same_outputs_bit_for_bit(warm, reference)


def test_full_hit_still_computes_the_last_prompt_token(llm):
    """A prompt of exactly k blocks hits k - 1 of them: the last token's logits must be computed."""
    prompt = token_prompts(4, [64])[0]
    params = greedy(max_tokens=6)
    reference = cache_off_reference(llm, [prompt], params)
    llm.generate([prompt], params)
    (warm,) = llm.generate([prompt], params)
    assert warm.num_cached_tokens == 48
    assert counters(llm) == (128, 48)
    assert_same_outputs_bit_for_bit([warm], reference)


def test_blocks_filled_during_decode_are_cached_and_served(llm):
    prompt = token_prompts(5, [20])[0]
    (first,) = cache_off_reference(llm, [prompt], greedy(max_tokens=30))
    continuation = prompt + first.token_ids  # 50 tokens; KV of the first 49 is cached
    params = greedy(max_tokens=5)
    reference = cache_off_reference(llm, [continuation], params)
    llm.generate([prompt], greedy(max_tokens=30))
    (second,) = llm.generate([continuation], params)
    assert second.num_cached_tokens == 48, "blocks 2 and 3 were filled by decode steps"
    assert counters(llm) == (20 + 50, 48)
    assert_same_outputs_bit_for_bit([second], reference)


def test_identical_prompts_in_one_batch_share_blocks(llm):
    prompt = token_prompts(6, [40])[0]
    params = greedy(max_tokens=4)
    reference = cache_off_reference(llm, [prompt] * 3, params)
    outputs = llm.generate([prompt] * 3, params)
    assert [o.num_cached_tokens for o in outputs] == [0, 32, 32]
    assert counters(llm) == (120, 64)
    assert_same_outputs_bit_for_bit(outputs, reference)


def test_a_different_cache_salt_never_shares_blocks(llm):
    prompt = token_prompts(7, [50])[0]
    params = greedy(max_tokens=4)
    reference = cache_off_reference(llm, [prompt], params)
    llm.generate([prompt], params, cache_salt="alice")
    outputs = llm.generate([prompt, prompt, prompt], params, cache_salt=["bob", "alice", None])
    assert [o.num_cached_tokens for o in outputs] == [0, 48, 0]
    assert counters(llm) == (200, 48)
    assert_same_outputs_bit_for_bit(outputs, reference * 3)


def test_reset_prefix_cache_forgets_every_block(llm):
    prompt = token_prompts(8, [40])[0]
    params = greedy(max_tokens=4)
    llm.generate([prompt], params)
    assert llm.reset_prefix_cache() is True
    (after_reset,) = llm.generate([prompt], params)
    assert after_reset.num_cached_tokens == 0
    (again,) = llm.generate([prompt], params)
    assert again.num_cached_tokens == 32
    assert counters(llm) == (120, 32)


def test_switching_caching_off_and_on_in_one_engine(llm):
    prompt = token_prompts(9, [40])[0]
    params = greedy(max_tokens=4)
    (first,) = llm.generate([prompt], params)
    llm.reconfigure(enable_prefix_caching=False)
    (off,) = llm.generate([prompt], params)
    assert off.num_cached_tokens == 0 and counters(llm) == (0, 0)
    llm.reconfigure(enable_prefix_caching=True)
    (cold, warm) = llm.generate([prompt, prompt], params)
    assert (cold.num_cached_tokens, warm.num_cached_tokens) == (0, 32)
    assert counters(llm) == (80, 32)
    assert_same_outputs_bit_for_bit([off, cold, warm], [first] * 3)
