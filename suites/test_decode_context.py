"""The decode context knows its rows by request id: rows of finished requests leave at the
next step, and only rows of live requests are ever kept."""

import pytest

from engine import SamplingParams
from suites.engine_helpers import assert_same_outputs_bit_for_bit, token_prompts

pytestmark = pytest.mark.model


def test_rows_of_finished_requests_leave_at_the_next_step(llm):
    first = llm.generate(token_prompts(31, [20, 27, 33]), SamplingParams(max_tokens=4, ignore_eos=True))
    context = llm._runner.decode_context
    finished = {output.request_id for output in first}
    assert finished <= set(context.request_ids)  # the last step's rows are still there
    # A prefill-only step (max_tokens=1) runs no decode forward, so nothing but the finished
    # ids told the runner that these rows are gone.
    (second,) = llm.generate(token_prompts(32, [18]), SamplingParams(max_tokens=1, ignore_eos=True))
    assert context.request_ids == [second.request_id]


def test_decoding_rows_continue_their_rows_and_are_never_refilled(llm, monkeypatch):
    context = llm._runner.decode_context
    fills = []
    append = type(context)._append

    def counting_append(self, indices, *args):
        fills.extend(indices)
        return append(self, indices, *args)

    monkeypatch.setattr(type(context), "_append", counting_append)
    llm.generate(token_prompts(33, [20, 27, 33]), SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(fills) == 3  # one fresh row per prompt, at its prefill's last token; decodes continue them


def test_rows_of_different_lengths_decode_past_the_contexts_growth_step(llm):
    """The context grows its capacity 256 positions at a time, for continuing rows too."""
    from engine.runner.decode_context import DecodeContext

    prompts = token_prompts(34, [40, 33])
    steps = DecodeContext.GROW_LEN + 30 - 40
    params = SamplingParams(max_tokens=steps, ignore_eos=True, return_logits=True)
    together = llm.generate(prompts, params)
    alone = [llm.generate([prompt], params)[0] for prompt in prompts]
    assert_same_outputs_bit_for_bit(together, alone)
