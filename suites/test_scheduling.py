"""Chunked prefill, continuous batching and preemption never change what a request outputs."""

import pytest

from engine import SamplingParams
from suites.engine_helpers import assert_same_outputs_bit_for_bit, counters, greedy, token_prompts

pytestmark = pytest.mark.model


def test_chunked_prefill_gives_the_same_outputs_as_one_chunk(llm):
    prompts = token_prompts(11, [100, 37, 64])
    params = greedy(max_tokens=12)
    unconstrained = llm.generate(prompts, params)
    for budget in (1, 7, 16, 33):
        llm.reconfigure(max_num_batched_tokens=budget, enable_prefix_caching=False)
        assert_same_outputs_bit_for_bit(llm.generate(prompts, params), unconstrained)


def test_prefill_longer_than_the_budget_is_chunked_and_still_hits(llm):
    """A 200-token prompt with a budget of 48 tokens: chunks of 48 at block-aligned starts and not."""
    llm.reconfigure(max_num_batched_tokens=48)
    prompt = token_prompts(12, [200])[0]
    params = greedy(max_tokens=6)
    cold, warm = llm.generate([prompt], params), llm.generate([prompt], params)
    assert (cold[0].num_cached_tokens, warm[0].num_cached_tokens) == (0, 192)
    assert counters(llm) == (400, 192)
    llm.reconfigure(enable_prefix_caching=False, max_num_batched_tokens=4096)
    assert_same_outputs_bit_for_bit(cold + warm, llm.generate([prompt, prompt], params))


def test_preemption_by_recompute_keeps_outputs_unchanged(llm):
    """A pool that cannot hold every running request forces preemptions; outputs must not move."""
    prompts = token_prompts(13, [30, 45, 20, 60, 33, 27])
    params = greedy(max_tokens=40)
    unconstrained = llm.generate(prompts, params)
    llm.reconfigure(block_size=8, num_kv_blocks=20, enable_prefix_caching=False)
    squeezed = llm.generate(prompts, params)
    assert llm.scheduler.num_preemptions > 0, "the pool was meant to be too small"
    assert sum(o.num_preemptions for o in squeezed) == llm.scheduler.num_preemptions
    assert_same_outputs_bit_for_bit(squeezed, unconstrained)


def test_preempted_requests_free_their_blocks_and_rehit_on_resume(llm):
    prompts = token_prompts(14, [30, 45, 20, 60, 33, 27], prefix=token_prompts(15, [16])[0])
    params = greedy(max_tokens=40)
    unconstrained = llm.generate(prompts, params)
    llm.reconfigure(block_size=8, num_kv_blocks=20)
    squeezed = llm.generate(prompts, params)
    assert llm.scheduler.num_preemptions > 0
    assert llm.kv_manager.pool.num_used_blocks == 0, "every block is returned at the end"
    stats = llm.prefix_cache_stats()
    # Each admission (first or after a preemption) is one lookup of the request's tokens so far.
    assert stats.requests == len(prompts) + llm.scheduler.num_preemptions
    assert stats.hits > 0
    assert_same_outputs_bit_for_bit(squeezed, unconstrained)


def test_max_num_seqs_bounds_the_running_batch(llm):
    llm.reconfigure(max_num_seqs=2)
    prompts = token_prompts(16, [10] * 5)
    params = greedy(max_tokens=5)
    seen = []
    original = llm.scheduler.schedule

    def recording_schedule():
        scheduled = original()
        seen.append(len(llm.scheduler.running))
        return scheduled

    llm.scheduler.schedule = recording_schedule
    outputs = llm.generate(prompts, params)
    assert max(seen) == 2
    llm.reconfigure(max_num_seqs=8)
    assert_same_outputs_bit_for_bit(outputs, llm.generate(prompts, params))


def test_a_request_stops_at_its_stop_token(llm):
    prompt = token_prompts(17, [12])[0]
    (free_run,) = llm.generate([prompt], greedy(max_tokens=20))
    stop = free_run.token_ids[5]
    first_stop = free_run.token_ids.index(stop)
    (stopped,) = llm.generate([prompt], SamplingParams(max_tokens=20, stop_token_ids=[stop], ignore_eos=True))
    assert stopped.token_ids == free_run.token_ids[: first_stop + 1]
    assert stopped.finish_reason == "stop" and free_run.finish_reason == "length"
