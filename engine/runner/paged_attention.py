"""The paged KV pool, and the per-layer cache object that plugs it into mlx-lm's layers.

mlx-lm's attention layers use three things of their cache: ``offset`` (the RoPE position
of the first new token; an array gives one per row), ``update_and_fetch(keys, values)``
(store the new K/V, return the K/V to attend over) and ``make_mask``. ``PagedLayerCache``
writes the new tokens into the pool by slot and returns the context gathered through the
block table, so mlx-lm's own layers do all the math for any architecture of that shape.

Layout, chosen by measurement on MLX's CPU backend: each layer's K (and V) is one 2-D
array of ``kv_heads * num_slots`` rows of ``head_dim``, head-major (row ``h * num_slots +
slot``). A forward's write and its gather are then one scatter and one ``take`` of whole
rows, through row indices computed once per forward and shared by every layer, and the
gather lands directly in the ``[B, heads, K, D]`` order attention wants: no transpose copy.
Gathering whole blocks of a ``[blocks, block_size, heads, D]`` pool and transposing the
result measured 6x slower; the scatter updates the pool in place (MLX donates the buffer:
the pool list holds the only reference).

Decode rows also keep their context contiguous from step to step
(``engine/runner/decode_context.py``), as mlx-lm's own caches do.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


class KVPool:
    """One K and one V array per layer, ``[kv_heads * num_slots, head_dim]``, head-major.

    The memory is sized in slots; a slot's rows do not depend on the block size, so
    ``reshape`` re-views the same memory with another block size at no cost, and a
    reconfigured engine reuses its pool instead of asking for a second one.
    """

    def __init__(self, num_layers: int, num_slots: int, block_size: int, kv_heads: int, head_dim: int, dtype) -> None:
        if num_slots % block_size:
            raise ValueError(f"{num_slots} slots do not divide into blocks of {block_size}")
        self.num_slots = num_slots
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        shape = (kv_heads * num_slots, head_dim)
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        mx.eval(self.keys, self.values)

    def reshape(self, block_size: int) -> None:
        if self.num_slots % block_size:
            raise ValueError(f"{self.num_slots} slots do not divide into blocks of {block_size}")
        self.block_size = block_size

    def rows(self, slots: np.ndarray) -> np.ndarray:
        """Pool rows of ``slots`` (any shape ``S``), shaped ``[S[0], kv_heads, *S[1:]]``, int32:
        MLX's GPU gathers and scatters take int32 indices as they are (int64 ones are first
        converted, a kernel per index array per layer)."""
        heads = np.arange(self.kv_heads, dtype=np.int64).reshape(1, -1, *([1] * (slots.ndim - 1)))
        return (heads * self.num_slots + slots[:, None]).astype(np.int32)

    def release(self) -> None:
        self.keys.clear()
        self.values.clear()


@dataclass(slots=True)
class AttentionBatch:
    """Where one forward's new tokens go and what they attend to, shared by all layers.

    ``B`` rows of ``L`` new tokens each. Row ``b`` attends to the first ``context_lens[b]``
    positions of its block table, which include its new tokens.
    """

    write_rows: mx.array | None  # [B * heads * L] pool row of each new (token, head), in [B, heads, L] order;
    # None: the tokens go to the decode context only (``DecodeContext.flush`` copies them later)
    read_rows: mx.array | None  # [B, heads, K] pool rows of each row's context, padded with valid rows
    offsets: mx.array | int  # RoPE position of each row's first new token
    mask: mx.array | str | None  # None, "causal" (aligned to the end), or bool [B, 1, 1, K]
    # Instead of read_rows: the rows' contexts kept in a DecodeContext (B rows, K positions).
    context: "DecodeContext | None" = None  # noqa: F821 (engine.runner.decode_context)
    context_write_rows: mx.array | None = None  # like write_rows, in the context's arrays
    context_rows: range = range(0)  # the context rows of this batch's rows, in order
    context_len: int = 0


def slots_for_positions(block_table: list[int], block_size: int, start: int, stop: int) -> np.ndarray:
    positions = np.arange(start, stop)
    table = np.asarray(block_table, dtype=np.int64)
    return table[positions // block_size] * block_size + positions % block_size


def prefill_batch(
    pool: KVPool, block_tables: list[list[int]], start_pos: int, num_tokens: int
) -> AttentionBatch:
    """Rows with the same chunk shape: tokens ``start_pos .. start_pos + num_tokens`` of each
    row, over its cached prefix (``block_tables[b]``)."""
    context = np.stack(
        [slots_for_positions(table, pool.block_size, 0, start_pos + num_tokens) for table in block_tables]
    )
    return AttentionBatch(
        write_rows=mx.array(pool.rows(context[:, start_pos:]).reshape(-1)),
        read_rows=mx.array(pool.rows(context)),
        offsets=start_pos,
        # The causal mask offset by the cached length; one new token sees everything.
        mask="causal" if num_tokens > 1 else None,
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
        context = self.batch.context
        return (
            self._write_and_gather(self.pool.keys, context.keys if context else None, keys),
            self._write_and_gather(self.pool.values, context.values if context else None, values),
        )

    def _write_and_gather(
        self, arrays: list[mx.array], context: list[mx.array] | None, new: mx.array
    ) -> mx.array:
        # new: [B, heads, L, D]; its rows in that order are batch.write_rows.
        rows = new.reshape(-1, new.shape[-1])
        pool = arrays[self.layer]
        if self.batch.write_rows is not None:  # a decode row's token goes to its context row only
            # In place: the Python object (still arrays[layer]) now holds the scatter's result,
            # so the old buffer's only reference is the scatter's input, which MLX donates.
            pool[self.batch.write_rows] = rows
        if context is None:
            # One take of whole rows, already in [B, heads, K, D] order and contiguous.
            return mx.take(pool, self.batch.read_rows, axis=0)
        kept = context[self.layer]
        kept[self.batch.context_write_rows] = rows
        return self.batch.context.view(kept, self.batch.context_rows, self.batch.context_len)
