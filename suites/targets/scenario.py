"""One rule's scenario on a target: fresh prompts, and the oracle of what its cache holds.

Targets other than ours keep their cache from rule to rule (a server has no reset, mlx-lm's
trie matches from the first token on), so every prompt a scenario makes starts with a token
no earlier prompt of the session started with: nothing cached before the rule can serve it,
and the oracle only needs the sequences this rule left behind. Prompts are made of whole-word
tokens (" cat", " park") whose text encodes back to the same ids, so a target that takes only
text (mlx_lm.server) sees exactly these ids.
"""

import itertools
from functools import cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from suites.targets.protocol import Capabilities, Completion, Target


@cache
def tokenizer_of(model_folder: str) -> Tokenizer:
    return Tokenizer.from_file(str(Path(model_folder) / "tokenizer.json"))


@cache
def word_tokens(model_folder: str) -> tuple[int, ...]:
    """Ids whose text is a space and letters, and encodes back to that one id."""
    tokenizer = tokenizer_of(model_folder)
    words = []
    for token_id in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([token_id])
        is_word = len(text) > 2 and text[0] == " " and text[1:].isascii() and text[1:].isalpha()
        if is_word and tokenizer.encode(text, add_special_tokens=False).ids == [token_id]:
            words.append(token_id)
    return tuple(words)


class PromptSource:
    """Deterministic prompts for the whole session; each new family gets an unused first token."""

    def __init__(self, model_folder: str, seed: int = 1215) -> None:
        self.tokenizer = tokenizer_of(model_folder)
        self.words = word_tokens(model_folder)
        self.rng = np.random.default_rng(seed)
        self.first_tokens = itertools.cycle(self.rng.permutation(self.words).tolist())
        self.families = 0

    def family(self, length: int) -> list[int]:
        """A prompt of ``length`` tokens that shares no first token with any earlier family."""
        self.families += 1
        if self.families > len(self.words):
            raise RuntimeError(f"more than {len(self.words)} prompt families in one session: first tokens would repeat")
        return [next(self.first_tokens), *self.continuation(length - 1)]

    def round_trips(self, ids: list[int]) -> bool:
        """Whether a text-only target, given the text of ``ids``, sees exactly ``ids``."""
        return self.tokenizer.encode(self.tokenizer.decode(ids), add_special_tokens=False).ids == ids

    def continuation(self, length: int) -> list[int]:
        return self.rng.choice(self.words, size=length).tolist()

    def diverging(self, prefix: list[int], length: int, avoid: list[list[int]]) -> list[int]:
        """``prefix`` then tokens up to ``length``, its first new token unlike any in ``avoid`` at that place."""
        while True:
            tail = self.continuation(length - len(prefix))
            if all(len(other) <= len(prefix) or other[len(prefix)] != tail[0] for other in avoid):
                return [*prefix, *tail]


class Scenario:
    """A rule's run on a target: requests in order, with the hits the declared rules predict."""

    def __init__(self, target: Target, prompts: PromptSource, hits: list | None = None) -> None:
        self.target = target
        self.prompts = prompts
        self.capabilities: Capabilities = target.capabilities
        self.cached: list[list[int]] = []  # KV sequences this scenario left in the target's cache
        self.hits = hits if hits is not None else []  # (expected, observed) per request, for the report

    def exchange(self, length: int, max_tokens: int, extra: int = 0) -> tuple[list[int], list[int], list[int]]:
        """A prompt, its cache-off output, and the follow-up prompt + output + ``extra`` new tokens,
        chosen so that a text-only target receives the follow-up's exact ids (outputs are any ids)."""
        for _ in range(50):
            prompt = self.prompts.family(length)
            (output,) = self.target.reference([prompt], max_tokens)
            follow_up = [*prompt, *output, *self.prompts.continuation(extra)]
            if self.capabilities.token_prompts or self.prompts.round_trips(follow_up):
                return prompt, output, follow_up
        raise RuntimeError(f"no prompt of {length} tokens in 50 whose output survives decode and encode")

    def expected_hit(self, prompt: list[int]) -> int:
        return self.capabilities.expected_hit(prompt, self.cached)

    def run(self, prompts: list[list[int]], max_tokens: int, cache_salt: str | None = None) -> list[Completion]:
        """Send ``prompts`` together and record what they leave cached (nothing is predicted here)."""
        completions = self.target.generate(prompts, max_tokens, cache_salt)
        self.cached += [self.capabilities.kv_sequence(p, c.token_ids) for p, c in zip(prompts, completions, strict=True)]
        return completions

    def run_one(self, prompt: list[int], max_tokens: int, cache_salt: str | None = None) -> tuple[Completion, int]:
        """One request; returns its completion and the hit the oracle predicted for it."""
        expected = self.expected_hit(prompt)
        (completion,) = self.run([prompt], max_tokens, cache_salt)
        self.record_hits([prompt], [expected], [completion])
        return completion, expected

    def record_hits(self, prompts: list[list[int]], expected: list[int], completions: list[Completion]) -> None:
        for prompt, hit, completion in zip(prompts, expected, completions, strict=True):
            self.hits.append({"prompt_tokens": len(prompt), "expected": hit, "observed": completion.cached_tokens})
