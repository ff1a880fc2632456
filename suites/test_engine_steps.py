"""One step at a time: requests added between steps join the running batch, and the outputs
are those of one generate call; an abort frees exactly the aborted request's blocks."""

import pytest

from engine import SamplingParams
from suites.engine_helpers import counters, token_prompts

pytestmark = pytest.mark.model


def test_requests_added_between_steps_join_the_running_batch_with_generates_outputs(llm):
    prefix = token_prompts(7, [48])[0]
    prompts = [prefix + tail for tail in token_prompts(8, [9, 13, 20, 5])]
    params = SamplingParams(max_tokens=7, ignore_eos=True)
    expected = llm.generate(prompts, params)
    expected_hits = [o.num_cached_tokens for o in llm.generate(prompts, params)]
    llm.reset_prefix_cache()
    llm.generate(prompts, params)  # the same cache state as before the second pass above
    ids, finished, batch_sizes = [], {}, []
    for prompt in prompts:  # one new client per step
        ids.append(llm.add_request(prompt, params))
        updates = llm.step()
        batch_sizes.append(len(updates))
        finished.update({u.request_id: u.output for u in updates if u.finished})
    while llm.has_unfinished_requests():
        finished.update({u.request_id: u.output for u in llm.step() if u.finished})
    assert max(batch_sizes) > 1, "later requests must decode beside earlier ones"
    assert [finished[i].token_ids for i in ids] == [o.token_ids for o in expected]
    assert [finished[i].num_cached_tokens for i in ids] == expected_hits
    assert all(hit > 0 for hit in expected_hits)


def test_an_abort_frees_the_request_and_the_others_finish_as_if_alone(llm):
    prompts = token_prompts(9, [40, 33])
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    (alone,) = llm.generate([prompts[1]], params)
    llm.reset_prefix_cache()
    before = counters(llm)
    kept, dropped = llm.add_request(prompts[1], params), llm.add_request(prompts[0], params)
    llm.step()
    assert llm.abort(dropped) is True
    assert llm.abort(dropped) is False
    outputs = {}
    while llm.has_unfinished_requests():
        outputs.update({u.request_id: u.output for u in llm.step() if u.finished})
    assert list(outputs) == [kept] and outputs[kept].token_ids == alone.token_ids
    assert llm.kv_manager.pool.num_used_blocks == 0
    assert counters(llm) == (before[0] + 73, before[1])  # both were admitted in the first step


def test_a_bad_request_is_refused_and_queues_nothing(llm):
    with pytest.raises(ValueError, match="max_tokens"):
        llm.add_request([1, 2, 3], SamplingParams(max_tokens=0))
    assert not llm.has_unfinished_requests()
