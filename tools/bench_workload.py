"""The prefix-repetition workload and the serving metrics of tools/bench.

The workload follows ``vllm bench serve --dataset-name prefix_repetition``: ``num_prefixes``
random prefixes of ``prefix_len`` tokens, each shared by ``num_prompts / num_prefixes``
prompts that end in their own random suffix of ``suffix_len`` tokens; the prompts are
shuffled, and all of them arrive at once (request rate inf). Token ids are drawn from one
``numpy`` generator seeded with ``seed``, so a seed always gives the same prompts.

The metrics follow vLLM's definitions, from the per-token timestamps of one pass:
TTFT = first token - arrival, E2EL = last token - arrival, TPOT = (E2EL - TTFT) / (n - 1)
per request, ITL = every gap between consecutive tokens of a request, and output
throughput = output tokens / (last token of the pass - arrival).
"""

import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Workload:
    prefix_len: int = 512
    suffix_len: int = 128
    num_prefixes: int = 1
    num_prompts: int = 50
    output_len: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prefix_len", "suffix_len", "num_prefixes", "num_prompts", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_prompts % self.num_prefixes:
            raise ValueError(
                f"num_prompts={self.num_prompts} is not a multiple of num_prefixes={self.num_prefixes}"
            )

    @property
    def prompt_len(self) -> int:
        return self.prefix_len + self.suffix_len

    def describe(self) -> str:
        return (
            f"{self.num_prefixes} prefix(es) x {self.prefix_len} tokens, {self.num_prompts} prompts with "
            f"{self.suffix_len}-token suffixes, {self.output_len} output tokens, seed {self.seed}, "
            "all at once"
        )


def prefix_repetition_prompts(
    workload: Workload, vocab_size: int, special_ids: Collection[int] = ()
) -> list[list[int]]:
    """The workload's prompts as token ids, never drawing a special token (e.g. end of text)."""
    rng = np.random.default_rng(workload.seed)
    allowed = np.setdiff1d(np.arange(vocab_size), np.fromiter(special_ids, dtype=np.int64))

    def draw(length: int) -> list[int]:
        return allowed[rng.integers(0, len(allowed), size=length)].tolist()

    prompts = []
    for _ in range(workload.num_prefixes):
        prefix = draw(workload.prefix_len)
        prompts += [
            prefix + draw(workload.suffix_len) for _ in range(workload.num_prompts // workload.num_prefixes)
        ]
    order = rng.permutation(len(prompts))
    return [prompts[index] for index in order]


def expected_hit_tokens(workload: Workload, block_size: int) -> tuple[int, int, int]:
    """(cold hits, warm hits, queries) in tokens for one pass, for block-granular caching.

    Cold: the first prompt of each prefix misses, the others hit the prefix's full blocks.
    Warm (the same prompts again): every prompt hits all its full blocks but the one that
    holds its last token, which is always computed.
    """
    per_prefix = workload.num_prompts // workload.num_prefixes
    max_hit = (workload.prompt_len - 1) // block_size * block_size
    cold = (
        workload.num_prefixes
        * (per_prefix - 1)
        * min(workload.prefix_len // block_size * block_size, max_hit)
    )
    return cold, workload.num_prompts * max_hit, workload.num_prompts * workload.prompt_len


# name, label, unit, higher is better
METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("throughput", "Output throughput", "tok/s", True),
    ("ttft_mean", "TTFT mean", "ms", False),
    ("ttft_p50", "TTFT P50", "ms", False),
    ("ttft_p99", "TTFT P99", "ms", False),
    ("tpot_p50", "TPOT P50", "ms", False),
    ("tpot_p99", "TPOT P99", "ms", False),
    ("itl_mean", "ITL mean", "ms", False),
    ("itl_p50", "ITL P50", "ms", False),
    ("itl_p99", "ITL P99", "ms", False),
    ("e2el_p50", "E2EL P50", "ms", False),
    ("e2el_p99", "E2EL P99", "ms", False),
    ("duration", "Pass duration", "s", False),
)
HIGHER_IS_BETTER = {name: higher for name, _, _, higher in METRICS}


def pass_metrics(arrival: float, token_times: Sequence[Sequence[float]]) -> dict[str, float]:
    """The metrics of one pass; ``token_times[r]`` holds request r's token timestamps (s)."""
    if any(not times for times in token_times):
        raise ValueError("every request must have produced at least one token")
    ttft = np.array([times[0] - arrival for times in token_times])
    e2el = np.array([times[-1] - arrival for times in token_times])
    tpot = np.array([(times[-1] - times[0]) / (len(times) - 1) for times in token_times if len(times) > 1])
    itl = np.concatenate([np.diff(times) for times in token_times])
    return latency_metrics(ttft, tpot, itl, e2el, sum(len(times) for times in token_times), float(e2el.max()))


def latency_metrics(
    ttft: np.ndarray, tpot: np.ndarray, itl: np.ndarray, e2el: np.ndarray, output_tokens: int, duration: float
) -> dict[str, float]:
    """METRICS from per-request latencies (s): means and percentiles in ms, throughput in tok/s."""
    ms = 1000.0

    def stat(values: np.ndarray, q: float | None = None) -> float:
        if values.size == 0:
            return float("nan")
        return float(np.mean(values) if q is None else np.percentile(values, q))

    return {
        "throughput": output_tokens / duration,
        "ttft_mean": stat(ttft) * ms,
        "ttft_p50": stat(ttft, 50) * ms,
        "ttft_p99": stat(ttft, 99) * ms,
        "tpot_p50": stat(tpot, 50) * ms,
        "tpot_p99": stat(tpot, 99) * ms,
        "itl_mean": stat(itl) * ms,
        "itl_p50": stat(itl, 50) * ms,
        "itl_p99": stat(itl, 99) * ms,
        "e2el_p50": stat(e2el, 50) * ms,
        "e2el_p99": stat(e2el, 99) * ms,
        "duration": duration,
    }


def summarize(passes: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric: median and population standard deviation over the passes."""
    return {
        name: {
            "median": statistics.median(p[name] for p in passes),
            "stdev": statistics.pstdev(p[name] for p in passes),
        }
        for name in passes[0]
    }


def speedup(name: str, ours: float, theirs: float) -> float:
    """How many times better ``ours`` is than ``theirs`` (> 1: better), whatever the metric's sense."""
    if HIGHER_IS_BETTER[name]:
        return ours / theirs if theirs else float("nan")
    return theirs / ours if ours else float("nan")
