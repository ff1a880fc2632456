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

Decode rows also keep their context contiguous from step to step (``DecodeContext``), as
mlx-lm's own caches do: re-gathering every row's whole context at every step was a
memory-bound copy of the whole batch's K/V per layer, which cost more than the rest of
the step. The pool stays the source of truth; the decode context is a copy that only
ever appends, and is rebuilt from the pool for any row it cannot vouch for.
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
        """Pool rows of ``slots`` (any shape ``S``), shaped ``[S[0], kv_heads, *S[1:]]``."""
        heads = np.arange(self.kv_heads, dtype=np.int64).reshape(1, -1, *([1] * (slots.ndim - 1)))
        return heads * self.num_slots + slots[:, None]

    def release(self) -> None:
        self.keys.clear()
        self.values.clear()


@dataclass(slots=True)
class AttentionBatch:
    """Where one forward's new tokens go and what they attend to, shared by all layers.

    ``B`` rows of ``L`` new tokens each. Row ``b`` attends to the first ``context_lens[b]``
    positions of its block table, which include its new tokens.
    """

    write_rows: mx.array  # [B * heads * L] pool row of each new (token, head), in [B, heads, L] order
    read_rows: mx.array | None  # [B, heads, K] pool rows of each row's context, padded with valid rows
    offsets: mx.array | int  # RoPE position of each row's first new token
    mask: mx.array | str | None  # None, "causal" (aligned to the end), or bool [B, 1, 1, K]
    # Instead of read_rows: the rows' contexts kept in a DecodeContext (B rows, K positions).
    context: "DecodeContext | None" = None
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


