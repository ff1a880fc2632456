"""Prefix caching on vs off vs mlx-lm's BatchGenerator, on the prefix-repetition workload.

One process measures three sides on the same model and the same prompts: the engine with
prefix caching off, the engine with it on (one ``LLM``, reconfigured between the two), and
mlx-lm's own continuous batching (``mlx_lm.generate.BatchGenerator``, greedy). Each side
runs ``--repeats`` passes of the whole workload; the table gives, per metric, the median
+- population standard deviation over the passes. With caching on, the first pass starts
from an empty cache (cold) and the later passes find the previous pass's blocks (warm);
the hit rates come from the engine's own counters.

    tools/bench                          # the seed's shape on bench-llama (see --help for the knobs)
    tools/bench --quick                  # a smoke run, under a minute
    tools/bench --json out.json --plot docs/bench.png
    tools/bench --blas reference         # MLX's bundled reference BLAS (slow; bit-exact rows)
    ENGINE_DEVICE=gpu tools/bench        # the same tool on a GPU

Which BLAS runs: on Linux the mlx[cpu] wheel bundles reference (netlib) BLAS, about 30x
slower here than OpenBLAS. ``--blas auto`` (the default) preloads OpenBLAS when it is
installed (Debian: ``apt-get install libopenblas0-pthread``) by re-executing this script
with ``LD_PRELOAD``; the output says which BLAS actually ran.
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from tools.bench_blas import blas_in_use, ensure_blas
from tools.bench_workload import (
    METRICS,
    Workload,
    expected_hit_tokens,
    pass_metrics,
    prefix_repetition_prompts,
    speedup,
    summarize,
)

SIDES = ("cache_off", "cache_on", "mlx_lm")
SIDE_LABELS = {"cache_off": "cache off", "cache_on": "cache on", "mlx_lm": "mlx-lm"}
QUICK = {
    "model": "tiny-llama", "repeats": 2, "prefix_len": 256, "suffix_len": 64, "num_prompts": 16, "output_len": 32,
}
# mlx-lm's own defaults for these two; its completion_batch_size follows --max-num-seqs, so that
# both sides may run every request of the workload at once.
MLX_LM_PREFILL_BATCH_SIZE = 8
MLX_LM_PREFILL_STEP_SIZE = 2048


# -- the sides -------------------------------------------------------------------------


def run_engine_pass(llm, prompts, params, bar) -> tuple[dict, list[list[int]], tuple[int, int]]:
    times = [[] for _ in prompts]

    def on_token(index: int, _token: int) -> None:
        times[index].append(time.perf_counter())
        bar.update(1)

    before = llm.prefix_cache_stats()
    arrival = time.perf_counter()
    outputs = llm.generate(prompts, params, on_token=on_token)
    after = llm.prefix_cache_stats()
    tokens = [out.token_ids for out in outputs]
    return pass_metrics(arrival, times), tokens, (after.hits - before.hits, after.queries - before.queries)


def run_mlx_lm_pass(model, prompts, output_len: int, batch_size: int, bar) -> tuple[dict, list[list[int]]]:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    # On the engine's device (mlx-lm's own default stream is fixed when it is imported).
    generator = BatchGenerator(
        model,
        max_tokens=output_len,
        completion_batch_size=batch_size,
        prefill_batch_size=MLX_LM_PREFILL_BATCH_SIZE,
        prefill_step_size=MLX_LM_PREFILL_STEP_SIZE,
        stream=mx.new_stream(mx.default_device()),
    )
    times = [[] for _ in prompts]
    tokens = [[] for _ in prompts]
    arrival = time.perf_counter()
    uids = generator.insert(prompts, [output_len] * len(prompts))
    index_of = {uid: index for index, uid in enumerate(uids)}
    while responses := generator.next_generated():
        now = time.perf_counter()
        for response in responses:
            times[index_of[response.uid]].append(now)
            tokens[index_of[response.uid]].append(response.token)
        bar.update(len(responses))
    generator.close()
    return pass_metrics(arrival, times), tokens


def load_peer_model(path: Path):
    """A separate mlx-lm copy of the engine's model (same rope fix-up as the engine)."""
    from mlx_lm.utils import load

    from engine.models import fixed_config

    config = fixed_config(path)
    overrides = {"rope_theta": config["rope_theta"]} if "rope_theta" in config else {}
    model, _ = load(str(path), model_config=overrides)
    return model


