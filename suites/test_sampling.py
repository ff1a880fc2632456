"""A seeded request samples the same tokens with the cache on or off, alone or in any batch;
a request without a seed draws its own numbers."""

import pytest

from engine import SamplingParams
from suites.engine_helpers import counters, token_prompts

pytestmark = pytest.mark.model


def seeded(seed: int, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=24, temperature=0.8, top_k=50, top_p=0.95, seed=seed, ignore_eos=True, **extra)


def test_seeded_sampling_is_identical_alone_in_a_batch_and_with_cache_on_or_off(llm):
    prefix = token_prompts(21, [32])[0]
    prompts = token_prompts(22, [40, 50, 45], prefix=prefix)
    params = [seeded(7), seeded(8), seeded(7)]
    llm.reconfigure(enable_prefix_caching=False)
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    llm.reconfigure(enable_prefix_caching=True)
    batched = llm.generate(prompts, params)
    assert [o.num_cached_tokens for o in batched] == [0, 32, 32]
    assert counters(llm) == (135, 64)
    assert [o.token_ids for o in batched] == alone
    warm = llm.generate(list(reversed(prompts)), list(reversed(params)))
    assert [o.token_ids for o in reversed(warm)] == alone


def test_two_requests_with_one_seed_do_not_share_sampler_state(llm):
    prompt = token_prompts(23, [20])[0]
    (alone,) = llm.generate([prompt], seeded(5))
    twins = llm.generate([prompt, prompt], [seeded(5), seeded(5)])
    assert [o.token_ids for o in twins] == [alone.token_ids, alone.token_ids]


def test_sampling_actually_samples(llm):
    prompt = token_prompts(24, [20])[0]
    outputs = llm.generate([prompt] * 4, [SamplingParams(max_tokens=24, temperature=1.5, seed=s) for s in range(4)])
    (greedy,) = llm.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True))
    assert len({tuple(o.token_ids) for o in outputs}) > 1
    assert any(o.token_ids != greedy.token_ids for o in outputs)


def test_requests_without_a_seed_draw_independently(llm):
    """Kills ``unseeded-requests-share-seed``: four unseeded requests, one prompt; each gets a
    fresh seed."""
    prompt = token_prompts(83, [20])[0]
    outputs = llm.generate([prompt] * 4, SamplingParams(max_tokens=24, temperature=1.5, ignore_eos=True))
    assert len({tuple(o.token_ids) for o in outputs}) > 1
