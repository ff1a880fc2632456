"""Sampling on the device: only token ids cross to the host.

Greedy rows take ``mx.argmax`` on the device (the first maximum, as numpy's argmax: the same
token from the same logits). A row whose request keeps its logits (``return_logits``) or
draws with a temperature is copied to the host, alone: the seeded draw stays the stateless
host sampler of ``engine.sampling`` (a draw from ``(seed, step)``), identical with the cache
on or off; every other row's 151,936 logits (at the seed model's vocabulary) stay on the device.

Sampling is launched (``launch_sampling``) and collected (``collect``) apart: between the
two, the engine can feed a step's greedy tokens, still on the device, to the next step.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine.runner.model_runner import StepLogits
from engine.sampling import SamplingParams, sample_token


@dataclass(slots=True)
class LaunchedSampling:
    """One step's sampling, launched on the device; ``collect`` brings its tokens to the host."""

    params: list[SamplingParams]
    seeds: list[int]
    steps: list[int]
    greedy: list[int]  # positions (among the sampled rows) drawn by argmax on the device
    greedy_tokens: mx.array | None
    copied: list[int]  # positions whose logits are copied to the host
    copies: mx.array | None

    @property
    def device_tokens(self) -> mx.array | None:
        """Every sampled row's token, in row order, on the device; None unless every row is
        greedy (a seeded draw happens on the host, so its token exists only there)."""
        return self.greedy_tokens if len(self.greedy) == len(self.params) else None


def launch_sampling(
    logits: StepLogits, chunks: list[int], params: list[SamplingParams], seeds: list[int], steps: list[int]
) -> LaunchedSampling:
    """Start sampling after ``chunks`` (indices of the step's chunks) on the device.

    Greedy rows: one argmax over every row of the step's logits, then the sampled chunks'
    token ids gathered (a vocabulary-wide row is never gathered for them)."""
    rows = logits.rows[chunks]
    greedy = [i for i, p in enumerate(params) if p.greedy]
    copied = [i for i, p in enumerate(params) if not p.greedy or p.return_logits]
    greedy_tokens = None
    if greedy:
        greedy_tokens = mx.take(mx.argmax(logits.logits, axis=-1), mx.array(rows[greedy]))
    copies = mx.take(logits.logits, mx.array(rows[copied]), axis=0) if copied else None
    mx.async_eval(*(a for a in (greedy_tokens, copies) if a is not None))
    return LaunchedSampling(params, seeds, steps, greedy, greedy_tokens, copied, copies)


def collect(launched: LaunchedSampling) -> tuple[list[int], dict[int, np.ndarray]]:
    """Wait for the tokens; return them, and the host copies of the rows that had to be
    copied (by position among the sampled rows)."""
    tokens: list[int | None] = [None] * len(launched.params)
    if launched.greedy_tokens is not None:
        for i, token in zip(launched.greedy, launched.greedy_tokens.tolist(), strict=True):
            tokens[i] = int(token)
    copied = launched.copied
    host = dict(zip(copied, np.array(launched.copies, copy=True), strict=True)) if copied else {}
    for i in copied:
        if tokens[i] is None:
            tokens[i] = sample_token(host[i], launched.params[i], launched.seeds[i], launched.steps[i])
    return tokens, host


def sample_rows(
    logits: StepLogits, chunks: list[int], params: list[SamplingParams], seeds: list[int], steps: list[int]
) -> tuple[list[int], dict[int, np.ndarray]]:
    """Launch and collect at once."""
    return collect(launch_sampling(logits, chunks, params, seeds, steps))
