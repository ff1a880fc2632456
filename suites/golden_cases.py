"""The catalogue of golden cases: which prompts, in which batches, for each block size.

A case's prompt is built from a seed, so the catalogue is code and the golden files hold
only outputs. Batches are submitted together, in order, so the suites can predict every
hit exactly: lengths around block boundaries, a family sharing a prefix, prompts that are
prefixes of one another, identical prompts in one batch, prompts longer than the per-step
token budget (chunked), and a long output whose decode blocks a later prompt reuses.
"""

from dataclasses import dataclass, field

import numpy as np

BLOCK_SIZES = (8, 16, 32)
GOLDEN_MODELS = ("tiny-qwen3", "tiny-llama")
VOCAB = 1024
TOKEN_BUDGET = 512  # the engine's default max_num_batched_tokens; chunked cases exceed it


@dataclass(frozen=True, slots=True)
class Case:
    name: str  # unique within a model, e.g. "bs16/boundaries/len17"
    block_size: int
    batch: str  # cases of one batch are generated together, in catalogue order
    prompt_token_ids: tuple[int, ...]
    max_tokens: int = 8
    # A continuation's prompt is another case's prompt plus that case's golden output.
    continues: str | None = None


@dataclass(slots=True)
class _Builder:
    block_size: int
    cases: list[Case] = field(default_factory=list)

    def random_tokens(self, seed: int, length: int) -> tuple[int, ...]:
        # Ids from 1: id 0 is the end-of-text token.
        rng = np.random.default_rng([self.block_size, seed])
        return tuple(int(t) for t in rng.integers(1, VOCAB, size=length))

    def add(self, batch: str, label: str, prompt: tuple[int, ...], **extra) -> None:
        self.cases.append(Case(f"bs{self.block_size}/{batch}/{label}", self.block_size, f"bs{self.block_size}/{batch}", prompt, **extra))


def cases_for_block_size(bs: int) -> list[Case]:
    b = _Builder(bs)
    for length in (1, bs - 1, bs, bs + 1, 2 * bs - 1, 2 * bs, 2 * bs + 1, 3 * bs):
        b.add("boundaries", f"len{length:03d}", b.random_tokens(100 + length, length))

    prefix = b.random_tokens(201, 2 * bs + 3)
    for index, suffix_length in enumerate((1, bs - 3, bs, 2 * bs + 5)):
        b.add("family", f"suffix{suffix_length:03d}", prefix + b.random_tokens(210 + index, suffix_length))

    longest = b.random_tokens(302, 3 * bs + 5)
    for length in (bs + 3, 2 * bs, 3 * bs + 5):
        b.add("prefixes", f"len{length:03d}", longest[:length])
    b.add("prefixes", "extended", longest + b.random_tokens(301, bs + 1))

    same = b.random_tokens(400, 2 * bs + 5)
    for copy in range(3):
        b.add("identical", f"copy{copy}", same)

    chunked = b.random_tokens(500, TOKEN_BUDGET + 3 * bs + 7)
    b.add("chunked", "long", chunked)
    b.add("chunked", "shares_long", chunked[: TOKEN_BUDGET + bs] + b.random_tokens(501, 2 * bs))

    start = b.random_tokens(600, bs + 2)
    b.add("long_output", "start", start, max_tokens=3 * bs + 4)
    b.add("continuation", "start_then_output", (), continues=f"bs{bs}/long_output/start")
    return b.cases


def golden_cases() -> list[Case]:
    """Every case, in generation order (the same catalogue for each model)."""
    return [case for bs in BLOCK_SIZES for case in cases_for_block_size(bs)]


def batches(cases: list[Case]) -> list[list[Case]]:
    grouped: dict[str, list[Case]] = {}
    for case in cases:
        grouped.setdefault(case.batch, []).append(case)
    return list(grouped.values())
