"""End of text ends a request: the EOS token (unless ``ignore_eos``) or a stop token id.

The rule (``Request.append_output``): the stop token is the request's last output token,
its finish reason is "stop", also when it falls on the ``max_tokens``-th step; a request
that reaches ``max_tokens`` without one finishes with "length".
"""

import pytest

from engine import SamplingParams
from engine.models import ENDOFTEXT_ID
from suites.engine_helpers import EOS_PROMPTS, token_prompts

pytestmark = pytest.mark.model

MAX_TOKENS = 12

OTHER_PROMPT = token_prompts(7, [20])[0]


def run(llm, prompts, **params):
    return llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, **params))


@pytest.fixture(params=sorted(EOS_PROMPTS))
def model(request, llm):
    llm.reconfigure(model=request.param)
    return request.param


def test_the_model_emits_end_of_text_when_told_to_ignore_it(llm, model):
    """The guard that keeps the tests below from passing vacuously."""
    prompt, eos_step = EOS_PROMPTS[model]
    (out,) = run(llm, [prompt], ignore_eos=True)
    assert out.token_ids.index(ENDOFTEXT_ID) == eos_step
    assert len(out.token_ids) == MAX_TOKENS and out.finish_reason == "length"
    assert ENDOFTEXT_ID in llm.tokenizer.eos_token_ids


def test_end_of_text_is_the_last_token_and_the_finish_reason_is_stop(llm, model):
    prompt, eos_step = EOS_PROMPTS[model]
    (ignoring,) = run(llm, [prompt], ignore_eos=True)
    (solo_other,) = run(llm, [OTHER_PROMPT])
    assert solo_other.finish_reason == "length"
    # Batched with a request that runs on: the stopped one leaves, the other is unchanged.
    stopped, other = run(llm, [prompt, OTHER_PROMPT])
    assert stopped.token_ids == ignoring.token_ids[: eos_step + 1]
    assert stopped.finish_reason == "stop"
    assert other.token_ids == solo_other.token_ids and other.finish_reason == "length"
    assert llm.kv_manager.pool.num_used_blocks == 0


@pytest.mark.parametrize(
    ("extra_steps", "finish_reason"),
    [(0, "length"), (1, "stop")],
    ids=["max-tokens-just-before-eos", "max-tokens-ending-on-eos"],
)
def test_max_tokens_next_to_end_of_text(llm, model, extra_steps, finish_reason):
    prompt, eos_step = EOS_PROMPTS[model]
    (ignoring,) = run(llm, [prompt], ignore_eos=True)
    max_tokens = eos_step + extra_steps
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0))
    assert out.token_ids == ignoring.token_ids[:max_tokens]
    assert out.finish_reason == finish_reason


def test_a_stop_token_id_ends_a_request_even_with_ignore_eos(llm):
    (free,) = run(llm, [OTHER_PROMPT], ignore_eos=True)
    # The first token from step 2 on that did not come before: the request must stop there.
    step = next(i for i in range(2, MAX_TOKENS) if free.token_ids[i] not in free.token_ids[:i])
    (out,) = run(llm, [OTHER_PROMPT], ignore_eos=True, stop_token_ids=[free.token_ids[step]])
    assert out.token_ids == free.token_ids[: step + 1]
    assert out.finish_reason == "stop"
