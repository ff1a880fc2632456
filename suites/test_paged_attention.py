"""Paged attention equals dense attention, bit for bit on the CPU backend.

The model runner writes new K/V into a shuffled pool by slot, gathers the context back
through block tables, and lets mlx-lm's own layers do the math. Whatever the block table,
chunking, start position or batch mix, the logits must equal one dense forward of the whole
sequence without any cache.
"""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models import llama, qwen3

from engine.runner.model_runner import ChunkInput, ModelRunner, kv_geometry
from engine.runner.paged_attention import KVPool

pytestmark = [pytest.mark.model, pytest.mark.bit_exact]

VOCAB = 256
NUM_POOL_BLOCKS = 48


def _build(module, **extra):
    args = module.ModelArgs(
        model_type=module.__name__.rsplit(".", 1)[-1], hidden_size=64, num_hidden_layers=2,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-6, vocab_size=VOCAB, max_position_embeddings=1024,
        tie_word_embeddings=False, **extra,
    )
    mx.random.seed(1234)
    model = module.Model(args)
    mx.eval(model.parameters())
    return model


MODELS = {
    "qwen3": _build(qwen3, rope_theta=1_000_000.0),
    "llama": _build(llama, rope_theta=500_000.0),
}


def dense_logits(model, token_ids: list[int]) -> np.ndarray:
    logits = model(mx.array([token_ids]))[0]
    mx.eval(logits)
    return np.array(logits)


def runner_for(model, block_size: int) -> ModelRunner:
    g = kv_geometry(model)
    return ModelRunner(model, KVPool(g.num_layers, NUM_POOL_BLOCKS * block_size, block_size, g.kv_heads, g.head_dim, g.dtype))


@st.composite
def sequences(draw):
    """A few sequences, each with its own shuffled block table and chunk boundaries."""
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    num_sequences = draw(st.integers(1, 3))
    free_blocks = draw(st.permutations(range(NUM_POOL_BLOCKS)))
    result = []
    for _ in range(num_sequences):
        length = draw(st.integers(1, 40))
        num_blocks = -(-(length + 1) // block_size)  # room for one decode token
        if num_blocks > len(free_blocks):
            break
        table, free_blocks = list(free_blocks[:num_blocks]), free_blocks[num_blocks:]
        tokens = draw(st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length))
        cuts = sorted(set(draw(st.lists(st.integers(1, length - 1), max_size=3)))) if length > 1 else []
        result.append((tokens, table, [0, *cuts, length]))
    return block_size, result


@pytest.mark.parametrize("arch", sorted(MODELS))
@settings(max_examples=25)
@given(case=sequences())
def test_paged_forward_equals_dense_forward_bit_for_bit(arch, case):
    """Chunks at any start position, interleaved across sequences, then one batched decode."""
    model = MODELS[arch]
    block_size, seqs = case
    runner = runner_for(model, block_size)
    # Interleave the sequences' chunks: chunk k of every sequence, then chunk k + 1, ...
    last_logits = {}
    for round_index in range(max(len(cuts) - 1 for _, _, cuts in seqs)):
        for index, (tokens, table, cuts) in enumerate(seqs):
            if round_index + 1 < len(cuts):
                start, stop = cuts[round_index], cuts[round_index + 1]
                (last_logits[index],) = runner.execute([ChunkInput(str(index), tokens[start:stop], start, table)]).in_chunk_order()
    for index, (tokens, _, _) in enumerate(seqs):
        np.testing.assert_array_equal(last_logits[index], dense_logits(model, tokens)[-1])

    # One decode row per sequence, batched: rows of different lengths pad and mask keys.
    decodes = [ChunkInput(str(index), [7], len(tokens), table) for index, (tokens, table, _) in enumerate(seqs)]
    for row, (tokens, _, _) in zip(runner.execute(decodes).in_chunk_order(), seqs):
        np.testing.assert_array_equal(row, dense_logits(model, tokens + [7])[-1])


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_prefill_from_start_pos_uses_rope_positions_from_start_pos(arch):
    """A chunk computed at start_pos must not equal the same tokens computed at position 0."""
    model = MODELS[arch]
    runner = runner_for(model, 4)
    tokens = list(range(1, 13))
    runner.execute([ChunkInput("a", tokens[:8], 0, [0, 1, 2])])
    (at_offset,) = runner.execute([ChunkInput("a", tokens[8:], 8, [0, 1, 2])]).in_chunk_order()
    np.testing.assert_array_equal(at_offset, dense_logits(model, tokens)[-1])
    (from_zero,) = runner.execute([ChunkInput("b", tokens[8:], 0, [3])]).in_chunk_order()
    assert not np.array_equal(at_offset, from_zero)