def num_parameters(model_dir: Path) -> int:
    """Parameters stored in the folder's safetensors files (read from their headers)."""
    import math

    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as tensors:
            names = tensors.keys()  # safe_open has keys() but is not iterable
            total += sum(math.prod(tensors.get_slice(name).get_shape()) for name in names)
    return total


def run(args) -> dict:
    import mlx.core as mx
    import mlx_lm
    from tqdm import tqdm

    from engine import LLM, SamplingParams
    from engine.runner.device import select_device

    try:
        select_device(args.device)
    except (RuntimeError, ValueError) as error:
        sys.exit(f"tools/bench: {error}")
    workload = Workload(
        args.prefix_len, args.suffix_len, args.num_prefixes, args.num_prompts, args.output_len, args.seed
    )
    blocks_per_request = -(-(workload.prompt_len + workload.output_len) // args.block_size)
    num_kv_blocks = args.num_kv_blocks or workload.num_prompts * blocks_per_request + 64
    engine_settings = {
        "block_size": args.block_size,
        "num_kv_blocks": num_kv_blocks,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": max(4096, workload.prompt_len + workload.output_len),
    }
    started = time.perf_counter()
    llm = LLM(model=args.model, enable_prefix_caching=False, device=args.device, **engine_settings)
    peer_model = load_peer_model(llm.model_path) if "mlx_lm" in args.sides else None
    prompts = prefix_repetition_prompts(workload, llm.vocab_size, llm.tokenizer.eos_token_ids or ())
    params = SamplingParams(max_tokens=workload.output_len, temperature=0.0, ignore_eos=True)

    total = len(args.sides) * args.repeats * workload.num_prompts * workload.output_len
    # A log (not a terminal) gets a line every 10 s instead of a redrawn bar.
    bar = tqdm(
        total=total,
        unit="tok",
        desc="bench",
        disable=args.no_progress,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    # Warm-up (untimed): first-call costs (allocations, kernel set-up) out of the first pass.
    warmup = prompts[:2]
    llm.generate(warmup, SamplingParams(max_tokens=4, ignore_eos=True))
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()

    passes: dict[str, list[dict]] = {}
    tokens: dict[str, list[list[int]]] = {}
    hits: list[tuple[int, int]] = []
    for side in args.sides:
        bar.set_description(SIDE_LABELS[side])
        passes[side] = []
        if side == "mlx_lm":
            run_mlx_lm_pass(peer_model, warmup, 4, args.max_num_seqs, _NullBar())
            for _ in range(args.repeats):
                metrics, tokens[side] = run_mlx_lm_pass(
                    peer_model, prompts, workload.output_len, args.max_num_seqs, bar
                )
                passes[side].append(metrics)
            continue
        # A new cache (and fresh counters) for each engine side: the first pass is cold.
        llm.reconfigure(model=args.model, enable_prefix_caching=side == "cache_on", **engine_settings)
        for _ in range(args.repeats):
            if profiler:
                profiler.enable()
            metrics, tokens[side], pass_hits = run_engine_pass(llm, prompts, params, bar)
            if profiler:
                profiler.disable()
            passes[side].append(metrics)
            if side == "cache_on":
                hits.append(pass_hits)
    bar.close()
    device = llm.device
    model_parameters = num_parameters(llm.model_path)
    llm.close()

    summary = {side: summarize(passes[side]) for side in args.sides}
    result = {
        "workload": {field: getattr(workload, field) for field in Workload.__dataclass_fields__},
        "engine": engine_settings,
        "mlx_lm": {
            "completion_batch_size": args.max_num_seqs,
            "prefill_batch_size": MLX_LM_PREFILL_BATCH_SIZE,
            "prefill_step_size": MLX_LM_PREFILL_STEP_SIZE,
        },
        "model": args.model,
        "model_parameters": model_parameters,
        "device": device,
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm.__version__,
        "blas": blas_in_use() if device == "cpu" else f"n/a ({device})",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "repeats": args.repeats,
        "command": " ".join(["tools/bench", *sys.argv[1:]]),
        "sides": {side: {"summary": summary[side], "passes": passes[side]} for side in args.sides},
        "wall_s": time.perf_counter() - started,
    }
    if {"cache_off", "cache_on"} <= set(args.sides):
        result["ratios"] = {
            name: speedup(name, summary["cache_on"][name]["median"], summary["cache_off"][name]["median"])
            for name, *_ in METRICS
        }
        result["ratios_cold_pass"] = {
            name: speedup(name, passes["cache_on"][0][name], summary["cache_off"][name]["median"])
            for name, *_ in METRICS
        }
        result["outputs_equal"] = {
            "cache_on_vs_off": sum(a == b for a, b in zip(tokens["cache_on"], tokens["cache_off"])),
            "of": workload.num_prompts,
        }
    if "mlx_lm" in args.sides:
        result["peer"] = {
            f"throughput_vs_mlx_lm_{side.removeprefix('cache_')}": summary[side]["throughput"]["median"]
            / summary["mlx_lm"]["throughput"]["median"]
            for side in ("cache_off", "cache_on")
            if side in args.sides
        }
        reference = next((side for side in ("cache_off", "cache_on") if side in args.sides), None)
        if reference is not None:
            result.setdefault("outputs_equal", {"of": workload.num_prompts})
            result["outputs_equal"][f"mlx_lm_vs_{reference.removeprefix('cache_')}"] = sum(
                a == b for a, b in zip(tokens["mlx_lm"], tokens[reference])
            )
    if hits:
        cold_expected, warm_expected, queries = expected_hit_tokens(workload, args.block_size)
        warm = hits[1:]
        result["hit_rate"] = {
            "cold": hits[0][0] / hits[0][1],
            "warm": sum(h for h, _ in warm) / sum(q for _, q in warm) if warm else None,
            "cold_tokens": list(hits[0]),
            "warm_tokens": [list(h) for h in warm],
            "expected": {"cold": cold_expected / queries, "warm": warm_expected / queries},
        }
    if profiler:
        import io
        import pstats

        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream).strip_dirs()
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(30)
        Path(args.profile).write_text(stream.getvalue())
    return result


class _NullBar:
    def update(self, _n: int = 1) -> None:
        pass


# -- output ----------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    magnitude = abs(value)
    return f"{value:.0f}" if magnitude >= 100 else f"{value:.1f}" if magnitude >= 10 else f"{value:.2f}"


def table(result: dict) -> str:
    sides = list(result["sides"])
    summary = {side: result["sides"][side]["summary"] for side in sides}
    w = result["workload"]
    lines = [
        f"prefix repetition: {Workload(**w).describe()}",
        (
            f"model {result['model']} ({(result['model_parameters'] or 0) / 1e6:.1f}M params), "
            f"device {result['device']}, "
            f"MLX {result['mlx_version']}, mlx-lm {result['mlx_lm_version']}, BLAS {result['blas']}"
        ),
        (
            f"engine {', '.join(f'{k}={v}' for k, v in result['engine'].items())}; "
            f"mlx-lm BatchGenerator completion_batch_size={result['mlx_lm']['completion_batch_size']}"
        ),
        f"{result['repeats']} passes per side: median +- population stdev",
        "",
    ]
    header = ["metric", *(SIDE_LABELS[s] for s in sides)]
    has_ratio = "ratios" in result
    if has_ratio:  # after the two engine columns (--sides keeps cache off, cache on, mlx-lm order)
        header.insert(3, "ratio")
    rows = []
    for name, label, unit, _ in METRICS:
        cells = [f"{fmt(summary[s][name]['median'])} +- {fmt(summary[s][name]['stdev'])}" for s in sides]
        if has_ratio:
            cells.insert(2, f"{result['ratios'][name]:.2f}x")
        rows.append([f"{label} ({unit})", *cells])
    if "hit_rate" in result:
        hit = result["hit_rate"]
        for key in ("cold", "warm"):
            value = "-" if hit[key] is None else f"{100 * hit[key]:.1f} %"
            cells = ["-" if s != "cache_on" else value for s in sides]
            if has_ratio:
                cells.insert(2, "")
            rows.append([f"Hit rate {key} ({'first pass' if key == 'cold' else 'later passes'})", *cells])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        cells = enumerate(zip(row, widths))
        return "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in cells)

    lines += [render(header), "  ".join("-" * width for width in widths), *map(render, rows), ""]
    if has_ratio:
        cold = result["ratios_cold_pass"]
        lines.append(
            f"ratio = cache on over cache off (>1: cache on is better); cold pass alone: "
            f"throughput {cold['throughput']:.2f}x, TTFT P50 {cold['ttft_p50']:.2f}x"
        )
    if "peer" in result:
        lines.append(
            "ours over mlx-lm BatchGenerator (output throughput): "
            + ", ".join(f"cache {k.rsplit('_', 1)[-1]} {v:.2f}x" for k, v in result["peer"].items())
        )
    if "outputs_equal" in result:
        eq = result["outputs_equal"]
        lines.append(
            "identical greedy outputs: "
            + ", ".join(
                f"{k.replace('_vs_', ' vs ').replace('_', '-')} {v}/{eq['of']}"
                for k, v in eq.items()
                if k != "of"
            )
        )
    if "hit_rate" in result:
        exp = result["hit_rate"]["expected"]
        lines.append(
            f"expected hit rate for this shape: cold {100 * exp['cold']:.1f} %, "
            f"warm {100 * exp['warm']:.1f} %"
        )
    lines.append(f"wall time {result['wall_s']:.0f} s")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """TTFT P50/P99 and output throughput per side: bars at the median, whiskers +- stdev, a dot per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(result["sides"])
    labels = [SIDE_LABELS[s] for s in sides]
    colors = {"cache_off": "#999999", "cache_on": "#2b7bba", "mlx_lm": "#e08a2c"}
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))

    def bars(axis, metric: str, scale: float, offset: float, width: float, alpha: float) -> None:
        for i, side in enumerate(sides):
            summary = result["sides"][side]["summary"][metric]
            axis.bar(
                i + offset,
                summary["median"] * scale,
                width,
                yerr=summary["stdev"] * scale,
                capsize=3,
                color=colors[side],
                alpha=alpha,
            )
            values = [p[metric] * scale for p in result["sides"][side]["passes"]]
            axis.plot([i + offset] * len(values), values, "k.", markersize=4)

    bars(left, "ttft_p50", 1e-3, -0.2, 0.38, 1.0)
    bars(left, "ttft_p99", 1e-3, 0.2, 0.38, 0.55)
    left.set_xticks(range(len(sides)), labels)
    left.set_ylabel("seconds (lower is better)")
    left.set_title("Time to first token: P50 (solid), P99 (light)")
    bars(right, "throughput", 1.0, 0.0, 0.6, 1.0)
    right.set_xticks(range(len(sides)), labels)
    right.set_ylabel("output tokens / s (higher is better)")
    right.set_title("Output throughput")
    w = result["workload"]
    figure.suptitle(
        f"prefix repetition ({w['num_prompts']} x [{w['prefix_len']} shared + {w['suffix_len']}] -> "
        f"{w['output_len']}), {result['model']}, {result['device']}, BLAS {result['blas'].split()[0]}; "
        f"median +- stdev of {result['repeats']} passes, a dot per pass "
        "(cache on: the first pass is cold)",
        fontsize=8,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- command line ----------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model", default="bench-llama", help="an embedded model name or a Hugging Face folder"
    )
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--suffix-len", type=int, default=128)
    parser.add_argument("--num-prefixes", type=int, default=1)
    parser.add_argument("--num-prompts", type=int, default=50)
    parser.add_argument("--output-len", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="passes per side (the first cache-on pass is cold, the others warm)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run under a minute: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    parser.add_argument(
        "--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}"
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--num-kv-blocks", type=int, default=None, help="default: room for every prompt at once"
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=64, help="engine max_num_seqs, and mlx-lm's completion_batch_size"
    )
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument(
        "--device", default=None, help="cpu, gpu, metal or cuda (default: $ENGINE_DEVICE or cpu)"
    )
    parser.add_argument(
        "--blas",
        choices=("auto", "openblas", "reference"),
        default="auto",
        help="auto: OpenBLAS when installed (Linux, via LD_PRELOAD), else MLX's bundled BLAS",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of TTFT and throughput per side")
    parser.add_argument(
        "--profile", metavar="PATH", help="cProfile the engine passes; write the top functions"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    chosen = {side.strip() for side in args.sides.split(",") if side.strip()}
    unknown = chosen - set(SIDES)
    if unknown or not chosen:
        parser.error(f"--sides: unknown {sorted(unknown)}; choose from {','.join(SIDES)}")
    args.sides = [side for side in SIDES if side in chosen]  # always in this order
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_blas(args.blas)
    result = run(args)
    print(table(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
