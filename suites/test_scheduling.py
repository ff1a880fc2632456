"""Chunked prefill, continuous batching and preemption never change what a request outputs,
and the step's token budget bounds what each step schedules, admissions included."""

import pytest

from engine import SamplingParams
from suites.engine_helpers import assert_same_outputs_bit_for_bit, counters, greedy, token_prompts

pytestmark = pytest.mark.model


def chunk_positions(scheduled) -> list[tuple[int, int]]:
    return [(chunk.start_pos, chunk.num_tokens) for chunk in scheduled]


def record_schedule(llm, record=chunk_positions) -> list:
    """Spy on the engine's scheduler: per step, ``record`` of the chunks it scheduled (by
    default the (start_pos, num_tokens) of each chunk), whether at its turn (``schedule``)
    or ahead of it (``schedule_ahead``)."""
    steps = []
    scheduler = llm.scheduler
    schedule, schedule_ahead = scheduler.schedule, scheduler.schedule_ahead

    def recording_schedule():
        scheduled = schedule()
        steps.append(record(scheduled))
        return scheduled

    def recording_schedule_ahead(previous):
        scheduled = schedule_ahead(previous)
        if scheduled is not None:
            steps.append(record(scheduled))
        return scheduled

    scheduler.schedule, scheduler.schedule_ahead = recording_schedule, recording_schedule_ahead
    return steps


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


def test_a_long_prefill_runs_in_chunks_of_the_token_budget(llm):
    """Kills ``budget-ignored-by-running-chunks``: outputs and counters are the same either
    way, so only the schedule itself shows it."""
    llm.reconfigure(max_num_batched_tokens=48)
    steps = record_schedule(llm)
    llm.generate(token_prompts(71, [200]), greedy(max_tokens=3))
    assert steps, "the schedule spy never fired"
    assert steps == [[(0, 48)], [(48, 48)], [(96, 48)], [(144, 48)], [(192, 8)], [(200, 1)], [(201, 1)]]


def test_admissions_share_the_step_token_budget(llm):
    """Kills ``admissions-not-charged-to-budget``: three 30-token prompts, a budget of 48."""
    llm.reconfigure(max_num_batched_tokens=48)
    steps = record_schedule(llm)
    outputs = llm.generate(token_prompts(72, [30, 30, 30]), greedy(max_tokens=4))
    assert steps, "the schedule spy never fired"
    assert steps[0] == [(0, 30), (0, 18)], "the second admission gets what the first left of the budget"
    assert all(sum(num_tokens for _, num_tokens in step) <= 48 for step in steps)
    assert [len(o.token_ids) for o in outputs] == [4, 4, 4]


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
    seen = record_schedule(llm, lambda scheduled: len(llm.scheduler.running))
    outputs = llm.generate(prompts, params)
    assert max(seen) == 2
    llm.reconfigure(max_num_seqs=8)
    assert_same_outputs_bit_for_bit(outputs, llm.generate(prompts, params))


def test_equal_length_chunks_at_different_start_positions_in_one_step(llm):
    """Kills ``batched-prefill-ignores-start-pos`` (otherwise only the engine state machine
    finds it, by chance): one 10-token chunk after a 16-token hit and one from position 0,
    scheduled in the same step, each run at their own positions."""
    shared = token_prompts(84, [16])[0]
    prompts = [shared + token_prompts(85, [10])[0], token_prompts(86, [10])[0]]
    params = greedy(max_tokens=4)
    llm.reconfigure(enable_prefix_caching=False)
    reference = llm.generate(prompts, params)
    llm.reconfigure(enable_prefix_caching=True)
    llm.generate([shared + [1]], greedy(max_tokens=1))  # caches the shared block
    steps = record_schedule(llm)
    outputs = llm.generate(prompts, params)
    assert steps and steps[0] == [(16, 10), (0, 10)]
    assert [o.num_cached_tokens for o in outputs] == [16, 0]
    assert_same_outputs_bit_for_bit(outputs, reference)


def test_a_request_stops_at_its_stop_token(llm):
    prompt = token_prompts(17, [12])[0]
    (free_run,) = llm.generate([prompt], greedy(max_tokens=20))
    stop = free_run.token_ids[5]
    first_stop = free_run.token_ids.index(stop)
    (stopped,) = llm.generate([prompt], SamplingParams(max_tokens=20, stop_token_ids=[stop], ignore_eos=True))
    assert stopped.token_ids == free_run.token_ids[: first_stop + 1]
    assert stopped.finish_reason == "stop" and free_run.finish_reason == "length"
