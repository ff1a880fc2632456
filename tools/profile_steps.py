"""Where a step's time goes on a device: the host's work, the host's waits, the device's kernels.

cProfile (``tools/bench --profile``) sees only Python, and on a GPU a launch that blocks
(MLX waits inside ``async_eval`` once too many command buffers are in flight) looks like
Python. This tool runs the bench's workload through ``LLM.step`` and splits each step into:
- build: Python building the graphs (scheduling, block tables, the model's layers);
- launch: MLX encoding them (``mx.async_eval``), including any wait for the device there;
- wait: reading the sampled tokens (``collect``): the host idle until the device is done;
and, where PyTorch is installed (its profiler reads CUPTI, which sees every CUDA kernel of
the process, MLX's too), the device's kernel time by kernel over a few decode steps.

    python -m tools.profile_steps --model qwen3-0.6b-shape --device cuda
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-0.6b-shape")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cache", choices=("on", "off"), default="on")
    parser.add_argument("--kernels", type=int, default=8, help="decode steps traced by the kernel profiler (0: none)")
    parser.add_argument("--num-prompts", type=int, default=50, help="the bench workload's (a smaller one is quicker)")
    parser.add_argument("--output-len", type=int, default=100)
    args = parser.parse_args(argv)

    import engine.llm as llm_module
    from engine import LLM, SamplingParams
    from engine.runner import model_runner
    from tools.bench_workload import Workload, prefix_repetition_prompts

    workload = Workload(num_prompts=args.num_prompts, output_len=args.output_len)
    llm = LLM(
        model=args.model, device=args.device, block_size=16, num_kv_blocks=2414, max_num_seqs=64,
        max_num_batched_tokens=2048, max_model_len=4096, enable_prefix_caching=args.cache == "on",
    )
    prompts = prefix_repetition_prompts(workload, llm.vocab_size, llm.tokenizer.eos_token_ids or ())
    params = SamplingParams(max_tokens=workload.output_len, ignore_eos=True)

    spent: dict[str, float] = defaultdict(float)

    def timing(name, function):
        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start

        return timed

    evaluate, collect = model_runner.ModelRunner._evaluate, llm_module.collect
    model_runner.ModelRunner._evaluate = timing("launch", evaluate)
    llm_module.collect = timing("wait", collect)
    try:
        _run_passes(args, llm, prompts, params, workload, spent)
    finally:  # the engine's own functions again (a caller in the same process, the suites)
        model_runner.ModelRunner._evaluate, llm_module.collect = evaluate, collect
    llm.close()
    return 0


def _run_passes(args, llm, prompts, params, workload, spent) -> None:
    """Two passes of the workload, a table each; then the kernels of a few decode steps."""
    from engine import SamplingParams

    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    for pass_name in ("first pass", "second pass"):
        rows = []
        for prompt in prompts:
            llm.add_request(prompt, params)
        while llm.has_unfinished_requests():
            spent.clear()
            start = time.perf_counter()
            updates = llm.step()
            total = time.perf_counter() - start
            rows.append((total, spent["launch"], spent["wait"], len(updates)))
        steps = len(rows)
        print(f"\n{pass_name}: {steps} steps, {sum(r[0] for r in rows):.2f} s, cache {args.cache}, device {llm.device}")
        full = [r for r in rows if r[3] == workload.num_prompts]
        for label, chosen in (("every step", rows), (f"steps of {workload.num_prompts} decode rows", full)):
            if not chosen:
                continue
            total = statistics.median(r[0] for r in chosen) * 1e3
            launch = statistics.median(r[1] for r in chosen) * 1e3
            wait = statistics.median(r[2] for r in chosen) * 1e3
            print(
                f"  {label:<28} n={len(chosen):4d}  step {total:6.2f} ms = build {total - launch - wait:6.2f}"
                f" + launch {launch:6.2f} + wait {wait:6.2f} (medians)"
            )

    if args.kernels:
        try:
            from torch.profiler import ProfilerActivity, profile
        except ImportError:
            print("\nno PyTorch here: no kernel profile")
            return
        for prompt in prompts:
            llm.add_request(prompt, params)
        while llm.has_unfinished_requests():
            if len(llm.step()) == workload.num_prompts and len(llm._runner.decode_context.request_ids) == workload.num_prompts:
                break
        import mlx.core as mx

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.kernels):
                if llm.has_unfinished_requests():
                    llm.step()
            mx.synchronize()
        print(f"\ndevice kernels over {args.kernels} decode steps of {workload.num_prompts} rows:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
        while llm.has_unfinished_requests():
            llm.step()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
