"""Sampling on the device: greedy rows send only their token id to the host."""

import mlx.core as mx
import numpy as np

from engine import SamplingParams
from engine.runner.model_runner import StepLogits
from engine.runner.sampler import sample_rows
from engine.sampling import sample_token


def logits_rows() -> mx.array:
    return mx.array(np.random.default_rng(4).standard_normal((4, 50), dtype=np.float32))


def in_order(logits: mx.array) -> StepLogits:
    return StepLogits(logits, np.arange(logits.shape[0], dtype=np.int32))


def test_sampling_reads_each_chunks_row_where_the_forwards_put_it():
    """Chunks 0, 1, 2 whose logits sit at forward rows 2, 0, 1 (a decode context's order)."""
    logits = logits_rows()[:3]
    params = [SamplingParams(), SamplingParams(return_logits=True), SamplingParams()]
    tokens, host = sample_rows(StepLogits(logits, np.array([2, 0, 1], dtype=np.int32)), [0, 1, 2], params, [0] * 3, [0] * 3)
    assert tokens == [int(np.argmax(np.array(logits[row]))) for row in (2, 0, 1)]
    np.testing.assert_array_equal(host[1], np.array(logits[0]))


def test_greedy_rows_copy_no_logits_to_the_host_and_take_the_first_maximum():
    logits = logits_rows()
    tied = mx.concatenate([logits[:1], mx.full((1, 50), 3.0)])  # every entry ties: the first wins
    tokens, host = sample_rows(in_order(tied), [0, 1], [SamplingParams(), SamplingParams()], [0, 0], [0, 0])
    assert host == {}
    assert tokens == [int(np.argmax(np.array(logits[0]))), 0]


def test_rows_that_keep_logits_or_draw_are_copied_alone_and_drawn_by_the_stateless_sampler():
    logits = logits_rows()
    params = [SamplingParams(), SamplingParams(return_logits=True), SamplingParams(temperature=0.8, top_k=5)]
    tokens, host = sample_rows(in_order(logits), [0, 2, 3], params, [11, 12, 13], [0, 4, 7])
    assert sorted(host) == [1, 2]
    np.testing.assert_array_equal(host[1], np.array(logits[2]))
    assert tokens[1] == int(np.argmax(np.array(logits[2])))
    assert tokens[2] == sample_token(np.array(logits[3]), params[2], 13, 7)
