"""Bad input raises ValueError naming the bad value, before any work; the engine keeps serving."""

import pytest

from engine import LLM, SamplingParams
from suites.engine_helpers import greedy, token_prompts

pytestmark = pytest.mark.model


@pytest.mark.parametrize(
    ("prompts", "params", "message"),
    [
        ([[]], greedy(), "empty prompt"),
        ([""], greedy(), "empty prompt"),
        ([[1, 2, 1024]], greedy(), "token id 1024"),
        ([[1, -3]], greedy(), "token id -3"),
        ([[1] * 4090], greedy(max_tokens=7), "max_model_len=4096"),
        ([[1, 2]], "not params", "sampling_params"),
        ([[1, 2], [3]], [greedy()], "2 prompts"),
    ],
    ids=["empty-ids", "empty-text", "id-past-vocab", "negative-id", "too-long", "bad-params", "params-count"],
)
def test_bad_request_raises_before_any_work_and_the_engine_keeps_serving(llm, prompts, params, message):
    good = token_prompts(31, [40])[0]
    (before,) = llm.generate([good], greedy())
    stats_before = llm.prefix_cache_stats()
    with pytest.raises(ValueError, match=message):
        # A good prompt in the same call must not be half-served either.
        llm.generate([good, *prompts] if isinstance(params, SamplingParams) else prompts, params)
    assert llm.prefix_cache_stats() == stats_before
    assert not llm.scheduler.has_unfinished()
    (after,) = llm.generate([good], greedy())
    assert after.token_ids == before.token_ids and after.num_cached_tokens == 32


@pytest.mark.parametrize(
    ("make_params", "message"),
    [
        (lambda: SamplingParams(max_tokens=0), "max_tokens must be >= 1, got 0"),
        (lambda: SamplingParams(temperature=-1.0), "temperature must be >= 0, got -1.0"),
        (lambda: SamplingParams(top_p=0.0), "top_p must be in"),
        (lambda: SamplingParams(top_k=-2), "top_k must be >= 0"),
    ],
)
def test_bad_sampling_params_raise_naming_the_value(make_params, message):
    with pytest.raises(ValueError, match=message):
        make_params()


def test_a_request_larger_than_the_whole_pool_is_refused(llm):
    llm.reconfigure(num_kv_blocks=4)
    with pytest.raises(ValueError, match="needs 5 blocks; the pool has num_kv_blocks=4"):
        llm.generate([[1] * 70], greedy(max_tokens=8))
    assert len(llm.generate([[1] * 40], greedy(max_tokens=8))[0].token_ids) == 8


@pytest.mark.parametrize("salt", [3, ""])
def test_bad_cache_salt_is_refused(llm, salt):
    with pytest.raises(ValueError, match=f"cache_salt must be a non-empty string or None, got {salt!r}"):
        llm.generate([[1, 2, 3]], greedy(), cache_salt=[salt])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(block_size=12), "block_size must be a power of two, got 12"),
        (dict(block_size=0), "block_size must be a power of two, got 0"),
        (dict(num_kv_blocks=0), "num_kv_blocks must be >= 1, got 0"),
        (dict(max_num_seqs=0), "max_num_seqs must be >= 1, got 0"),
        (dict(hash_algorithm="md5"), "unknown hash_algorithm 'md5'"),
    ],
)
def test_bad_engine_settings_are_refused_and_the_engine_keeps_its_settings(llm, kwargs, message):
    shared_defaults = llm.config
    with pytest.raises(ValueError, match=message):
        llm.reconfigure(**kwargs)
    assert llm.config == shared_defaults
    assert len(llm.generate([[1, 2, 3]], greedy())[0].token_ids) == 8


def test_unknown_model_name_is_refused_before_loading_anything():
    with pytest.raises(ValueError, match="no-such-model"):
        LLM(model="no-such-model")


def test_block_size_not_a_power_of_two_is_refused_at_construction():
    with pytest.raises(ValueError, match="block_size must be a power of two, got 24"):
        LLM(model="tiny-qwen3", block_size=24)
