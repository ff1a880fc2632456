"""The whole engine, with a real model, through sequences that no one hand-picks.

A hypothesis state machine drives the one shared ``LLM`` (tiny-qwen3, a small KV pool so
that eviction, sharing and preemption happen often) with batches of prompts built from a
few shared segments: identical prompts, prompts that are prefixes of others, prompts ending
exactly on a block boundary, salted prompts; greedy or seeded sampling; resets; changes of
the pool limit, ``max_num_seqs`` and the token budget.

After every ``generate``:
- every output equals the cache-off reference: a dense forward of the request's sequence
  without any KV cache gives each step's logits, which must equal the engine's bit for bit
  on the CPU backend, and the sampled token must be the one those logits give;
- the counters are consistent: hits <= queries, hits a multiple of the block size, one
  lookup per admission, each ``num_cached_tokens`` within the cap, and without preemptions
  the ``num_cached_tokens`` sum to the change in hits;
- the hits are predicted by a plain-Python oracle that knows everything cached since the
  last reset: never more than the oracle allows, and exactly that while nothing has been
  evicted, so the machine cannot pass with the cache switched off;
- the pool's invariants hold after every engine step (checked by a step hook): no block in
  use is free, used + free = total; and at the end every block is free.
"""

import os
import time

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from engine import SamplingParams
from engine.sampling import sample_token
from suites.conformance_report import REPORT
from suites.engine_helpers import comparable_steps
from suites.exactness import logits_are_bit_exact_here
from suites.prefix_oracle import kv_sequence, predicted_batch_hits
from suites.run_summary import print_past_capture

pytestmark = pytest.mark.model

TOTALS = dict(runs=0, steps=0, generate_calls=0, requests=0, engine_steps=0, evictions=0, preemptions=0, hits=0, queries=0)
SALTS = [None, None, None, "tenant-a", "tenant-b"]
MAX_SEGMENTS, MAX_SEGMENT_LENGTH, MAX_TOKENS = 3, 40, 10
HEADROOM = st.sampled_from([0, 0, 1, 2, 4, 8, 16, 24])  # spare blocks beyond the longest request
# (segment ids, cut to a block boundary, salt)
PROMPTS = st.tuples(
    st.lists(st.integers(0, 3), min_size=1, max_size=MAX_SEGMENTS), st.booleans(), st.sampled_from(SALTS)
)
SAMPLING = st.one_of(
    st.builds(lambda n: SamplingParams(max_tokens=n, ignore_eos=True, return_logits=True), st.integers(1, MAX_TOKENS)),
    st.builds(
        lambda n, seed: SamplingParams(max_tokens=n, temperature=0.9, top_k=40, seed=seed, ignore_eos=True, return_logits=True),
        st.integers(1, MAX_TOKENS), st.integers(0, 3),
    ),
)


def check_pool(pool) -> None:
    free = list(pool.free_queue)
    assert all(block.ref_count == 0 for block in free), "a block in use is in the free queue"
    assert len({block.block_id for block in free}) == len(free)
    in_use = [block for block in pool.blocks if block.ref_count > 0]
    assert len(in_use) + len(free) == pool.num_blocks, "used + free != total"


