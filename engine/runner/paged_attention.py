"""The paged KV pool, and the per-layer cache object that plugs it into mlx-lm's layers.

mlx-lm's attention layers use three things of their cache: ``offset`` (the RoPE position
of the first new token; an array gives one per row), ``update_and_fetch(keys, values)``
(store the new K/V, return the K/V to attend over) and ``make_mask``. ``PagedLayerCache``
writes the new tokens into the pool by slot and returns the context gathered through the
block table, so mlx-lm's own layers do all the math for any architecture of that shape.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


class KVPool:
    """One K and one V array per layer, shaped ``[num_blocks, block_size, kv_heads, head_dim]``.

    The memory is sized in slots; ``reshape`` re-views the same slots with another block
    size, so a reconfigured engine reuses its pool instead of asking for a second one.
    """

    def __init__(self, num_layers: int, num_slots: int, block_size: int, kv_heads: int, head_dim: int, dtype) -> None:
        if num_slots % block_size:
            raise ValueError(f"{num_slots} slots do not divide into blocks of {block_size}")
        shape = (num_slots // block_size, block_size, kv_heads, head_dim)
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        mx.eval(self.keys, self.values)

    @property
    def num_slots(self) -> int:
        return self.keys[0].shape[0] * self.keys[0].shape[1]

    @property
    def block_size(self) -> int:
        return self.keys[0].shape[1]

    def reshape(self, block_size: int) -> None:
        if self.num_slots % block_size:
            raise ValueError(f"{self.num_slots} slots do not divide into blocks of {block_size}")
        num_blocks = self.num_slots // block_size
        for arrays in (self.keys, self.values):
            for layer, array in enumerate(arrays):
                arrays[layer] = array.reshape(num_blocks, block_size, *array.shape[2:])

    def release(self) -> None:
        self.keys.clear()
        self.values.clear()


@dataclass(slots=True)
class AttentionBatch:
    """Where one forward's new tokens go and what they attend to, shared by all layers.

    ``B`` rows of ``L`` new tokens each. Row ``b`` attends to the first ``context_lens[b]``
    positions of its block table, which include its new tokens.
    """

    slots: mx.array  # [B * L] pool slot of each new token, row-major
    block_tables: mx.array  # [B, max_blocks] block ids, padded with any valid id
    offsets: mx.array | int  # RoPE position of each row's first new token
    context_len: int  # K: positions gathered per row (the longest row's context)
    mask: mx.array | str | None  # None, "causal" (aligned to the end), or bool [B, 1, L, K]


def slots_for_positions(block_table: list[int], block_size: int, start: int, stop: int) -> np.ndarray:
    positions = np.arange(start, stop)
    table = np.asarray(block_table, dtype=np.int64)
    return table[positions // block_size] * block_size + positions % block_size


def prefill_batch(block_table: list[int], block_size: int, start_pos: int, num_tokens: int) -> AttentionBatch:
    """One request's chunk: tokens ``start_pos .. start_pos + num_tokens`` over its cached prefix."""
    context_len = start_pos + num_tokens
    num_blocks = -(-context_len // block_size)
    return AttentionBatch(
        slots=mx.array(slots_for_positions(block_table, block_size, start_pos, context_len)),
        block_tables=mx.array([block_table[:num_blocks]]),
        offsets=start_pos,
        context_len=context_len,
        # The causal mask offset by the cached length; one new token sees everything.
        mask="causal" if num_tokens > 1 else None,
    )


def decode_batch(block_tables: list[list[int]], block_size: int, positions: list[int]) -> AttentionBatch:
    """One new token per row, at ``positions[b]``; shorter rows mask the padded keys."""
    context_lens = np.asarray(positions) + 1
    context_len = int(context_lens.max())
    num_blocks = -(-context_len // block_size)
    padded = np.zeros((len(block_tables), num_blocks), dtype=np.int64)
    for row, table in enumerate(block_tables):
        used = table[:num_blocks]
        padded[row, : len(used)] = used
    slots = np.concatenate(
        [slots_for_positions(table, block_size, pos, pos + 1) for table, pos in zip(block_tables, positions)]
    )
    mask = None
    if (context_lens != context_len).any():
        mask = mx.array(np.arange(context_len)[None, :] < context_lens[:, None])[:, None, None, :]
    return AttentionBatch(
        slots=mx.array(slots),
        block_tables=mx.array(padded),
        offsets=mx.array(np.asarray(positions)),
        context_len=context_len,
        mask=mask,
    )


class PagedLayerCache:
    """The cache object mlx-lm's attention layer sees for one layer during one forward."""

    def __init__(self, pool: KVPool, layer: int, batch: AttentionBatch) -> None:
        self.pool = pool
        self.layer = layer
        self.batch = batch
        self.offset = batch.offsets

    def make_mask(self, num_new_tokens: int, return_array: bool = False, window_size=None):
        if window_size is not None:
            raise NotImplementedError("sliding-window attention is not supported by the paged cache")
        return self.batch.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return self._write_and_gather(self.pool.keys, keys), self._write_and_gather(self.pool.values, values)

    def _write_and_gather(self, arrays: list[mx.array], new: mx.array) -> mx.array:
        pool = arrays[self.layer]
        num_blocks, block_size, kv_heads, head_dim = pool.shape
        batch_size = new.shape[0]
        # [B, heads, L, D] -> [B * L, heads, D], written at each new token's slot.
        flat = pool.reshape(num_blocks * block_size, kv_heads, head_dim)
        flat[self.batch.slots] = new.transpose(0, 2, 1, 3).reshape(-1, kv_heads, head_dim)
        pool = flat.reshape(num_blocks, block_size, kv_heads, head_dim)
        arrays[self.layer] = pool
        # Gather whole blocks, cut to the context, back to [B, heads, K, D], contiguous:
        # attention over a strided gather measured ~8x slower than over a copy.
        context = pool[self.batch.block_tables].reshape(batch_size, -1, kv_heads, head_dim)
        context = context[:, : self.batch.context_len].transpose(0, 2, 1, 3)
        return mx.contiguous(context)
