"""Rules that no other suite pinned down: each test here kills a mutant of ``tools/mutants``
that survived every other suite (the mutant's name is in the test's docstring).

- the per-step token budget bounds what a step schedules, admissions included, and a long
  prefill is cut into chunks of the budget (mutants ``budget-ignored-by-running-chunks``,
  ``admissions-not-charged-to-budget``): outputs and counters are the same either way, so
  only the schedule itself shows it;
- a request recomputed after a preemption caches its blocks again
  (``cached-count-kept-across-preemption``): outputs stay right, later hits silently drop;
- a salted request's first block, when a decode step fills it, carries the salt too
  (``salt-dropped-after-admission``): the other suites' salted prompts all hold a full
  block at admission, where the whole prompt is hashed with its salt;
- a lookup stops at its first miss (``hit-run-not-contiguous``): with chained hashes and
  tail-first LRU eviction a miss is never followed by a cached block, except where a hash
  collision turns a cached block into a miss;
- a request without a seed gets a fresh one (``unseeded-requests-share-seed``);
- prefill chunks of one length but different start positions in one step each run at
  their own positions (``batched-prefill-ignores-start-pos``; otherwise only the engine
  state machine finds it, by chance);
- the sampler's temperature, top-k and top-p (``temperature-ignored``, ``top-k-ignored``,
  ``top-p-keeps-one-more``): the engine-level suites compare the engine's draws with
  ``sample_token`` itself, so a fault inside it moves both sides alike.
"""

import numpy as np
import pytest

from engine import SamplingParams
from engine.kv import KVCacheManager
from engine.sampling import sample_token
from suites.engine_helpers import assert_same_outputs_bit_for_bit, greedy, token_prompts


def record_schedule(llm) -> list[list[tuple[int, int]]]:
    """Spy on the engine's scheduler: per step, the (start_pos, num_tokens) of each chunk."""
    steps: list[list[tuple[int, int]]] = []
    original = llm.scheduler.schedule

    def recording_schedule():
        scheduled = original()
        steps.append([(chunk.start_pos, chunk.num_tokens) for chunk in scheduled])
        return scheduled

    llm.scheduler.schedule = recording_schedule
    return steps


@pytest.mark.model
def test_a_long_prefill_runs_in_chunks_of_the_token_budget(llm):
    """Kills ``budget-ignored-by-running-chunks``."""
    llm.reconfigure(max_num_batched_tokens=48)
    steps = record_schedule(llm)
    llm.generate(token_prompts(71, [200]), greedy(max_tokens=3))
    assert steps, "the schedule spy never fired"
    assert steps == [[(0, 48)], [(48, 48)], [(96, 48)], [(144, 48)], [(192, 8)], [(200, 1)], [(201, 1)]]


@pytest.mark.model
def test_admissions_share_the_step_token_budget(llm):
    """Kills ``admissions-not-charged-to-budget``: three 30-token prompts, a budget of 48."""
    llm.reconfigure(max_num_batched_tokens=48)
    steps = record_schedule(llm)
    outputs = llm.generate(token_prompts(72, [30, 30, 30]), greedy(max_tokens=4))
    assert steps, "the schedule spy never fired"
    assert steps[0] == [(0, 30), (0, 18)], "the second admission gets what the first left of the budget"
    assert all(sum(num_tokens for _, num_tokens in step) <= 48 for step in steps)
    assert [len(o.token_ids) for o in outputs] == [4, 4, 4]


def test_a_request_recomputed_after_preemption_caches_its_blocks_again():
    """Kills ``cached-count-kept-across-preemption``: the scheduler re-admits a preempted
    request under the same id; blocks it fills afterwards must be cached as usual."""
    manager = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 106))
    assert manager.admit("r", tokens, token_budget=64) == 0  # blocks 0 1; block 0 cached
    manager.free("r")  # preempted
    assert manager.admit("r", tokens, token_budget=64) == 4  # hits its own block 0
    for token in (106, 107):  # two decode steps fill block 1
        tokens.append(token)
        manager.allocate_slots("r", tokens, 1, len(tokens) - 1)
    assert manager.get_computed_blocks("probe", tokens + [0])[1] == 8


