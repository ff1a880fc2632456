"""Where a forward's time goes: the MLX operations of one prefill and one decode forward.

cProfile (``tools/bench --profile``) sees only Python: the scheduler, the block manager and
the sampler take well under 1 % of a step, and the rest is one opaque ``mx.eval``. This
tool times, at the model's own shapes, the operations inside that eval, one layer at a
time, and sets them beside the whole forward (the engine's and mlx-lm's), so the profile
of the step can be read down to the operation that costs.

    tools/bench_breakdown                      # bench-llama, a 640-token prefill, 50 decode rows at 640
    tools/bench_breakdown --prompt-len 128 --start-pos 512   # a suffix after a cached prefix

Timings are the minimum of ``--repeats`` runs of each operation alone, on warm buffers;
on a busy machine, compare rows with one another, not with another run.
"""

import argparse
import sys
import time


def timed(function, repeats: int) -> float:
    """Minimum wall time of ``function()`` in ms (it must evaluate what it computes)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bench-llama")
    parser.add_argument("--prompt-len", type=int, default=640, help="new tokens of the prefill forward")
    parser.add_argument("--start-pos", type=int, default=0, help="cached tokens before them")
    parser.add_argument("--decode-rows", type=int, default=50)
    parser.add_argument("--decode-context", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blas", choices=("auto", "openblas", "reference"), default="auto")
    args = parser.parse_args(argv)

    from tools.bench_blas import blas_in_use, ensure_blas

    ensure_blas(args.blas)

    import mlx.core as mx
    import numpy as np
    from mlx import nn

    from engine import LLM
    from engine.runner.model_runner import ChunkInput, kv_geometry

    repeats = args.repeats
    length, start = args.prompt_len, args.start_pos
    context = start + length
    rows, decode_context = args.decode_rows, args.decode_context
    block_size = 16
    decode_steps = 2 * (args.repeats + 1)
    blocks_per_row = -(-(max(context, decode_context + decode_steps) + 1) // block_size)
    llm = LLM(
        model=args.model,
        num_kv_blocks=(rows + 1) * blocks_per_row,
        block_size=block_size,
        enable_prefix_caching=False,
        max_num_seqs=rows,
    )
    model = llm._model  # the bench looks inside on purpose: it times the model's own layers
    runner = llm._runner
    g = kv_geometry(model)
    args_ = model.args
    hidden, inter = args_.hidden_size, args_.intermediate_size
    heads, kv_heads, head_dim = args_.num_attention_heads, g.kv_heads, g.head_dim
    layer = model.model.layers[0]
    rng = np.random.default_rng(0)
    print(
        f"model {args.model}: {g.num_layers} layers, hidden {hidden}, MLP {inter}, "
        f"heads {heads}/{kv_heads} x {head_dim}; BLAS {blas_in_use()}; MLX {mx.__version__}"
    )

    def linear_set(x):
        attn, mlp = layer.self_attn, layer.mlp
        return [
            attn.q_proj(x),
            attn.k_proj(x),
            attn.v_proj(x),
            attn.o_proj(x),
            mlp.gate_proj(x),
            mlp.up_proj(x),
            mlp.down_proj(mx.zeros((x.shape[0], x.shape[1], inter))),
        ]

    def report(title: str, whole: list[tuple[str, float]], parts: list[tuple[str, float]]) -> None:
        print(f"\n{title}")
        for name, ms in whole:
            print(f"  {name:<58} {ms:9.1f} ms")
        total = sum(ms for _, ms in parts)
        for name, ms in parts:
            print(f"    {name:<56} {ms:9.1f} ms  {100 * ms / total:5.1f} %")
        print(f"    {'sum of the parts':<56} {total:9.1f} ms")

    # -- prefill ---------------------------------------------------------------------------
    table = list(range(blocks_per_row))
    tokens = rng.integers(1, args_.vocab_size, context).tolist()
    if start:
        mx.eval(runner.execute([ChunkInput("prefix", tokens[:start], 0, table)]).logits)
    chunk = ChunkInput("chunk", tokens[start:], start, table)
    ours = timed(lambda: mx.eval(runner.execute([chunk]).logits), repeats)
    saved = runner.max_prefill_tokens
    runner.max_prefill_tokens = 1 << 30
    ours_one_piece = timed(lambda: mx.eval(runner.execute([chunk]).logits), repeats)
    runner.max_prefill_tokens = saved
    dense = timed(lambda: mx.eval(model.model(mx.array([tokens]).logits)), repeats) if not start else float("nan")
    x = mx.random.normal((1, length, hidden))
    h = mx.random.normal((1, length, inter))
    q = mx.random.normal((1, heads, length, head_dim))
    k = mx.random.normal((1, kv_heads, context, head_dim))
    v = mx.random.normal((1, kv_heads, context, head_dim))
    scores = mx.random.normal((1, heads, length, context))
    mx.eval(x, h, q, k, v, scores)
    n = g.num_layers
    parts = [
        ("matrix products (q, k, v, o, gate, up, down)", n * timed(lambda: mx.eval(linear_set(x)), repeats)),
        (
            "SiLU(gate) * up  (a sigmoid: one exp per element)",
            n * timed(lambda: mx.eval(nn.silu(h) * h), repeats),
        ),
        (
            "attention, all but the softmax",
            n
            * max(
                0.0,
                timed(
                    lambda: mx.eval(
                        mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5, mask="causal")
                    ),
                    repeats,
                )
                - timed(lambda: mx.eval(mx.softmax(scores, axis=-1, precise=True)), repeats),
            ),
        ),
        (
            "attention softmax (exp over heads x L x K)",
            n * timed(lambda: mx.eval(mx.softmax(scores, axis=-1, precise=True)), repeats),
        ),
        (
            "RMSNorm x 2, RoPE, residuals",
            n
            * timed(
                lambda: mx.eval(
                    layer.input_layernorm(x),
                    layer.post_attention_layernorm(x + x),
                    mx.fast.rope(q, head_dim, traditional=False, base=10000.0, scale=1.0, offset=start),
                ),
                repeats,
            ),
        ),
    ]
    report(
        f"prefill: {length} new tokens after {start} cached (one row)",
        [
            (f"engine forward (pieces of {saved} tokens, paged K/V)", ours),
            ("engine forward, one piece", ours_one_piece),
            ("mlx-lm dense forward, no cache" + ("" if not start else " (n/a: cached prefix)"), dense),
        ],
        parts,
    )

    # -- decode ----------------------------------------------------------------------------
    tables = [list(range(r * blocks_per_row, (r + 1) * blocks_per_row)) for r in range(rows)]
    positions = [decode_context] * rows
    state = {"step": 0}

    def decode_step():  # consecutive positions, so the decode context is reused as in serving
        step = state["step"]
        state["step"] += 1
        mx.eval(runner.execute([ChunkInput(f"row{r}", [5], decode_context + step, t) for r, t in enumerate(tables)]).logits)

    mx.eval(runner.execute([ChunkInput(f"row{r}", [5], p - 1, t) for r, (p, t) in enumerate(zip(positions, tables))]).logits)  # fill
    ours_decode = timed(decode_step, repeats)
    calls = iter(range(1 << 30))

    def fresh_rows():  # rows the context has never seen: each one filled from the pool
        call = next(calls)
        mx.eval(runner.execute([ChunkInput(f"fresh{call}-{r}", [5], p, t) for r, (p, t) in enumerate(zip(positions, tables))]).logits)

    fresh = timed(fresh_rows, repeats)
    from mlx_lm.models.cache import KVCache

    peer_caches = [KVCache() for _ in range(n)]
    for cache in peer_caches:
        cache.update_and_fetch(
            mx.random.normal((rows, kv_heads, decode_context, head_dim)),
            mx.random.normal((rows, kv_heads, decode_context, head_dim)),
        )
    mx.eval([cache.state for cache in peer_caches])
    peer_tokens = mx.array([[5]] * rows)
    peer = timed(lambda: mx.eval(model(peer_tokens, cache=peer_caches)), repeats)
    xd = mx.random.normal((rows, 1, hidden))
    hd = mx.random.normal((rows, 1, inter))
    qd = mx.random.normal((rows, heads, 1, head_dim))
    buffer = mx.random.normal((rows, kv_heads, decode_context + 256, head_dim))
    kd = buffer[:, :, : decode_context + 1]
    pool = runner.pool.keys[0]
    read = mx.array(
        runner.pool.rows(np.stack([np.arange(decode_context + 1) + t[0] * block_size for t in tables]).logits)
    )
    mx.eval(xd, hd, qd, buffer, read)
    parts = [
        ("matrix products (q, k, v, o, gate, up, down)", n * timed(lambda: mx.eval(linear_set(xd)), repeats)),
        ("SiLU(gate) * up", n * timed(lambda: mx.eval(nn.silu(hd) * hd), repeats)),
        (
            "attention over the kept contexts (views, no copy)",
            n
            * timed(
                lambda: mx.eval(mx.fast.scaled_dot_product_attention(qd, kd, kd, scale=head_dim**-0.5)),
                repeats,
            ),
        ),
        ("output head (logits of every row)", timed(lambda: mx.eval(runner._project(xd[:, 0]).logits), repeats)),
    ]
    report(
        f"decode: {rows} rows at position {decode_context}",
        [
            ("engine forward, contexts kept from the previous step", ours_decode),
            ("engine forward, contexts gathered from the pool (stateless)", fresh),
            ("mlx-lm forward over its own KVCache (contiguous per row)", peer),
        ],
        parts,
    )
    gather = 2 * n * timed(lambda: mx.eval(mx.take(pool, read, axis=0)), repeats)
    print(
        "  gathering every row's K and V from the pool, all layers "
        f"(what keeping them saves): {gather:.1f} ms"
    )
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]).logits)
