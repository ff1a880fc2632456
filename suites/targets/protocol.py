"""The target protocol: the least an engine offers for the conformance rules to run on it.

A target declares its capabilities; each rule names the capabilities it needs, and on a
target that lacks one the rule is reported *not applicable*, never passed. Hit expectations
follow the target's declared hit granularity, so one scenario checks a paged engine (whole
blocks of ``block_size`` tokens) and a token trie (granularity 1, such as mlx-lm's prompt
cache) alike: a prompt of n tokens is served at most n - 1 tokens from the cache (its last
token is always computed), rounded down to whole units of the granularity.
"""

from dataclasses import asdict, dataclass, fields
from typing import Protocol, runtime_checkable

from suites.prefix_oracle import predicted_hit_tokens


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a target offers. Every field defaults to the absent case."""

    hit_granularity: int = 0  # tokens per cacheable unit: the block size, or 1 for a token trie; 0: no prefix cache
    cached_tokens: bool = False  # a per-request count of prompt tokens served from the cache
    counters: bool = False  # cumulative (queries, hits) in tokens, vLLM's prefix_cache_{queries,hits}_total
    reset: bool = False  # the prefix cache can be emptied (vLLM's /reset_prefix_cache)
    cache_salt: bool = False  # a per-request salt; requests with different salts never share
    cache_off: bool = False  # a cache-off run of the same target, the reference of every comparison
    concurrent: bool = False  # generate() of several prompts runs them together, not one after another
    token_prompts: bool = False  # takes any token ids as a prompt (else text: only ids whose text encodes back)
    # Which generated tokens' KV a later prompt can hit: "none", "all-but-last" (the last sampled
    # token is never fed back: vLLM, this engine) or "all" (mlx-lm, which feeds it back).
    output_kv: str = "none"

    def lacks(self, needs: tuple[str, ...]) -> list[str]:
        """The capabilities among ``needs`` this target does not offer."""
        names = {f.name for f in fields(self)}
        unknown = set(needs) - names - {"prefix_cache", "caches_output"}
        if unknown:
            raise ValueError(f"unknown capabilities {sorted(unknown)}; known: caches_output, prefix_cache, {', '.join(sorted(names))}")
        derived = {"prefix_cache": self.hit_granularity > 0, "caches_output": self.output_kv != "none"}
        return [need for need in needs if not derived.get(need, getattr(self, need, False))]

    def as_dict(self) -> dict:
        return asdict(self)

    def kv_sequence(self, prompt: list[int], output: list[int]) -> list[int]:
        """The tokens whose KV a finished request leaves in this target's cache."""
        kept = {"none": 0, "all-but-last": max(len(output) - 1, 0), "all": len(output)}[self.output_kv]
        return [*prompt, *output[:kept]]

    def expected_hit(self, prompt: list[int], cached: list[list[int]]) -> int:
        """Tokens of ``prompt`` a conforming target serves from ``cached`` (KV sequences it holds):
        the longest shared prefix in whole units of the granularity, never the last prompt token."""
        return predicted_hit_tokens(prompt, cached, self.hit_granularity)


@dataclass(frozen=True, slots=True)
class Completion:
    """One request's result, as every target reports it."""

    token_ids: list[int]
    cached_tokens: int | None  # None where the target does not report it


@runtime_checkable
class Target(Protocol):
    """An engine under test. Prompts are token ids; generation is greedy and ignores EOS."""

    name: str
    version: str
    capabilities: Capabilities

    def generate(self, prompts: list[list[int]], max_tokens: int, cache_salt: str | None = None) -> list[Completion]:
        """Greedy completions of ``prompts``, in order; concurrently where ``capabilities.concurrent``."""

    def reference(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """The same target's cache-off output for ``prompts`` (needs ``cache_off``)."""

    def counters(self) -> tuple[int, int]:
        """Cumulative (queries, hits) in tokens (needs ``counters``)."""

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache and its counters' baseline; True once done (needs ``reset``)."""

    def close(self) -> None:
        """Release the target (stop its server, free its memory)."""


@dataclass(frozen=True, slots=True)
class TargetOptions:
    """What the command line (or a test) tells a target's factory."""

    model: str  # a Hugging Face folder (by default the embedded tiny model's) or an embedded name
    url: str | None = None  # base URL of an OpenAI-compatible server (the openai target)
    reference_url: str | None = None  # the same server with its prefix cache off, for the cache-off reference
    block_size: int | None = None  # the server's hit granularity where it cannot tell (vLLM: --block-size)
