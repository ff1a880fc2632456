"""The cache-off engine equals mlx-lm's own greedy generation token for token (an
independent reference: mlx-lm's KV cache and generation loop, not ours)."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from suites.engine_helpers import greedy, token_prompts

pytestmark = pytest.mark.model


def mlx_lm_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
    return [int(token) for token, _ in steps]


@pytest.mark.parametrize("model", ["tiny-qwen3", "tiny-llama"])
def test_cache_off_greedy_output_equals_mlx_lm_generation(llm, model):
    llm.reconfigure(model=model, enable_prefix_caching=False)
    prompts = token_prompts(41, [1, 2, 15, 16, 17, 63, 150])
    prompts.append(llm.tokenizer.encode("The quick brown fox jumps over the lazy dog."))
    outputs = llm.generate(prompts, greedy(max_tokens=24))
    for prompt, output in zip(prompts, outputs):
        assert output.token_ids == mlx_lm_greedy(llm._model, prompt, 24), f"prompt of {len(prompt)} tokens"