def decode_batch(pool: KVPool, block_tables: list[list[int]], positions: list[int]) -> AttentionBatch:
    """One new token per row, at ``positions[b]``; shorter rows mask the padded keys."""
    block_size = pool.block_size
    context_lens = np.asarray(positions, dtype=np.int64) + 1
    context_len = int(context_lens.max())
    num_blocks = -(-context_len // block_size)
    # Pad each table with its own first block: any valid block will do, the mask hides it.
    padded = np.empty((len(block_tables), num_blocks), dtype=np.int64)
    for row, table in enumerate(block_tables):
        used = table[:num_blocks]
        padded[row, : len(used)] = used
        padded[row, len(used) :] = used[0]
    slots = (padded[:, :, None] * block_size + np.arange(block_size)).reshape(len(block_tables), -1)
    slots = slots[:, :context_len]
    new_slots = slots[np.arange(len(block_tables)), context_lens - 1][:, None]
    mask = None
    if (context_lens != context_len).any():
        mask = mx.array(np.arange(context_len)[None, :] < context_lens[:, None])[:, None, None, :]
    return AttentionBatch(
        write_rows=mx.array(pool.rows(new_slots).reshape(-1)),
        read_rows=mx.array(pool.rows(slots)),
        offsets=mx.array(np.asarray(positions)),
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
        # In place: the Python object (still arrays[layer]) now holds the scatter's result,
        # so the old buffer's only reference is the scatter's input, which MLX donates.
        pool[self.batch.write_rows] = rows
        if context is None:
            # One take of whole rows, already in [B, heads, K, D] order and contiguous.
            return mx.take(pool, self.batch.read_rows, axis=0)
        kept = context[self.layer]
        kept[self.batch.context_write_rows] = rows
        return self.batch.context.view(kept, self.batch.context_rows, self.batch.context_len)


class DecodeContext:
    """The contiguous K/V of the rows that decode together, kept from one step to the next.

    Per layer, K and V are ``[capacity_rows * heads * capacity_len, head_dim]`` arrays;
    live row ``i`` holds positions ``0 .. position`` of one request at rows
    ``(i * heads + h) * capacity_len + k``, so a decode forward attends over the view
    ``[rows, :, :K]`` without any copy, and writes only its new token (here and in the pool).

    A row is known by the block holding its last position and that position: a request
    that decoded at ``p`` in the previous decode forward comes back at ``p + 1`` with the
    same block table prefix. Rows that do not come back leave (the last row moves into
    the hole, so live rows stay ``0 .. B-1``); rows seen for the first time are filled
    from the pool, and so are the last tokens of prefill chunks (``append``), which then
    decode in place. Any other forward that writes into a block a row uses drops that row
    (``forget_blocks``), so a row is never served from a stale copy.
    """

    GROW_LEN = 256  # positions added at a time, as mlx-lm's KVCache.step

    def __init__(self, pool: KVPool, num_layers: int) -> None:
        self.pool = pool
        self.num_layers = num_layers
        self.tables: list[list[int]] = []  # per live row: the blocks of positions 0 .. position
        self.positions: list[int] = []  # per live row: the last position held
        self.capacity_rows = 0
        self.capacity_len = 0
        # The largest capacity used so far: arrays allocated again after the rows all
        # left (their memory is given back) start that large instead of regrowing.
        self.peak_rows = 0
        self.peak_len = 0
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []

    def view(self, kept: mx.array, rows: range, context_len: int) -> mx.array:
        shape = (self.capacity_rows, self.pool.kv_heads, self.capacity_len, self.pool.head_dim)
        return kept.reshape(shape)[rows.start : rows.stop, :, :context_len]

    def forget_blocks(self, blocks: set[int]) -> None:
        """Drop the rows whose context uses any of ``blocks`` (written by another forward)."""
        stale = [row for row, table in enumerate(self.tables) if not blocks.isdisjoint(table)]
        self._remove(stale)

    def prepare(
        self, block_tables: list[list[int]], positions: list[int]
    ) -> tuple[list[int], AttentionBatch]:
        """Place one new token per input row; return the rows' order in the context and the batch.

        The rows of the previous decode forward that are not among the inputs leave.
        ``order[i]`` is the input row at context row ``i``.
        """
        block_size = self.pool.block_size
        # The block holding each row's last position, and that position.
        rows = enumerate(zip(self.tables, self.positions))
        known = {(table[-1], position): row for row, (table, position) in rows}
        placed: dict[int, int] = {}  # context row -> input row
        for index, (table, position) in enumerate(zip(block_tables, positions)):
            if position == 0:
                continue
            row = known.get((table[(position - 1) // block_size], position - 1))
            if row is not None and row not in placed and table[: len(self.tables[row])] == self.tables[row]:
                placed[row] = index
        self._remove([row for row in range(len(self.tables)) if row not in placed], placed)
        order = [placed[row] for row in range(len(self.tables))]
        seen = set(order)
        fresh = [index for index in range(len(block_tables)) if index not in seen]
        order += self._append(fresh, block_tables, positions)
        return order, self._batch(0, [block_tables[i] for i in order], [positions[i] for i in order])

    def append(self, block_tables: list[list[int]], positions: list[int]) -> AttentionBatch:
        """New rows (the last token of prefill chunks), after the live ones; the batch covers only them.

        They decode at the next step, where ``prepare`` finds them in place.
        """
        first = len(self.tables)
        self._append(list(range(len(block_tables))), block_tables, positions)
        return self._batch(first, block_tables, positions)

    def _append(self, indices: list[int], block_tables: list[list[int]], positions: list[int]) -> list[int]:
        """New rows for inputs ``indices``, filled with their positions before this one from the pool."""
        self._reserve(len(self.tables) + len(indices), max(positions) + 1)
        pool_rows, target_rows = [], []
        for index in indices:
            table, position = block_tables[index], positions[index]
            if position:
                slots = slots_for_positions(table, self.pool.block_size, 0, position)[None]
                pool_rows.append(self.pool.rows(slots).reshape(-1))
                target_rows.append(self._block_rows(len(self.tables), position))
            self.tables.append(table)
            self.positions.append(position)
        if pool_rows:
            # One take and one scatter per array for all the new rows.
            source, target = mx.array(np.concatenate(pool_rows)), mx.array(np.concatenate(target_rows))
            for arrays, pool_arrays in ((self.keys, self.pool.keys), (self.values, self.pool.values)):
                for layer, kept in enumerate(arrays):
                    kept[target] = mx.take(pool_arrays[layer], source, axis=0)
        # Now, not with the forward: its pool writes must not wait on these reads of the pool
        # (a buffer still read cannot be updated in place, and would be copied whole).
        mx.eval(self.keys, self.values)
        return indices

    def _batch(self, first: int, block_tables: list[list[int]], positions: list[int]) -> AttentionBatch:
        """The batch of context rows ``first ..``, in order, each writing its token at its position."""
        block_size, heads, capacity = self.pool.block_size, self.pool.kv_heads, self.capacity_len
        new_slots = []
        context_rows = []
        for row, (table, position) in enumerate(zip(block_tables, positions), start=first):
            self.tables[row] = table[: position // block_size + 1]
            self.positions[row] = position
            new_slots.append(table[position // block_size] * block_size + position % block_size)
            context_rows.append((row * heads + np.arange(heads)) * capacity + position)
        lens = np.asarray(positions) + 1
        context_len = int(lens.max())
        mask = None
        if (lens != context_len).any():
            mask = mx.array(np.arange(context_len)[None, :] < lens[:, None])[:, None, None, :]
        return AttentionBatch(
            write_rows=mx.array(self.pool.rows(np.asarray(new_slots)[:, None]).reshape(-1)),
            read_rows=None,
            offsets=mx.array(lens - 1),
            mask=mask,
            context=self,
            context_write_rows=mx.array(np.concatenate(context_rows)),
            context_rows=range(first, first + len(positions)),
            context_len=context_len,
        )

    def _remove(self, rows: list[int], placed: dict[int, int] | None = None) -> None:
        """Drop ``rows``; live rows past the new end move into the holes (``placed`` follows them)."""
        if not rows:
            return
        gone = set(rows)
        count = len(self.tables) - len(gone)
        holes = [row for row in sorted(gone) if row < count]
        movers = [row for row in range(count, len(self.tables)) if row not in gone]
        if movers:
            self._move(movers, holes)
        for source, target in zip(movers, holes, strict=True):
            self.tables[target], self.positions[target] = self.tables[source], self.positions[source]
            if placed is not None and source in placed:
                placed[target] = placed.pop(source)
        del self.tables[count:], self.positions[count:]
        if not self.tables:
            self.keys, self.values = [], []
            self.capacity_rows = self.capacity_len = 0

    def _block_rows(self, row: int, length: int) -> np.ndarray:
        """The context rows of positions ``0 .. length-1`` of context row ``row``, [heads * length]."""
        heads = np.arange(self.pool.kv_heads)[:, None]
        return ((row * self.pool.kv_heads + heads) * self.capacity_len + np.arange(length)).reshape(-1)

    def _move(self, sources: list[int], targets: list[int]) -> None:
        lengths = [self.positions[source] + 1 for source in sources]
        source_rows = mx.array(np.concatenate([self._block_rows(r, n) for r, n in zip(sources, lengths)]))
        target_rows = mx.array(np.concatenate([self._block_rows(r, n) for r, n in zip(targets, lengths)]))
        # Copy the rows out first (a take, evaluated), so that nothing else holds the buffer
        # when the scatter runs and MLX can update it in place; a lazy take or a slice
        # (a view) of the same buffer made the scatter copy all of it.
        arrays = [*self.keys, *self.values]
        copies = [mx.take(kept, source_rows, axis=0) for kept in arrays]
        mx.eval(copies)
        for kept, copy in zip(arrays, copies, strict=True):
            kept[target_rows] = copy

    def _reserve(self, num_rows: int, context_len: int) -> None:
        """Grow the arrays (a copy, as mlx-lm's caches do) to hold the rows and positions."""
        rows = self.capacity_rows or self.peak_rows
        while rows < num_rows:
            rows = max(8, 2 * rows)
        length = self.capacity_len or self.peak_len
        if length < context_len:
            length = -(-context_len // self.GROW_LEN) * self.GROW_LEN
        if (rows, length) == (self.capacity_rows, self.capacity_len):
            return
        self.peak_rows, self.peak_len = max(self.peak_rows, rows), max(self.peak_len, length)
        heads, dim = self.pool.kv_heads, self.pool.head_dim
        dtype = self.pool.keys[0].dtype
        for arrays in (self.keys, self.values):
            if not arrays:
                shape = (rows * heads * length, dim)
                arrays.extend(mx.zeros(shape, dtype=dtype) for _ in range(self.num_layers))
                continue
            for layer, kept in enumerate(arrays):
                grown = mx.pad(
                    kept.reshape(self.capacity_rows, heads, self.capacity_len, dim),
                    [(0, rows - self.capacity_rows), (0, 0), (0, length - self.capacity_len), (0, 0)],
                )
                arrays[layer] = grown.reshape(-1, dim)
        self.capacity_rows, self.capacity_len = rows, length
