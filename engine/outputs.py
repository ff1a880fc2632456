"""What LLM.generate returns, and the prefix-cache counters in Prometheus text format."""

from dataclasses import dataclass

import numpy as np

from engine.kv import PrefixCacheStats


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # the generated tokens
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    finish_reason: str  # "length" or "stop"
    text: str | None = None
    num_preemptions: int = 0
    logits: np.ndarray | None = None  # [len(token_ids), vocab], with SamplingParams(return_logits=True)


@dataclass(frozen=True, slots=True)
class TokenUpdate:
    """One token sampled for one request by ``LLM.step``; ``output`` is set when it finished."""

    request_id: str
    token_id: int
    output: RequestOutput | None = None

    @property
    def finished(self) -> bool:
        return self.output is not None


def prometheus_text(stats: PrefixCacheStats, model_name: str) -> str:
    labels = f'{{model_name="{model_name}"}}'
    lines = []
    for name, help_text, value in (
        ("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.", stats.queries),
        ("prefix_cache_hits_total", "Prompt tokens served from the prefix cache.", stats.hits),
        ("prefix_cache_requests_total", "Requests looked up in the prefix cache.", stats.requests),
    ):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name}{labels} {value}"]
    return "\n".join(lines) + "\n"
