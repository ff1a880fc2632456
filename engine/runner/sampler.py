"""Sampling on the device: only token ids cross to the host.

Greedy rows take ``mx.argmax`` on the device (the first maximum, as numpy's argmax: the same
token from the same logits). A row whose request keeps its logits (``return_logits``) or
draws with a temperature is copied to the host, alone: the seeded draw stays the stateless
host sampler of ``engine.sampling`` (a draw from ``(seed, step)``), identical with the cache
on or off; every other row's 151,936 logits (at the seed model's vocabulary) stay on the device.
"""

import mlx.core as mx
import numpy as np

from engine.sampling import SamplingParams, sample_token


def sample_rows(
    logits: mx.array, rows: list[int], params: list[SamplingParams], seeds: list[int], steps: list[int]
) -> tuple[list[int], dict[int, np.ndarray]]:
    """Tokens for ``rows`` of ``logits`` (``[chunks, vocab]``), and the host copies of the rows
    that had to be copied (by position in ``rows``)."""
    greedy = [i for i, p in enumerate(params) if p.greedy]
    copied = [i for i, p in enumerate(params) if not p.greedy or p.return_logits]
    greedy_tokens = mx.argmax(logits[mx.array([rows[i] for i in greedy])], axis=-1) if greedy else None
    copies = logits[mx.array([rows[i] for i in copied])] if copied else None
    mx.eval(*(a for a in (greedy_tokens, copies) if a is not None))
    tokens: list[int | None] = [None] * len(rows)
    if greedy_tokens is not None:
        for i, token in zip(greedy, greedy_tokens.tolist(), strict=True):
            tokens[i] = int(token)
    host = dict(zip(copied, np.array(copies, copy=True), strict=True)) if copied else {}
    for i in copied:
        if tokens[i] is None:
            tokens[i] = sample_token(host[i], params[i], seeds[i], steps[i])
    return tokens, host
