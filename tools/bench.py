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
    tools/bench --url http://127.0.0.1:8000                      # any OpenAI-compatible server
    tools/bench --serve engine --serve mlx-lm-server --offline   # both servers and the offline engine

Servers (``--url``, ``--serve``; tools/bench_http.py) get the same workload over HTTP,
streamed, one after another, in one side-by-side table with the offline sides of ``--offline``
(tools/bench_side_by_side.py); their prompts are whole-word tokens, so that a server that takes
only text reads them as the intended ids (tools/bench_text.py), and the offline sides of the
same run get the same prompts.

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


def workload_of(args) -> Workload:
    return Workload(args.prefix_len, args.suffix_len, args.num_prefixes, args.num_prompts, args.output_len, args.seed)


def engine_settings_of(args, workload: Workload) -> dict:
    """The engine's settings for this workload: by default a pool with room for every request at once."""
    blocks_per_request = -(-(workload.prompt_len + workload.output_len) // args.block_size)
    return {
        "block_size": args.block_size,
        "num_kv_blocks": args.num_kv_blocks or workload.num_prompts * blocks_per_request + 64,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": max(4096, workload.prompt_len + workload.output_len),
    }


def describe_run(args, workload: Workload, engine_settings: dict, model_parameters: int, device: str) -> dict:
    """What a result records besides its measurements: workload, settings, versions, machine."""
    import mlx.core as mx
    import mlx_lm

    return {
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
        "warmup_passes": args.warmup_passes,
        "command": " ".join(["tools/bench", *sys.argv[1:]]),
    }


def run(args, prompts: list[list[int]] | None = None) -> dict:
    """The offline sides; ``prompts`` (token ids) replace the workload's own draws where given."""
    from tqdm import tqdm

    from engine import LLM, SamplingParams
    from engine.runner.device import select_device

    try:
        select_device(args.device)
    except (RuntimeError, ValueError) as error:
        sys.exit(f"tools/bench: {error}")
    workload = workload_of(args)
    engine_settings = engine_settings_of(args, workload)
    started = time.perf_counter()
    llm = LLM(model=args.model, enable_prefix_caching=False, device=args.device, **engine_settings)
    peer_model = load_peer_model(llm.model_path) if "mlx_lm" in args.sides else None
    if prompts is None:
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
            for _ in range(args.warmup_passes):
                run_mlx_lm_pass(peer_model, prompts, workload.output_len, args.max_num_seqs, _NullBar())
            for _ in range(args.repeats):
                metrics, tokens[side] = run_mlx_lm_pass(
                    peer_model, prompts, workload.output_len, args.max_num_seqs, bar
                )
                passes[side].append(metrics)
            continue
        # A new cache (and fresh counters) for each engine side: the first pass is cold.
        llm.reconfigure(model=args.model, enable_prefix_caching=side == "cache_on", **engine_settings)
        if args.warmup_passes:
            for _ in range(args.warmup_passes):
                run_engine_pass(llm, prompts, params, _NullBar())
            # Forget what the warm-up cached: the first timed pass is cold again.
            llm.reconfigure(model=args.model, enable_prefix_caching=side == "cache_on", **engine_settings)
        for _ in range(args.repeats):
            metrics, tokens[side], pass_hits = run_engine_pass(llm, prompts, params, bar)
            passes[side].append(metrics)
            if side == "cache_on":
                hits.append(pass_hits)
        if profiler:
            # One more pass, untimed: cProfile slows the Python of a step (on a GPU, most
            # of it), so a profiled pass would understate the engine beside mlx-lm.
            profiler.enable()
            run_engine_pass(llm, prompts, params, _NullBar())
            profiler.disable()
    bar.close()
    device = llm.device
    model_parameters = num_parameters(llm.model_path)
    llm.close()

    summary = {side: summarize(passes[side]) for side in args.sides}
    result = {
        **describe_run(args, workload, engine_settings, model_parameters, device),
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


# -- servers over HTTP ----------------------------------------------------------------


def url_target(value: str) -> tuple[str, str, str]:
    """--url [NAME=]URL -> ("url", NAME, URL); the name defaults to the URL's host:port."""
    name, sep, url = value.partition("=")
    if not sep or "://" in name:
        name, url = value.split("://", 1)[-1].rstrip("/"), value
    if not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{value!r}: a URL starts with http:// or https://")
    return ("url", name, url.rstrip("/"))


def serve_target(value: str) -> tuple[str, str, str]:
    from tools.bench_serve import LABELS, SERVERS, available

    if value not in SERVERS:
        raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(SERVERS)}")
    if why := available(value):
        raise argparse.ArgumentTypeError(why)
    return ("serve", value, LABELS[value])


def expected_server_hits(kind: str, name: str, workload: Workload, block_size: int,
                         lengths: list[int]) -> dict | None:
    """The hit rates a server's design implies on this workload, where the bench knows it."""
    if kind == "serve" and name == "engine":
        cold, warm, queries = expected_hit_tokens(workload, block_size)
        return {"cold": cold / queries, "warm": warm / queries,
                "why": f"block size {block_size}, full blocks only, never a prompt's last token"}
    if kind == "serve" and name == "mlx-lm-server":
        # A token trie keyed by prompt + output, filled when a request finishes: the cold pass
        # (every request in before the first one ends) finds nothing; in the warm pass each
        # prompt walks into its own earlier sequence and is served all but its last token.
        return {"cold": 0.0, "warm": sum(n - 1 for n in lengths) / sum(lengths),
                "why": "a token trie of finished sequences: cold nothing (while no request of the pass "
                "has finished), warm n - 1 of every prompt's n tokens"}
    return None


def run_servers(args) -> dict:
    """The servers of --url and --serve, one after another, and the offline sides with --offline."""
    from tqdm import tqdm

    from engine.models import resolve_model
    from engine.runner.device import select_device
    from tools import bench_serve
    from tools.bench_http import ServerError, measure
    from tools.bench_text import http_plan, load_tokenizer

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    if args.device:
        os.environ["ENGINE_DEVICE"] = args.device  # engine serve's device (mlx_lm.server picks its own)
    workload = workload_of(args)
    folder = resolve_model(args.model)
    plan = http_plan(workload, load_tokenizer(folder))
    settings = engine_settings_of(args, workload)
    if args.offline:
        result = run(args, prompts=plan.prompts)
    else:
        try:
            device = select_device(args.device)
        except (RuntimeError, ValueError) as error:
            sys.exit(f"tools/bench: {error}")
        result = describe_run(args, workload, settings, num_parameters(folder), device)
        del result["mlx_lm"]  # no offline mlx-lm side
    mlx_lm_settings = {
        "completion_batch_size": args.max_num_seqs,
        "prefill_batch_size": MLX_LM_PREFILL_BATCH_SIZE,
        "prefill_step_size": MLX_LM_PREFILL_STEP_SIZE,
        # Room for every sequence of the run (each pass's, the warm-up's and the probe's).
        "prompt_cache_size": args.repeats * workload.num_prompts + len(plan.warmup) + 1,
    }
    bar = tqdm(
        total=len(args.targets) * args.repeats * workload.num_prompts * workload.output_len,
        unit="chunk",
        desc="servers",
        disable=args.no_progress,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    servers = {}
    for kind, name, where in args.targets:
        bar.set_description(name)
        server = None
        try:
            if kind == "serve":
                server = bench_serve.start(name, folder, settings, mlx_lm_settings)
                url, label, command = server.url, where, " ".join(server.command)
            else:
                url, label, command = where, name, None
            measured = measure(url, plan, args.repeats, args.max_concurrency, lambda: bar.update(1))
        except (ServerError, RuntimeError) as error:
            tail = f"\n{name}'s log:\n{server.log_tail()}" if server is not None else ""
            sys.exit(f"tools/bench: {name}: {error}{tail}")
        finally:
            if server is not None:
                server.stop()
        lengths = [len(p) for p in plan.prompts] if measured["prompt_as"] == "token_ids" else plan.text_lengths
        servers[name] = {
            "label": label,
            "command": command,
            **measured,
            "expected_hit_rate": expected_server_hits(kind, name, workload, args.block_size, lengths),
        }
    bar.close()
    result["servers"] = servers
    result["prompts"] = "whole-word tokens of the model's tokenizer (tools/bench_text.py)"
    result["max_concurrency"] = args.max_concurrency
    result["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}
    result["wall_s"] = time.perf_counter() - started
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
        "--warmup-passes",
        type=int,
        default=0,
        help="untimed passes of the whole workload per side before its timed ones (on a GPU, the "
        "kernels and graphs of every shape a pass meets are built then; an engine side's cache is "
        "emptied after them, so its first timed pass is still cold)",
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
        "--profile", metavar="PATH",
        help="cProfile one extra, untimed pass of each engine side; write the top functions",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    servers = parser.add_argument_group(
        "servers over HTTP", "the same workload against OpenAI-compatible servers (POST /v1/completions, "
        "streamed), measured one after another in the order given, side by side in one table"
    )
    servers.add_argument(
        "--url", dest="targets", action="append", type=url_target, metavar="[NAME=]URL",
        help="a running server, e.g. http://127.0.0.1:8000 or vllm=http://gpu:8000 (repeatable)",
    )
    servers.add_argument(
        "--serve", dest="targets", action="append", type=serve_target, metavar="SERVER",
        help="start this server on the bench's model and settings, measure it, stop it: "
        "engine (python -m engine.serve) or mlx-lm-server (python -m mlx_lm server) (repeatable)",
    )
    servers.add_argument(
        "--offline", action="store_true", help="with servers: also run the offline sides (--sides) in the same run"
    )
    servers.add_argument(
        "--max-concurrency", type=int, default=None,
        help="requests in flight at most; unset: all at once (vllm bench serve --request-rate inf)",
    )
    args = parser.parse_args(argv)
    args.targets = args.targets or []
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
    if args.warmup_passes < 0:
        parser.error(f"--warmup-passes must be >= 0, got {args.warmup_passes}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be >= 1")
    if args.targets and args.plot:
        parser.error("--plot draws the offline sides only; leave out --url and --serve")
    if args.targets and args.profile and not args.offline:
        parser.error("--profile profiles the offline engine passes: add --offline")
    names = [name for _, name, _ in args.targets]
    if len(set(names)) < len(names):
        parser.error(f"two servers of the same name in {names}: name them, --url NAME=URL")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_blas(args.blas)
    if args.targets:
        from tools.bench_side_by_side import render

        result = run_servers(args)
        print(render(result), flush=True)
    else:
        result = run(args)
        print(table(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
