"""An exception in the middle of ``generate`` leaves the engine clean and serving.

Faults are injected into the real engine: ``on_token`` raises, the real runner's
``execute`` raises on its n-th call (before computing, or after computing the step but
before the scheduler hears of it), or an admission raises once it has taken its blocks.
After the fault no request is queued or running, every block is free, the counters hold
exactly the admissions that happened, and the same call again gives the fresh engine's
tokens with exactly the predicted cache hits: a fault between steps keeps every prefix
computed so far; a fault inside a step clears the prefix cache, since that step may have
cached blocks whose K/V it never wrote.
"""

import itertools
from collections.abc import Callable

import pytest

from engine.kv import KVCacheManager, PrefixCacheStats
from engine.runner.model_runner import ModelRunner
from suites.engine_helpers import assert_same_outputs_bit_for_bit, greedy, token_prompts

pytestmark = pytest.mark.model

# Three prompts with no shared prefix. With max_num_seqs=2 the first two run together
# (execute calls 1-4: one prefill, three decodes) and the third is admitted at call 5.
LENGTHS = [40, 50, 37]
PROMPTS = token_prompts(43, LENGTHS)
PARAMS = greedy(max_tokens=4)
WARM = [32, 48, 32]  # floor((n - 1) / 16) full blocks of each prompt, in tokens
COLD = [0, 0, 0]


class InjectedFault(Exception):
    pass


# Each fault is a function of pytest's monkeypatch that patches the engine, or returns
# the ``on_token`` callback for generate (None where it patches).


def callback_raises(exception: BaseException, prompt_index: int):
    """``on_token`` raising at the first token of prompt ``prompt_index``."""

    def inject(patch) -> Callable[[int, int], None]:
        def on_token(index: int, token_id: int) -> None:
            if index == prompt_index:
                raise exception

        return on_token

    return inject


def forward_raises(call: int, after_computing: bool):
    """The runner's ``execute`` raising on its ``call``-th call, before or after computing."""

    def inject(patch) -> None:
        execute = ModelRunner.execute
        calls = itertools.count(1)

        def failing_execute(self, chunks):
            if next(calls) != call:
                return execute(self, chunks)
            if after_computing:
                execute(self, chunks)
            raise InjectedFault(f"execute call {call}")

        patch.setattr(ModelRunner, "execute", failing_execute)

    return inject


def admission_raises(call: int):
    """The manager's ``admit`` raising on its ``call``-th call, after taking the blocks."""

    def inject(patch) -> None:
        admit = KVCacheManager.admit
        calls = itertools.count(1)

        def failing_admit(self, *args, **kwargs):
            num_hit_tokens = admit(self, *args, **kwargs)
            if next(calls) == call:
                raise InjectedFault(f"admit call {call}")
            return num_hit_tokens

        patch.setattr(KVCacheManager, "admit", failing_admit)

    return inject


def assert_engine_idle(llm) -> None:
    scheduler = llm.scheduler
    assert [request.request_id for request in [*scheduler.waiting, *scheduler.running]] == []
    pool = llm.kv_manager.pool
    assert [block.block_id for block in pool.blocks if block.ref_count] == []
    assert pool.num_free_blocks == pool.num_blocks == llm.config.num_kv_blocks


@pytest.mark.parametrize(
    ("inject", "raised", "num_admitted", "cached_after"),
    [
        # Between steps: the first two prompts' prefill is computed and stays cached.
        (callback_raises(InjectedFault(), 0), InjectedFault, 2, [WARM[0], WARM[1], 0]),
        (callback_raises(KeyboardInterrupt(), 0), KeyboardInterrupt, 2, [WARM[0], WARM[1], 0]),
        # The first two completed, the third's prefill computed: all three stay cached.
        (callback_raises(InjectedFault(), 2), InjectedFault, 3, WARM),
        # Inside a step: its blocks were cached at scheduling, so the cache is cleared.
        (forward_raises(1, after_computing=False), InjectedFault, 2, COLD),
        (forward_raises(1, after_computing=True), InjectedFault, 2, COLD),
        # The third prompt's prefill fails: the completed first two lose their prefixes too.
        (forward_raises(5, after_computing=False), InjectedFault, 3, COLD),
        # The second admission fails after taking blocks, its request still in the waiting queue.
        (admission_raises(2), InjectedFault, 2, COLD),
    ],
    ids=[
        "on-token-raises",
        "on-token-keyboard-interrupt",
        "on-token-raises-after-two-completed",
        "forward-raises-before-computing",
        "forward-raises-after-computing",
        "forward-raises-after-two-completed",
        "admission-raises-holding-blocks",
    ],
)
def test_a_fault_aborts_the_whole_call_and_the_same_call_then_runs_as_on_a_fresh_engine(
    llm, monkeypatch, inject, raised, num_admitted, cached_after
):
    llm.reconfigure(max_num_seqs=2)
    reference = llm.generate(PROMPTS, PARAMS)
    assert [out.num_cached_tokens for out in reference] == COLD
    llm.reconfigure(max_num_seqs=2)  # a fresh prefix cache and zero counters

    with monkeypatch.context() as patch, pytest.raises(raised):
        llm.generate(PROMPTS, PARAMS, on_token=inject(patch))

    assert_engine_idle(llm)
    # A lookup is counted once per admission, and only the admitted were looked up.
    admitted = LENGTHS[:num_admitted]
    assert llm.prefix_cache_stats() == PrefixCacheStats(requests=num_admitted, queries=sum(admitted), hits=0)
    retry = llm.generate(PROMPTS, PARAMS)
    assert [out.num_cached_tokens for out in retry] == cached_after
    assert_same_outputs_bit_for_bit(retry, reference)
    assert_engine_idle(llm)
