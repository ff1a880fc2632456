"""Runs an mlx-lm architecture (qwen3, llama, ...) over the paged KV pool.

Plan of a step (a ``StepInput``: each scheduled chunk with its request id, and the requests
that finished or were preempted since the last step):
1. the rows of finished and preempted requests leave the decode context;
2. every request that continues its decode row (one new token right after its row's last
   position; in a step launched ahead, the token is the previous step's, still on the
   device) runs in ONE forward over the decode context: these rows read only their own
   K/V, so they may run before everything else; their new K/V goes to the context only,
   and is flushed to the pool before any other chunk of the step runs, so a block a
   decode row completes is written before a later chunk of the step hits it;
3. every other chunk, in schedule order (a request may hit a block that an earlier chunk of
   the same step computes, so that chunk must have written it first); consecutive chunks
   of the same shape (same start_pos and length: the suffixes after a shared cached prefix,
   typically) share one forward. All of a chunk's tokens but the last only write their K/V,
   in pieces of at most ``max_prefill_tokens`` positions (nothing reads their last layer's
   output, so MLX never computes its attention and MLP; and attention's softmax over a
   shorter key range skips part of the masked triangle); the last token runs as a fresh
   row of the decode context, where the request decodes from the next step on.
On MLX's CPU backend products are row-invariant, so this gives bit-identical logits
whatever the batch. Each forward is launched before the next is built, so every pool write
finds its buffer free to update in place. The logits stay on the device (``StepLogits``):
the caller samples there and copies only token ids (and the rows it must keep) to the host.
"""

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.runner.decode_context import DecodeContext
from engine.runner.paged_attention import KVPool, PagedLayerCache, prefill_batch


@dataclass(slots=True)
class ChunkInput:
    """One scheduled chunk: tokens ``start_pos ..`` of request ``request_id``, and where its K/V lives.

    A decode chunk may instead take its one token from the previous step's sampled tokens,
    still on the device (``StepInput.fed_back``, at ``fed_back_row``): the host has not seen it yet.
    """

    request_id: str
    token_ids: list[int] | None
    start_pos: int
    block_table: list[int]
    fed_back_row: int | None = None

    @property
    def num_tokens(self) -> int:
        return 1 if self.token_ids is None else len(self.token_ids)


@dataclass(slots=True)
class StepInput:
    """What the runner needs of one scheduler step (the shape of vLLM's SchedulerOutput)."""

    chunks: list[ChunkInput]
    finished_request_ids: set[str] = field(default_factory=set)  # finished, preempted or aborted since the last step
    fed_back: mx.array | None = None  # the previous step's sampled tokens, on the device


