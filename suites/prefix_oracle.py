"""A plain-Python prediction of prefix-cache hits, for asserting exact hit counts.

A request hits the longest run of full blocks it shares with a sequence whose KV is
cached, capped at floor((n - 1) / block_size) blocks so that its last token is computed.
A finished request's cached KV covers its prompt and all its outputs but the last (the
last sampled token is never fed back).
"""

from collections.abc import Iterable, Sequence


def shared_full_blocks(a: Sequence[int], b: Sequence[int], block_size: int) -> int:
    count = 0
    while (count + 1) * block_size <= min(len(a), len(b)):
        start = count * block_size
        if list(a[start : start + block_size]) != list(b[start : start + block_size]):
            break
        count += 1
    return count


def predicted_hit_tokens(prompt: Sequence[int], cached: Iterable[Sequence[int]], block_size: int) -> int:
    best = max((shared_full_blocks(prompt, seq, block_size) for seq in cached), default=0)
    return min(best, (len(prompt) - 1) // block_size) * block_size


def predicted_batch_hits(prompts: Sequence[Sequence[int]], cached: Iterable[Sequence[int]], block_size: int) -> list[int]:
    """Hits of prompts submitted together: each also hits the prompts admitted before it."""
    known = list(cached)
    hits = []
    for prompt in prompts:
        hits.append(predicted_hit_tokens(prompt, known, block_size))
        known.append(prompt)
    return hits


def kv_sequence(prompt: Sequence[int], output: Sequence[int]) -> list[int]:
    """The tokens whose KV a finished request leaves in the pool."""
    return [*prompt, *output[:-1]]