@pytest.mark.model
def test_a_block_filled_by_decode_keeps_its_requests_salt(llm):
    """Kills ``salt-dropped-after-admission``: a 10-token salted prompt fills its first block
    (16 tokens) while decoding; only the same salt may hit that block."""
    prompt = token_prompts(81, [10])[0]
    (first,) = llm.generate([prompt], greedy(max_tokens=12), cache_salt="tenant-a")
    continuation = prompt + first.token_ids  # the KV of its first 21 tokens is cached
    salts = [None, "tenant-b", "tenant-a"]
    outputs = llm.generate([continuation] * 3, greedy(max_tokens=2), cache_salt=salts)
    assert [o.num_cached_tokens for o in outputs] == [0, 0, 16]


def test_a_lookup_stops_at_the_first_block_that_misses():
    """Kills ``hit-run-not-contiguous``. Every block hashes alike, so the lookup of
    [W, X, ...] finds block 0 (holding X) as a candidate for both of its blocks: W's is a
    miss (tokens differ), X's a token match, but at the wrong position after a miss."""
    manager = KVCacheManager(num_blocks=8, block_size=4)
    manager.hash_function = lambda data: b"\x00" * 32
    x, y, w = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    manager.get_computed_blocks("a", x + y + [0])
    manager.allocate_slots("a", x + y + [0], 9, 0)  # blocks 0 (x) and 1 (y) cached
    assert manager.get_computed_blocks("probe", w + x + [0]) == ([], 0)


@pytest.mark.model
def test_requests_without_a_seed_draw_independently(llm):
    """Kills ``unseeded-requests-share-seed``: four unseeded requests, one prompt."""
    prompt = token_prompts(83, [20])[0]
    outputs = llm.generate([prompt] * 4, SamplingParams(max_tokens=24, temperature=1.5, ignore_eos=True))
    assert len({tuple(o.token_ids) for o in outputs}) > 1


@pytest.mark.model
def test_equal_length_chunks_at_different_start_positions_in_one_step(llm):
    """Kills ``batched-prefill-ignores-start-pos``: one 10-token chunk after a 16-token
    hit and one from position 0, scheduled in the same step."""
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


def draws(logits, params: SamplingParams, count: int = 600) -> np.ndarray:
    """``count`` seeded draws from one row of logits (seed 0, steps 0 .. count - 1)."""
    row = np.asarray(logits, dtype=np.float32)
    return np.array([sample_token(row, params, seed=0, step=step) for step in range(count)])


def test_temperature_sharpens_and_flattens_the_distribution():
    """Kills ``temperature-ignored``: softmax(logits / T), not softmax(logits)."""
    logits = [2.0, 1.0, 0.0]
    cold = draws(logits, SamplingParams(temperature=0.05, seed=0))
    assert set(cold) == {0}, "at T = 0.05 the runner-up is e^-20 times less likely"
    for temperature in (1.0, 2.0):
        expected = np.exp(np.array(logits) / temperature)
        expected /= expected.sum()
        sampled = draws(logits, SamplingParams(temperature=temperature, seed=0))
        observed = np.bincount(sampled, minlength=3) / len(sampled)
        np.testing.assert_allclose(observed, expected, atol=0.07)


def test_top_k_samples_only_the_k_most_likely_tokens():
    """Kills ``top-k-ignored``."""
    logits = np.linspace(0.0, 0.5, 10)  # nearly flat: without the cut every token shows up
    assert set(draws(logits, SamplingParams(temperature=1.0, top_k=3, seed=0))) == {7, 8, 9}
    assert set(draws(logits, SamplingParams(temperature=1.0, seed=0))) == set(range(10))


def test_top_p_keeps_the_smallest_head_whose_mass_reaches_top_p():
    """Kills ``top-p-keeps-one-more``: probabilities 0.5, 0.3, 0.15, 0.05."""
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.7, seed=0))) == {0, 1}
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.4, seed=0))) == {0}
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.9, seed=0))) == {0, 1, 2}
