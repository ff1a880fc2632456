"""Runs an mlx-lm architecture (qwen3, llama, ...) over the paged KV pool.

Plan of a step, chosen for exactness: forwards run in schedule order; consecutive
one-token rows (decodes) share one batched forward (L = 1, one row each), and every longer
prefill chunk gets its own forward (B = 1, offset = start_pos). On MLX's CPU backend
products are row-invariant, so this gives bit-identical logits whatever the batch.
Schedule order matters: a request may hit a block that an earlier chunk of the same step
computes, so that chunk must have written it first.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.runner.paged_attention import KVPool, PagedLayerCache, decode_batch, prefill_batch


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
    def __init__(self, model: nn.Module, pool: KVPool) -> None:
        self.model = model
        self.pool = pool

    def execute(self, chunks: list[ChunkInput]) -> list[np.ndarray]:
        """Compute every chunk; return the float32 logits after each chunk's last token."""
        logits: list[mx.array] = []
        start = 0
        while start < len(chunks):
            if len(chunks[start].token_ids) > 1:
                logits.append(self._forward_prefill(chunks[start]))
                start += 1
                continue
            stop = start
            while stop < len(chunks) and len(chunks[stop].token_ids) == 1:
                stop += 1
            logits.extend(self._forward_decode(chunks[start:stop]))
            start = stop
        stacked = mx.stack(logits).astype(mx.float32)
        mx.eval(stacked, self.pool.keys, self.pool.values)
        return list(np.array(stacked, copy=True))

    def _forward_prefill(self, chunk: ChunkInput) -> mx.array:
        batch = prefill_batch(chunk.block_table, self.pool.block_size, chunk.start_pos, len(chunk.token_ids))
        hidden = self._hidden(mx.array([chunk.token_ids]), batch)
        return self._project(hidden[:, -1, :])[0]

    def _forward_decode(self, rows: list[ChunkInput]) -> list[mx.array]:
        batch = decode_batch([row.block_table for row in rows], self.pool.block_size, [row.start_pos for row in rows])
        hidden = self._hidden(mx.array([row.token_ids for row in rows]), batch)
        logits = self._project(hidden[:, 0, :])
        return [logits[row] for row in range(len(rows))]

    def _hidden(self, inputs: mx.array, batch) -> mx.array:
        caches = [PagedLayerCache(self.pool, layer, batch) for layer in range(len(self.model.layers))]
        return self.model.model(inputs, cache=caches)

    def _project(self, hidden: mx.array) -> mx.array:
        """The model's output head, applied only to the rows whose logits are needed."""
        if getattr(self.model.args, "tie_word_embeddings", False):
            return self.model.model.embed_tokens.as_linear(hidden)
        return self.model.lm_head(hidden)
