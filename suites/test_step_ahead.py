"""The next step is launched before this step's tokens reach the host (``LLM.step``,
``Scheduler.schedule_ahead``), so the device does not wait for the host's scheduling; and
nothing a request sees changes: its tokens, its hits, what stays cached, when it is admitted.

Each test checks that its run took that path (``LLM.num_steps_ahead``), and each rule here
fails without the code that keeps it.
"""

import pytest

from engine import SamplingParams
from engine.models import ENDOFTEXT_ID
from engine.runner.model_runner import ChunkInput, StepInput
from suites.engine_helpers import EOS_PROMPTS, greedy, token_prompts

pytestmark = pytest.mark.model

# The llm fixture's default model: this prompt's greedy output ends with end of text at
# output index EOS_STEP (the guard is test_end_of_text.py's first test).
EOS_PROMPT, EOS_STEP = EOS_PROMPTS["tiny-qwen3"]
STOPPING = SamplingParams(max_tokens=12)  # end of text ends it, long before max_tokens


def ahead_steps_of(llm, run):
    before = llm.num_steps_ahead
    result = run()
    return result, llm.num_steps_ahead - before


def test_every_decode_step_runs_ahead_but_none_past_the_last_token(llm):
    """Step 1 prefills (its admissions decide it); steps 2-5 are launched ahead of their turn;
    no step is launched past step 5, where both requests reach max_tokens."""
    outputs, ahead = ahead_steps_of(llm, lambda: llm.generate(token_prompts(5, [20, 33]), greedy(max_tokens=5)))
    assert [len(o.token_ids) for o in outputs] == [5, 5]
    assert ahead == 4


def test_a_request_that_may_stop_never_evicts_a_cached_block_ahead_of_its_turn(llm):
    """Blocks of 4, a pool of 6. A cached 8-token prefix P lies at the free queue's tail; the
    EOS prompt's request R takes the 4 other blocks. At the step that samples R's end of
    text, R would need a fifth block for the next step, and only P's blocks are free: taking
    one ahead would evict it, and R, stopping, would never have needed it. So that step
    waits for its token, and P still serves all 8 tokens afterwards."""
    llm.reconfigure(block_size=4, num_kv_blocks=6)
    prefix = token_prompts(81, [8])[0]
    llm.generate([prefix], greedy(max_tokens=1))
    (stopped,), ahead = ahead_steps_of(llm, lambda: llm.generate([EOS_PROMPT], STOPPING))
    assert stopped.token_ids[-1] == ENDOFTEXT_ID and len(stopped.token_ids) == EOS_STEP + 1
    assert ahead == EOS_STEP  # every step after the prefill but the one before the stop
    assert llm.kv_manager.pool.num_evictions == 0
    (again,) = llm.generate([prefix + token_prompts(82, [4])[0]], greedy(max_tokens=1))
    assert again.num_cached_tokens == 8


def test_a_stopped_request_gives_back_its_step_ahead_and_caches_only_what_it_computed(llm):
    """R's step after its end of text was launched ahead (a free block was there to take):
    R's blocks all come back, and its computed positions (prompt and outputs but the last:
    4 full blocks) are cached, the last one by the step ahead once its token was known."""
    llm.reconfigure(block_size=4, num_kv_blocks=64)
    (stopped,), ahead = ahead_steps_of(llm, lambda: llm.generate([EOS_PROMPT], STOPPING))
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) == EOS_STEP + 1
    assert ahead == EOS_STEP + 1  # the step after the stop was launched too, and dropped
    assert llm.kv_manager.pool.num_used_blocks == 0
    # 12 prompt tokens + 5 outputs; the end of text at position 16 was never computed.
    (again,) = llm.generate([EOS_PROMPT + stopped.token_ids], greedy(max_tokens=1))
    assert again.num_cached_tokens == 16


def test_a_waiting_request_is_admitted_in_the_step_after_a_stop_frees_its_seat(llm):
    """Two seats: R (stops after EOS_STEP + 1 tokens) and a long request run; a third waits.
    It takes R's seat at the very next step, as when every step waits for its tokens: a step
    launched ahead while it waited would have left it out."""
    llm.reconfigure(max_num_seqs=2)
    long_request, waiting = token_prompts(83, [20, 24])
    ids = [
        llm.add_request(EOS_PROMPT, STOPPING),
        llm.add_request(long_request, greedy(max_tokens=12)),
        llm.add_request(waiting, greedy(max_tokens=3)),
    ]
    first_token_call, finished_call = {}, {}
    before = llm.num_steps_ahead
    call = 0
    while llm.has_unfinished_requests():
        call += 1
        for update in llm.step():
            first_token_call.setdefault(update.request_id, call)
            if update.finished:
                finished_call[update.request_id] = call
    assert finished_call[ids[0]] == EOS_STEP + 1
    assert first_token_call[ids[2]] == EOS_STEP + 2
    assert llm.num_steps_ahead > before  # once the third was admitted, nothing waited


def test_an_abort_while_its_step_runs_ahead_reports_nothing_more_of_it(llm):
    """The dropped request's last token is in the step already launched when it is aborted:
    that step reports only the kept request, which finishes as if alone."""
    kept_prompt, dropped_prompt = token_prompts(84, [30, 26])
    (alone,) = llm.generate([kept_prompt], greedy(max_tokens=6))
    llm.reset_prefix_cache()
    kept = llm.add_request(kept_prompt, greedy(max_tokens=6))
    dropped = llm.add_request(dropped_prompt, greedy(max_tokens=3))
    before = llm.num_steps_ahead
    llm.step()
    llm.step()
    assert llm.num_steps_ahead - before == 2  # the dropped request's third token is being computed
    assert llm.abort(dropped)
    updates = []
    while llm.has_unfinished_requests():
        updates += llm.step()
    assert {u.request_id for u in updates} == {kept}
    assert updates[-1].output.token_ids == alone.token_ids
    assert llm.kv_manager.pool.num_used_blocks == 0


def test_a_fault_between_steps_forgets_the_step_ahead_and_keeps_the_cache(llm):
    """on_token raises while the next step is launched: that step belongs to the aborted
    call and is never read; the next request runs at once, and hits the prefix."""
    prompt = token_prompts(85, [40])[0]

    def on_token(_index: int, _token: int) -> None:
        if llm.num_steps_ahead - before == 2:
            raise KeyboardInterrupt

    before = llm.num_steps_ahead
    with pytest.raises(KeyboardInterrupt):
        llm.generate([prompt], greedy(max_tokens=8), on_token=on_token)
    assert not llm.has_unfinished_requests()
    request_id = llm.add_request(prompt, greedy(max_tokens=2))
    (update,) = llm.step()
    assert update.request_id == request_id
    while llm.has_unfinished_requests():
        (update,) = llm.step()
    assert update.output.num_cached_tokens == 32


def test_a_fed_back_token_only_continues_a_decode_row(llm):
    """The runner refuses a token from the device for a chunk that is not a decode row it holds."""
    table = list(range(4))
    with pytest.raises(ValueError, match="fed-back tokens"):
        llm._runner.execute(StepInput([ChunkInput("fresh", None, 5, table, fed_back_row=0)], fed_back=None))
