"""The ``engine`` target: this repository's engine, in process (the default target)."""

from importlib.metadata import PackageNotFoundError, version

from engine import LLM, SamplingParams
from suites.targets.protocol import Capabilities, Completion, TargetOptions


class EngineTarget:
    """Our ``LLM`` seen through the target protocol: what every peer is held to, held to it too."""

    name = "engine"

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        try:
            self.version = version("mlx-prefix-conformance")
        except PackageNotFoundError:  # a source tree on PYTHONPATH (tools/gpu on the lent GPU)
            self.version = "source tree, not installed"
        self.capabilities = Capabilities(
            hit_granularity=llm.config.block_size,
            cached_tokens=True,
            counters=True,
            reset=True,
            cache_salt=True,
            cache_off=True,
            concurrent=True,
            token_prompts=True,
            output_kv="all-but-last",
        )

    def _params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def generate(self, prompts: list[list[int]], max_tokens: int, cache_salt: str | None = None) -> list[Completion]:
        outputs = self.llm.generate(prompts, self._params(max_tokens), cache_salt=cache_salt)
        return [Completion(output.token_ids, output.num_cached_tokens) for output in outputs]

    def reference(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """The same engine with caching off, on the same pool; caching is switched back on after."""
        self.llm.reconfigure(enable_prefix_caching=False)
        try:
            return [output.token_ids for output in self.llm.generate(prompts, self._params(max_tokens))]
        finally:
            self.llm.reconfigure(enable_prefix_caching=True)

    def counters(self) -> tuple[int, int]:
        stats = self.llm.prefix_cache_stats()
        return stats.queries, stats.hits

    def reset_prefix_cache(self) -> bool:
        return self.llm.reset_prefix_cache()

    def close(self) -> None:
        """The shared LLM belongs to the test session; it closes it."""


def open_target(options: TargetOptions, llm: LLM | None = None) -> EngineTarget:
    return EngineTarget(llm if llm is not None else LLM(model=options.model))
