"""close() really frees an LLM, and the counters are exported in Prometheus text format."""

import mlx.core as mx
import pytest

from engine import LLM
from suites.engine_helpers import greedy, token_prompts

pytestmark = pytest.mark.model


def test_closing_fifty_engines_does_not_grow_mlx_memory(shared_llm):
    mx.clear_cache()
    baseline = mx.get_active_memory()
    closed = []  # kept alive on purpose: only close() may give their memory back
    for _ in range(50):
        with LLM(model="tiny-llama", num_kv_blocks=64, block_size=16) as engine:
            engine.generate([[1, 2, 3, 4]], greedy(max_tokens=2))
        closed.append(engine)
    mx.clear_cache()
    assert mx.get_active_memory() <= baseline


def test_a_new_engine_after_close_gets_its_full_pool(shared_llm):
    engine = LLM(model="tiny-llama", num_kv_blocks=512, block_size=16)
    engine.close()
    with LLM(model="tiny-llama", num_kv_blocks=512, block_size=16) as engine:
        assert engine.kv_manager.pool.num_free_blocks == 512
        assert engine.num_slots == 512 * 16
        prompt = token_prompts(51, [40])[0]
        engine.generate([prompt], greedy(max_tokens=2))
        assert engine.generate([prompt], greedy(max_tokens=2))[0].num_cached_tokens == 32


def test_counters_in_prometheus_text_format(llm):
    prompt = token_prompts(52, [40])[0]
    llm.generate([prompt, prompt], greedy(max_tokens=2))
    text = llm.prefix_cache_metrics()
    assert 'prefix_cache_queries_total{model_name="tiny-qwen3"} 80' in text.splitlines()
    assert 'prefix_cache_hits_total{model_name="tiny-qwen3"} 32' in text.splitlines()
    assert "# TYPE prefix_cache_hits_total counter" in text
