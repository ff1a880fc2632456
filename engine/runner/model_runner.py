"""Runs an mlx-lm architecture (qwen3, llama, ...) over the paged KV pool.

Plan of a step, chosen for exactness: forwards run in schedule order; consecutive
one-token rows (decodes) share one batched forward (L = 1, one row each), and consecutive
prefill chunks of the same shape (same start_pos, same length: the suffixes after a shared
cached prefix, typically) share one forward (B rows, offset = start_pos); any other chunk
gets its own. On MLX's CPU backend products are row-invariant, so this gives bit-identical
logits whatever the batch. Within a forward every row writes a layer's K/V before any row
reads it back, so batching never hides a block from a row that hits it.
Schedule order matters: a request may hit a block that an earlier chunk of the same step
computes, so that chunk must have written it first.

The first decode forward of a step attends over the rows' contexts kept contiguous from
step to step (``DecodeContext``), and so does the last token of each prefill chunk; any
other forward gathers its context from the pool and makes the decode context forget the
blocks it writes. The rest of a prefill chunk runs as forwards of at most
``max_prefill_tokens`` tokens whose last layer computes only K/V: attention's softmax (a
slow ``exp`` on MLX's CPU backend) is computed over the whole key range of a forward,
masked or not, so shorter forwards skip part of the masked triangle. Each forward is
evaluated before the next, so every pool write finds its buffer free to update in place.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.runner.paged_attention import DecodeContext, KVPool, PagedLayerCache, decode_batch, prefill_batch


@dataclass(slots=True)
class ChunkInput:
    token_ids: list[int]
    start_pos: int
    block_table: list[int]


@dataclass(frozen=True, slots=True)
class KVGeometry:
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: mx.Dtype


def kv_geometry(model: nn.Module) -> KVGeometry:
    args = model.args
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    return KVGeometry(
        num_layers=len(model.layers),
        kv_heads=args.num_key_value_heads or args.num_attention_heads,
        head_dim=head_dim,
        dtype=model.model.embed_tokens.weight.dtype,
    )


class ModelRunner:
    def __init__(self, model: nn.Module, pool: KVPool, max_prefill_tokens: int = 160) -> None:
        self.model = model
        self.pool = pool
        self.max_prefill_tokens = max_prefill_tokens
        self.decode_context = DecodeContext(pool, len(model.layers))

    def execute(self, chunks: list[ChunkInput]) -> list[np.ndarray]:
        """Compute every chunk; return the float32 logits after each chunk's last token."""
        logits: list[mx.array] = []
        start = 0
        first_decode = True
        while start < len(chunks):
            shape = (chunks[start].start_pos, len(chunks[start].token_ids))
            stop = start + 1
            while stop < len(chunks) and (chunks[stop].start_pos, len(chunks[stop].token_ids)) == shape:
                stop += 1
            if shape[1] > 1:
                logits.extend(self._forward_prefill(chunks[start:stop]))
                start = stop
                continue
            stop = start
            while stop < len(chunks) and len(chunks[stop].token_ids) == 1:
                stop += 1
            if first_decode:
                logits.extend(self._forward_decode_in_context(chunks[start:stop]))
            else:
                logits.extend(self._forward_decode(chunks[start:stop]))
            first_decode = False
            start = stop
        stacked = mx.stack(logits).astype(mx.float32)
        mx.eval(stacked)
        return list(np.array(stacked, copy=True))

    def _forward_prefill(self, chunks: list[ChunkInput]) -> list[mx.array]:
        """Chunks of one shape, together, in two parts, as mlx-lm's batch generator does.

        All tokens but the last only write their K/V, in pieces of at most
        ``max_prefill_tokens`` positions: nothing reads their last layer's output, so MLX
        never computes its attention and MLP. The last token of each chunk then runs as
        a one-token row appended to the decode context: its logits, and its row ready to
        decode at the next step.
        """
        start_pos, num_tokens = chunks[0].start_pos, len(chunks[0].token_ids)
        tables = [chunk.block_table for chunk in chunks]
        for table in tables:
            self._forget_written(table, start_pos, start_pos + num_tokens)
        last = num_tokens - 1
        for offset in range(0, last, self.max_prefill_tokens):
            stop = min(offset + self.max_prefill_tokens, last)
            batch = prefill_batch(self.pool, tables, start_pos + offset, stop - offset)
            self._hidden(mx.array([chunk.token_ids[offset:stop] for chunk in chunks]), batch)
            self._evaluate()
        batch = self.decode_context.append(tables, [start_pos + last] * len(chunks))
        hidden = self._hidden(mx.array([chunk.token_ids[last:] for chunk in chunks]), batch)
        logits = self._project(hidden[:, 0, :])
        self._evaluate(logits)
        return [logits[row] for row in range(len(chunks))]

    def _forward_decode(self, rows: list[ChunkInput]) -> list[mx.array]:
        for row in rows:
            self._forget_written(row.block_table, row.start_pos, row.start_pos + 1)
        batch = decode_batch(self.pool, [row.block_table for row in rows], [row.start_pos for row in rows])
        hidden = self._hidden(mx.array([row.token_ids for row in rows]), batch)
        logits = self._project(hidden[:, 0, :])
        self._evaluate(logits)
        return [logits[row] for row in range(len(rows))]

    def _forward_decode_in_context(self, rows: list[ChunkInput]) -> list[mx.array]:
        tables, positions = [row.block_table for row in rows], [row.start_pos for row in rows]
        order, batch = self.decode_context.prepare(tables, positions)
        hidden = self._hidden(mx.array([rows[index].token_ids for index in order]), batch)
        logits = self._project(hidden[:, 0, :])
        self._evaluate(logits)
        by_input = [None] * len(rows)
        for row, index in enumerate(order):
            by_input[index] = logits[row]
        return by_input

    def _forget_written(self, block_table: list[int], start: int, stop: int) -> None:
        first, last = start // self.pool.block_size, (stop - 1) // self.pool.block_size
        self.decode_context.forget_blocks(set(block_table[first : last + 1]))

    def _evaluate(self, logits: mx.array | None = None) -> None:
        """Run the forward: its logits (if any) and its writes to the pool and the context."""
        outputs = [self.pool.keys, self.pool.values, self.decode_context.keys, self.decode_context.values]
        mx.eval(*outputs, *([] if logits is None else [logits]))

    def _hidden(self, inputs: mx.array, batch) -> mx.array:
        caches = [PagedLayerCache(self.pool, layer, batch) for layer in range(len(self.model.layers))]
        return self.model.model(inputs, cache=caches)

    def _project(self, hidden: mx.array) -> mx.array:
        """The model's output head, applied only to the rows whose logits are needed."""
        if getattr(self.model.args, "tie_word_embeddings", False):
            return self.model.model.embed_tokens.as_linear(hidden)
        return self.model.lm_head(hidden)
