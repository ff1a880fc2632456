"""The request limits at their exact edges: on the edge a request runs, one token over it
is refused with a ValueError naming the limit, before any work, and the engine serves on.

The rules (``LLM._make_request``): prompt + max_tokens <= max_model_len; and the pool
must hold prompt + max_tokens - 1 tokens (the last sampled token is never written to the
KV cache), that is ceil((prompt + max_tokens - 1) / block_size) <= num_kv_blocks.
"""

import re

import pytest

from suites.engine_helpers import greedy, token_prompts

pytestmark = pytest.mark.model

SMALL = token_prompts(5, [3])[0]  # served with the refused request, in the same call


def prompt_of(length: int) -> list[int]:
    return token_prompts(length, [length])[0]


def assert_refused_before_any_work(llm, prompt_len: int, max_tokens: int, message: str) -> None:
    stats = llm.prefix_cache_stats()
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate([SMALL, prompt_of(prompt_len)], [greedy(max_tokens=1), greedy(max_tokens=max_tokens)])
    assert llm.prefix_cache_stats() == stats
    assert not llm.scheduler.has_unfinished()
    assert llm.kv_manager.pool.num_used_blocks == 0


def assert_runs(llm, prompt_len: int, max_tokens: int) -> None:
    (out,) = llm.generate([prompt_of(prompt_len)], greedy(max_tokens=max_tokens))
    assert len(out.token_ids) == max_tokens and out.finish_reason == "length"
    assert llm.kv_manager.pool.num_used_blocks == 0


def one_token_more(prompt_len: int, max_tokens: int) -> list[tuple[int, int]]:
    return [(prompt_len + 1, max_tokens), (prompt_len, max_tokens + 1)]


@pytest.mark.parametrize(("prompt_len", "max_tokens"), [(40, 8), (47, 1), (1, 47)])
def test_a_request_of_exactly_max_model_len_runs_and_one_token_more_is_refused(llm, prompt_len, max_tokens):
    llm.reconfigure(max_model_len=48)
    for longer, more in one_token_more(prompt_len, max_tokens):
        message = f"prompt of {longer} tokens + max_tokens={more} exceeds max_model_len=48"
        assert_refused_before_any_work(llm, longer, more, message)
    assert_runs(llm, prompt_len, max_tokens)


# Each writes exactly 64 tokens of K/V: the 4 blocks of 16 slots of the whole pool.
@pytest.mark.parametrize(("prompt_len", "max_tokens"), [(60, 5), (64, 1), (1, 64)])
def test_a_request_that_exactly_fills_the_pool_runs_and_one_token_more_is_refused(
    llm, prompt_len, max_tokens
):
    llm.reconfigure(num_kv_blocks=4)
    message = "a request of 65 tokens needs 5 blocks; the pool has num_kv_blocks=4"
    for longer, more in one_token_more(prompt_len, max_tokens):
        assert_refused_before_any_work(llm, longer, more, message)
    assert_runs(llm, prompt_len, max_tokens)