@dataclass(slots=True)
class StepLogits:
    """The logits after each chunk's last token: the step's forwards' rows, concatenated on the
    device, and for each chunk its row there. Kept apart, so that sampling reduces every
    row at once and gathers only token ids (or the few rows it copies), instead of gathering
    a vocabulary-wide row per chunk into chunk order."""

    logits: mx.array  # [forward rows, vocab] float32
    rows: np.ndarray  # [chunks] int32: chunk i's row of ``logits``

    def in_chunk_order(self) -> mx.array:
        """``[chunks, vocab]`` in chunk order (a gather, unless the order is already that)."""
        if np.array_equal(self.rows, np.arange(len(self.rows))):
            return self.logits
        return mx.take(self.logits, mx.array(self.rows), axis=0)


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
    def __init__(self, model: nn.Module, pool: KVPool, max_prefill_tokens: int | None = None) -> None:
        # Pieces pay on MLX's CPU backend, where attention's softmax (a slow ``exp``) runs over
        # every key of a forward, masked or not: 160 positions measured best there. On a GPU the
        # softmax is cheap and each extra forward costs launches: the whole chunk is one piece.
        if max_prefill_tokens is None:
            max_prefill_tokens = 160 if mx.default_device() == mx.cpu else 1 << 30
        self.model = model
        self.pool = pool
        self.max_prefill_tokens = max_prefill_tokens
        self.decode_context = DecodeContext(pool, len(model.layers))

    def execute(self, step: StepInput | list[ChunkInput]) -> StepLogits:
        """Compute every chunk; return the logits after each chunk's last token, on the device
        (launched; the caller's sampling waits for them)."""
        if not isinstance(step, StepInput):
            step = StepInput(step)
        chunks = step.chunks
        self.decode_context.drop(step.finished_request_ids)
        held = self.decode_context.last_positions()
        decoding = [
            index for index, chunk in enumerate(chunks)
            if chunk.num_tokens == 1 and held.get(chunk.request_id) == chunk.start_pos - 1
        ]
        fed_back = [index for index, chunk in enumerate(chunks) if chunk.fed_back_row is not None]
        if fed_back and (fed_back != decoding or len(fed_back) != len(chunks) or step.fed_back is None):
            # Only a step of continuing decode rows alone runs before the host has its tokens.
            raise ValueError(f"fed-back tokens for chunks {fed_back}, of which continuing decode rows: {decoding}")
        forwards: list[mx.array] = []
        rows = np.full(len(chunks), -1, dtype=np.int32)
        num_rows = 0

        def place(logits: mx.array, indices: list[int]) -> None:
            """``logits`` row ``r`` is chunk ``indices[r]``'s."""
            nonlocal num_rows
            forwards.append(logits)
            rows[indices] = np.arange(num_rows, num_rows + len(indices))
            num_rows += len(indices)

        if decoding:
            logits, order = self._forward_decode([chunks[i] for i in decoding], step.fed_back)
            place(logits, [decoding[i] for i in order])
        decoded = set(decoding)
        others = [index for index in range(len(chunks)) if index not in decoded]
        if others:
            # The prefill forwards read the pool: the decode rows' new positions go there first
            # (a chunk may hit a block that a decode row of this step completed).
            self.decode_context.flush()
        start = 0
        while start < len(others):
            shape = (chunks[others[start]].start_pos, chunks[others[start]].num_tokens)
            stop = start + 1
            while stop < len(others) and (chunks[others[stop]].start_pos, chunks[others[stop]].num_tokens) == shape:
                stop += 1
            group = others[start:stop]
            place(self._forward_prefill([chunks[i] for i in group]), group)
            start = stop
        return StepLogits(forwards[0] if len(forwards) == 1 else mx.concatenate(forwards), rows)

    def _forward_prefill(self, chunks: list[ChunkInput]) -> mx.array:
        """Chunks of one shape, together, in two parts, as mlx-lm's batch generator does.

        All tokens but the last only write their K/V, in pieces of at most
        ``max_prefill_tokens`` positions: nothing reads their last layer's output, so MLX
        never computes its attention and MLP. The last token of each chunk then runs as
        a one-token row appended to the decode context: its logits (``[chunks, vocab]``), and
        its row ready to decode at the next step.
        """
        start_pos, num_tokens = chunks[0].start_pos, len(chunks[0].token_ids)
        tables = [chunk.block_table for chunk in chunks]
        last = num_tokens - 1
        for offset in range(0, last, self.max_prefill_tokens):
            stop = min(offset + self.max_prefill_tokens, last)
            batch = prefill_batch(self.pool, tables, start_pos + offset, stop - offset)
            self._hidden(mx.array([chunk.token_ids[offset:stop] for chunk in chunks]), batch)
            self._evaluate()
        batch = self.decode_context.append([chunk.request_id for chunk in chunks], tables, [start_pos + last] * len(chunks))
        hidden = self._hidden(mx.array([chunk.token_ids[last:] for chunk in chunks]), batch)
        logits = self._project(hidden[:, 0, :]).astype(mx.float32)
        self._evaluate(logits)
        return logits

    def _forward_decode(self, rows: list[ChunkInput], fed_back: mx.array | None) -> tuple[mx.array, list[int]]:
        """The decode rows, one token each, over their rows of the decode context; their tokens
        from the host, or all taken on the device from ``fed_back``. Returns the logits in the
        context's row order, and that order (``order[r]`` is the input at row ``r``)."""
        order, batch = self.decode_context.prepare(
            [row.request_id for row in rows], [row.block_table for row in rows], [row.start_pos for row in rows]
        )
        if rows[0].fed_back_row is None:
            inputs = mx.array([rows[index].token_ids for index in order])
        else:
            inputs = mx.take(fed_back, mx.array([rows[index].fed_back_row for index in order]))[:, None]
        hidden = self._hidden(inputs, batch)
        logits = self._project(hidden[:, 0, :]).astype(mx.float32)
        self._evaluate(logits)
        return logits, order

    def _evaluate(self, logits: mx.array | None = None) -> None:
        """Start the forward: its logits (if any) and its writes to the pool and the context.

        Launched, not waited for (``async_eval``): the next forward's graph is built while the
        device runs this one, and the step waits once, for its sampled tokens. Every forward is
        still launched before the next one is built, so each pool write finds its buffer free
        to update in place."""
        outputs = [self.pool.keys, self.pool.values, self.decode_context.keys, self.decode_context.values]
        mx.async_eval(*outputs, *([] if logits is None else [logits]))

    def _hidden(self, inputs: mx.array, batch) -> mx.array:
        caches = [PagedLayerCache(self.pool, layer, batch) for layer in range(len(self.model.layers))]
        return self.model.model(inputs, cache=caches)

    def _project(self, hidden: mx.array) -> mx.array:
        """The model's output head, applied only to the rows whose logits are needed."""
        if getattr(self.model.args, "tie_word_embeddings", False):
            return self.model.model.embed_tokens.as_linear(hidden)
        return self.model.lm_head(hidden)
