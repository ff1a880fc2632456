"""SamplingParams and the sampler: greedy, or seeded temperature / top-k / top-p.

The seeded sampler is stateless: the random draw for output step ``i`` of a request comes
from ``(seed, i)`` alone, so a seeded request gives the same tokens with the cache on or
off, alone or in any batch, and after a preemption.
"""

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Engine extension for the conformance suites: keep each step's raw logits.
    return_logits: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_token(logits: np.ndarray, params: SamplingParams, seed: int, step: int) -> int:
    """One token from one row of float32 logits. ``seed`` is the request's effective seed."""
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    order = np.argsort(-scaled, kind="stable")
    if params.top_k:
        order = order[: params.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        # Keep the smallest head whose mass reaches top_p (always at least one token).
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        probs = probs[:keep] / probs[:keep].sum()
        order = order[:keep]
    draw = np.random.default_rng([seed, step]).random()
    index = min(int(np.searchsorted(np.cumsum(probs), draw, side="right")), len(order) - 1)
    return int(order[index])
