"""Decode rows' K/V kept contiguous from one step to the next, keyed by request id.

Re-gathering every decoding row's whole context from the pool at every step was a
memory-bound copy of the whole batch's K/V per layer, which cost more than the rest of the
step; mlx-lm's own caches append instead. So does this: the pool stays the source of truth,
and a row is a copy of one request's positions ``0 .. position``, filled from the pool once
and then only appended to.

A row belongs to a request id (the runner knows which request each scheduled chunk is).
The rules that keep a row true:
- a request that decodes continues its row at the next position;
- a request that runs a prefill chunk gets a fresh row, filled from the pool at the chunk's
  last token (the chunk wrote its other positions to the pool only);
- a row whose request does not decode in a step leaves (finished, preempted, aborted, or
  left out of a step by the token budget): the rows that decode stay ``0 .. B-1``, one view.
"""

import mlx.core as mx
import numpy as np

from engine.runner.paged_attention import AttentionBatch, KVPool, slots_for_positions


class DecodeContext:
    """The contiguous K/V of the rows that decode together, kept from one step to the next.

    Per layer, K and V are ``[capacity_rows * heads * capacity_len, head_dim]`` arrays; live
    row ``i`` holds positions ``0 .. positions[i]`` of request ``request_ids[i]`` at rows
    ``(i * heads + h) * capacity_len + k``, so a decode forward attends over the view
    ``[rows, :, :K]`` without a copy and writes only its new token.

    A decode forward writes its token here only: nothing reads the pool while rows just
    decode. A row's last positions may so be held here alone (``pending``: their pool
    slots); ``flush`` copies them to the pool, in one gather and one scatter per array,
    before anything could read them there: before a step's prefill forwards (which gather
    the pool, and may hit a block a decode of the same step completed) and before any row
    leaves (a finished request's full blocks stay cached; a request left out of a step is
    refilled from the pool).
    """

    GROW_LEN = 256  # positions added at a time, as mlx-lm's KVCache.step

    def __init__(self, pool: KVPool, num_layers: int) -> None:
        self.pool = pool
        self.num_layers = num_layers
        self.request_ids: list[str] = []  # per live row: whose positions it holds
        self.positions: list[int] = []  # per live row: the last position held
        self.pending: list[list[int]] = []  # per live row: pool slots of its last positions, held here alone
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

    def last_positions(self) -> dict[str, int]:
        """Each live row's request id and the last position it holds: a request whose next token
        is at the position after continues its row."""
        return dict(zip(self.request_ids, self.positions))

    def drop(self, request_ids: set[str]) -> None:
        """Forget the rows of these requests (finished, preempted or aborted: their blocks may
        already hold another request's K/V)."""
        self._remove([row for row, request_id in enumerate(self.request_ids) if request_id in request_ids])

    def prepare(
        self, request_ids: list[str], block_tables: list[list[int]], positions: list[int]
    ) -> tuple[list[int], AttentionBatch]:
        """Place one new token per decoding request; return the requests' order in the context
        and the batch. ``order[i]`` is the input at context row ``i``.

        A request with a row continues it (its new token is the row's next position); one
        without gets a row filled from the pool; rows of requests not decoding now leave.
        """
        index_of = {request_id: index for index, request_id in enumerate(request_ids)}
        placed: dict[int, int] = {}  # context row -> input index
        for row, request_id in enumerate(self.request_ids):
            index = index_of.get(request_id)
            if index is not None:
                assert positions[index] == self.positions[row] + 1, (
                    f"request {request_id} decodes at {positions[index]}, its row holds up to {self.positions[row]}"
                )
                placed[row] = index
        self._remove([row for row in range(len(self.request_ids)) if row not in placed], placed)
        order = [placed[row] for row in range(len(self.request_ids))]
        seen = set(order)
        fresh = [index for index in range(len(request_ids)) if index not in seen]
        order += self._append(fresh, request_ids, block_tables, positions)
        batch = self._batch(0, [block_tables[i] for i in order], [positions[i] for i in order], write_pool=False)
        return order, batch

    def append(self, request_ids: list[str], block_tables: list[list[int]], positions: list[int]) -> AttentionBatch:
        """Fresh rows for the last token of prefill chunks, after the live ones (a request's
        earlier row is replaced: its chunk wrote positions the row lacks); the batch covers only
        them. They decode at the next step, where ``prepare`` finds them in place."""
        self.drop(set(request_ids))
        first = len(self.request_ids)
        self._append(list(range(len(request_ids))), request_ids, block_tables, positions)
        return self._batch(first, block_tables, positions, write_pool=True)

    def flush(self) -> None:
        """Copy every position held here alone to its pool slot.

        A leaving row's slots may already belong to another request (its blocks freed, then
        given out by this step's schedule): the flush runs before the step's forwards, which
        write that request's positions after it, and a slot it has not computed yet is never
        read before it computes it."""
        context_rows, pool_rows = [], []
        for row, slots in enumerate(self.pending):
            if slots:
                context_rows.append(self._block_rows(row, len(slots), self.positions[row] + 1 - len(slots)))
                # [slots, heads] -> [heads, slots]: the order of _block_rows
                pool_rows.append(self.pool.rows(np.asarray(slots)).T.reshape(-1))
                self.pending[row] = []
        if not context_rows:
            return
        self._copy_rows(
            (self.keys, self.values), (self.pool.keys, self.pool.values),
            np.concatenate(context_rows), np.concatenate(pool_rows),
        )
        # Launched now: a row moved or written after this must not find its buffer still read.
        mx.async_eval(self.pool.keys, self.pool.values)

    def _append(
        self, indices: list[int], request_ids: list[str], block_tables: list[list[int]], positions: list[int]
    ) -> list[int]:
        """New rows for inputs ``indices``, filled with their positions before this one from the pool.

        Also where continuing rows grow: the capacity is reserved for every row's new position."""
        self._reserve(len(self.request_ids) + len(indices), max(positions) + 1)
        if not indices:
            return indices
        pool_rows, target_rows = [], []
        for index in indices:
            table, position = block_tables[index], positions[index]
            if position:
                slots = slots_for_positions(table, self.pool.block_size, 0, position)[None]
                pool_rows.append(self.pool.rows(slots).reshape(-1))
                target_rows.append(self._block_rows(len(self.request_ids), position))
            self.request_ids.append(request_ids[index])
            self.positions.append(position - 1)  # its new token, written by the forward, makes it ``position``
            self.pending.append([])
        if pool_rows:
            self._copy_rows(
                (self.pool.keys, self.pool.values), (self.keys, self.values),
                np.concatenate(pool_rows), np.concatenate(target_rows),
            )
        # Now, not with the forward: its pool writes must not wait on these reads of the pool
        # (a buffer still read cannot be updated in place, and would be copied whole).
        mx.eval(self.keys, self.values)
        return indices

    @staticmethod
    def _copy_rows(
        sources: tuple[list[mx.array], ...], targets: tuple[list[mx.array], ...],
        source_rows: np.ndarray, target_rows: np.ndarray,
    ) -> None:
        """Rows ``source_rows`` of each source array into rows ``target_rows`` of its target
        (K to K, V to V, layer by layer): one take and one scatter per array, in place."""
        source_rows, target_rows = mx.array(source_rows), mx.array(target_rows)
        for source_arrays, target_arrays in zip(sources, targets, strict=True):
            for source, target in zip(source_arrays, target_arrays, strict=True):
                target[target_rows] = mx.take(source, source_rows, axis=0)

    def _batch(
        self, first: int, block_tables: list[list[int]], positions: list[int], write_pool: bool
    ) -> AttentionBatch:
        """The batch of context rows ``first ..``, in order, each writing its token at its position
        here, and in the pool too where ``write_pool`` (else the slot is pending)."""
        block_size, heads, capacity = self.pool.block_size, self.pool.kv_heads, self.capacity_len
        self.positions[first : first + len(positions)] = positions
        at = np.asarray(positions)
        blocks = np.array([table[position // block_size] for table, position in zip(block_tables, positions)])
        new_slots = blocks * block_size + at % block_size
        rows = np.arange(first, first + len(positions))
        context_rows = ((rows[:, None] * heads + np.arange(heads)) * capacity + at[:, None]).reshape(-1)
        lens = at + 1
        context_len = int(lens.max())
        mask = None
        if (lens != context_len).any():
            mask = mx.array(np.arange(context_len)[None, :] < lens[:, None])[:, None, None, :]
        if not write_pool:
            for row, slot in enumerate(new_slots.tolist(), start=first):
                self.pending[row].append(slot)
        return AttentionBatch(
            write_rows=mx.array(self.pool.rows(new_slots[:, None]).reshape(-1)) if write_pool else None,
            read_rows=None,
            offsets=mx.array((lens - 1).astype(np.int32)),
            mask=mask,
            context=self,
            context_write_rows=mx.array(context_rows.astype(np.int32)),
            context_rows=range(first, first + len(positions)),
            context_len=context_len,
        )

    def _remove(self, rows: list[int], placed: dict[int, int] | None = None) -> None:
        """Drop ``rows``; live rows past the new end move into the holes (``placed`` follows them)."""
        if not rows:
            return
        self.flush()  # a leaving row's positions may be read from the pool later; moved rows have none pending
        gone = set(rows)
        count = len(self.request_ids) - len(gone)
        holes = [row for row in sorted(gone) if row < count]
        movers = [row for row in range(count, len(self.request_ids)) if row not in gone]
        if movers:
            self._move(movers, holes)
        for source, target in zip(movers, holes, strict=True):
            self.request_ids[target], self.positions[target] = self.request_ids[source], self.positions[source]
            if placed is not None and source in placed:
                placed[target] = placed.pop(source)
        del self.request_ids[count:], self.positions[count:], self.pending[count:]
        if not self.request_ids:
            self.keys, self.values = [], []
            self.capacity_rows = self.capacity_len = 0

    def _block_rows(self, row: int, length: int, start: int = 0) -> np.ndarray:
        """The context rows of positions ``start .. start+length-1`` of context row ``row``,
        [heads * length], heads-major."""
        heads = np.arange(self.pool.kv_heads)[:, None]
        positions = np.arange(start, start + length)
        return ((row * self.pool.kv_heads + heads) * self.capacity_len + positions).reshape(-1).astype(np.int32)

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
