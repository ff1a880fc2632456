"""Runs an mlx-lm architecture (qwen3, llama, ...) over the paged KV pool.

Plan of a step, chosen for exactness: forwards run in schedule order; consecutive
one-token rows (decodes) share one batched forward (L = 1, one row each), and every longer
prefill chunk gets its own forward (B = 1, offset = start_pos). On MLX's CPU backend
products are row-invariant, so this gives bit-identical logits whatever the batch.
Schedule order matters: a request may hit a block that an earlier chunk of the same step
computes, so that chunk must have written it first.

The first decode forward of a step attends over the rows' contexts kept contiguous from
step to step (``DecodeContext``); any other forward gathers its context from the pool and
makes the decode context forget the blocks it writes. Long prefill chunks run as forwards
of at most ``max_prefill_tokens`` tokens: attention's softmax (a slow ``exp`` on MLX's CPU
backend) is computed over the whole key range of a forward, masked or not, so shorter
forwards skip part of the masked triangle. Each forward is evaluated before the next, so
every pool write finds its buffer free to update in place.
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
    def __init__(self, model: nn.Module, pool: KVPool, max_prefill_tokens: int = 320) -> None:
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
            if len(chunks[start].token_ids) > 1:
                logits.append(self._forward_prefill(chunks[start]))
                start += 1
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

    def _forward_prefill(self, chunk: ChunkInput) -> mx.array:
        tokens, start_pos = chunk.token_ids, chunk.start_pos
        self._forget_written(chunk.block_table, start_pos, start_pos + len(tokens))
        for offset in range(0, len(tokens), self.max_prefill_tokens):
            piece = tokens[offset : offset + self.max_prefill_tokens]
            batch = prefill_batch(self.pool, chunk.block_table, start_pos + offset, len(piece))
            hidden = self._hidden(mx.array([piece]), batch)
            logits = self._project(hidden[:, -1, :])[0]
            self._evaluate(logits)
        return logits

    def _forward_decode(self, rows: list[ChunkInput]) -> list[mx.array]:
        for row in rows:
            self._forget_written(row.block_table, row.start_pos, row.start_pos + 1)
        batch = decode_batch(self.pool, [row.block_table for row in rows], [row.start_pos for row in rows])
        hidden = self._hidden(mx.array([row.token_ids for row in rows]), batch)
        logits = self._project(hidden[:, 0, :])
        self._evaluate(logits)
        return [logits[row] for row in range(len(rows))]

    def _forward_decode_in_context(self, rows: list[ChunkInput]) -> list[mx.array]:
        order, batch = self.decode_context.prepare([row.block_table for row in rows], [row.start_pos for row in rows])
        mx.eval(self.decode_context.keys, self.decode_context.values)  # moves and fills first
        hidden = self._hidden(mx.array([rows[index].token_ids for index in order]), batch)
        logits = self._project(hidden[:, 0, :])
        self._evaluate(logits)
        by_input = [None] * len(rows)
        for row, index in enumerate(order):
            by_input[index] = logits[row]
        return by_input

    def _forget_written(self, block_table: list[int], start: int, stop: int) -> None:
        block_size = self.pool.block_size
        self.decode_context.forget_blocks(set(block_table[start // block_size : (stop - 1) // block_size + 1]))

    def _evaluate(self, logits: mx.array) -> None:
        mx.eval(logits, self.pool.keys, self.pool.values, self.decode_context.keys, self.decode_context.values)

    def _hidden(self, inputs: mx.array, batch) -> mx.array:
        caches = [PagedLayerCache(self.pool, layer, batch) for layer in range(len(self.model.layers))]
        return self.model.model(inputs, cache=caches)

    def _project(self, hidden: mx.array) -> mx.array:
        """The model's output head, applied only to the rows whose logits are needed."""
        if getattr(self.model.args, "tie_word_embeddings", False):
            return self.model.model.embed_tokens.as_linear(hidden)
        return self.model.lm_head(hidden)