class EngineMachine(RuleBasedStateMachine):
    llm = None  # the shared LLM, set by the test

    @initialize(
        block_size=st.sampled_from([4, 8, 16]),
        headroom=HEADROOM,
        max_num_seqs=st.integers(1, 4),
        budget=st.sampled_from([8, 24, 64, 512]),
        segment_lengths=st.lists(st.integers(1, MAX_SEGMENT_LENGTH), min_size=4, max_size=4),
        seed=st.integers(0, 2**16),
    )
    def configure(self, block_size, headroom, max_num_seqs, budget, segment_lengths, seed):
        TOTALS["runs"] += 1
        rng = np.random.default_rng(seed)
        self.segments = [rng.integers(1, 1024, size=n).tolist() for n in segment_lengths]
        self.block_size = block_size
        self.llm.reconfigure(
            model="tiny-qwen3", block_size=block_size, num_kv_blocks=self.pool_blocks(headroom),
            max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, enable_prefix_caching=True,
        )
        self.forget_cache()

    def pool_blocks(self, headroom: int) -> int:
        """Room for the longest possible request, plus ``headroom`` blocks: small, so it evicts."""
        longest = MAX_SEGMENTS * MAX_SEGMENT_LENGTH + MAX_TOKENS - 1
        return -(-longest // self.block_size) + headroom

    def forget_cache(self) -> None:
        self.cached: dict[str | None, list[list[int]]] = {}  # salt -> KV sequences cached since reset
        self.evictions_at_reset = self.llm.kv_manager.pool.num_evictions

    def prompt(self, segment_ids: list[int], cut_to_block: bool) -> list[int]:
        tokens = [t for index in segment_ids for t in self.segments[index]]
        if cut_to_block and len(tokens) >= self.block_size:
            tokens = tokens[: len(tokens) // self.block_size * self.block_size]
        return tokens

    @rule(requests=st.lists(st.tuples(PROMPTS, SAMPLING), min_size=1, max_size=4))
    def generate(self, requests):
        TOTALS["steps"] += 1
        prompts = [self.prompt(ids, cut) for (ids, cut, _), _ in requests]
        salts = [salt for (_, _, salt), _ in requests]
        params = [sp for _, sp in requests]
        llm, bs = self.llm, self.block_size
        before = llm.prefix_cache_stats()
        preemptions_before = llm.scheduler.num_preemptions
        evictions_before = llm.kv_manager.pool.num_evictions

        outputs = llm.generate(prompts, params, cache_salt=salts)

        after = llm.prefix_cache_stats()
        preemptions = llm.scheduler.num_preemptions - preemptions_before
        delta_hits, delta_queries = after.hits - before.hits, after.queries - before.queries
        assert after.hits <= after.queries and delta_hits % bs == 0
        assert after.requests - before.requests == len(prompts) + preemptions
        if preemptions == 0:
            assert sum(o.num_cached_tokens for o in outputs) == delta_hits
            assert delta_queries == sum(len(p) for p in prompts)

        # Hits: never more than the oracle allows; exactly that while nothing was evicted.
        predicted = self.predicted_hits(prompts, salts)
        no_eviction_yet = llm.kv_manager.pool.num_evictions == self.evictions_at_reset
        for prompt, output, hit in zip(prompts, outputs, predicted):
            assert output.num_cached_tokens <= (len(prompt) - 1) // bs * bs
            assert output.num_cached_tokens <= hit
            if no_eviction_yet:
                assert output.num_cached_tokens == hit, "a prefix that could not have been evicted was missed"

        for prompt, output, sp in zip(prompts, outputs, params):
            self.check_against_dense_reference(prompt, output, sp)
        for prompt, output, salt in zip(prompts, outputs, salts):
            self.cached.setdefault(salt, []).append(kv_sequence(prompt, output.token_ids))
        check_pool(llm.kv_manager.pool)
        assert llm.kv_manager.pool.num_used_blocks == 0

        TOTALS["generate_calls"] += 1
        TOTALS["requests"] += len(prompts)
        TOTALS["preemptions"] += preemptions
        TOTALS["evictions"] += llm.kv_manager.pool.num_evictions - evictions_before
        TOTALS["hits"] += delta_hits
        TOTALS["queries"] += delta_queries

    def predicted_hits(self, prompts, salts) -> list[int]:
        hits = []
        earlier_in_batch: dict[str | None, list[list[int]]] = {}
        for prompt, salt in zip(prompts, salts):
            known = self.cached.get(salt, []) + earlier_in_batch.get(salt, [])
            hits.append(predicted_batch_hits([prompt], known, self.block_size)[0])
            earlier_in_batch.setdefault(salt, []).append(prompt)
        return hits

    def check_against_dense_reference(self, prompt, output, params) -> None:
        sequence = prompt + output.token_ids[:-1]
        dense = self.llm._model(mx.array([sequence]))[0, len(prompt) - 1 :]
        mx.eval(dense)
        dense = np.array(dense)
        seed = params.seed if params.seed is not None else 0
        expected = [sample_token(row, params, seed, step) for step, row in enumerate(dense)]
        if logits_are_bit_exact_here():
            REPORT.record_logit_difference(float(np.abs(dense - output.logits).max()))
            np.testing.assert_array_equal(output.logits, dense)
            assert output.token_ids == expected
        elif params.greedy:
            # Logits move in the last bits here: tokens must agree up to the first near-tie.
            steps = comparable_steps(dense)
            assert output.token_ids[:steps] == expected[:steps]
            if steps:
                REPORT.record_logit_difference(float(np.abs(dense[:steps] - output.logits[:steps]).max()))
        else:
            # A seeded draw turns on exact probabilities: comparable only where logits are exact.
            REPORT.measured.steps_not_comparable += len(expected)

    @rule(
        change=st.one_of(
            st.none(),
            st.tuples(HEADROOM, st.integers(1, 4), st.sampled_from([8, 24, 64, 512])),
        )
    )
    def reset_or_change_limits(self, change):
        """Reset the prefix cache, or change the pool limit, max_num_seqs and token budget."""
        TOTALS["steps"] += 1
        if change is None:
            assert self.llm.reset_prefix_cache() is True
            assert self.llm.kv_manager.pool.cached_blocks == {}
        else:
            headroom, max_num_seqs, budget = change
            self.llm.reconfigure(
                num_kv_blocks=self.pool_blocks(headroom), max_num_seqs=max_num_seqs, max_num_batched_tokens=budget
            )
            assert self.llm.prefix_cache_stats().queries == 0
        self.forget_cache()

    @invariant()
    def pool_is_consistent(self):
        check_pool(self.llm.kv_manager.pool)


PROFILES = {  # hypothesis profile -> (examples, steps per example)
    "ci": (30, 20),
    "dev": (40, 20),
    "thorough": (200, 30),
}


def test_engine_state_machine(shared_llm, request):
    examples, steps = PROFILES.get(os.environ.get("HYPOTHESIS_PROFILE", "ci"), PROFILES["ci"])
    original_step = type(shared_llm)._step

    def checked_step(self):
        sampled = original_step(self)
        TOTALS["engine_steps"] += 1
        check_pool(self.kv_manager.pool)
        return sampled

    shared_llm._step = checked_step.__get__(shared_llm)
    EngineMachine.llm = shared_llm
    TOTALS.update(dict.fromkeys(TOTALS, 0))
    start = time.perf_counter()
    try:
        run_state_machine_as_test(
            EngineMachine,
            settings=settings(
                settings(), max_examples=examples, stateful_step_count=steps,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        del shared_llm._step
        line = ", ".join(f"{key} {value}" for key, value in TOTALS.items())
        print_past_capture(request, f"engine state machine: {line}; {time.perf_counter() - start:.1f} s")
    REPORT.record_hit_rate("engine state machine", TOTALS["hits"], TOTALS["queries"])
    assert TOTALS["hits"] > 0 and TOTALS["evictions"] > 0, "the machine never exercised hits and eviction"
