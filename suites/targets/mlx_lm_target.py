"""The ``mlx-lm`` target: mlx-lm's own prompt cache, in process, driven as ``mlx_lm.server`` drives it.

Each ``generate`` call is one server batch (``ResponseGenerator._generate`` in mlx-lm 0.32.2,
its text-completion path): every prompt is looked up with
``LRUPromptCache.fetch_nearest_cache`` and inserted into one ``BatchGenerator`` before the
first step, exactly as the server does with requests already queued; the cache of a prompt's
first segment is stored when its prefill reaches the last prompt token, and the whole
sequence's cache (prompt and every output token) when it finishes. Nothing is fixed here:
an exact hit on a stored sequence (``rest == []``) makes ``insert_segments`` raise
"Sequence N has an empty prompt" (mlx-lm issue #1215), and that exception leaves
``generate`` as it left the server's generation thread.

What mlx-lm keeps of a finished request, measured (suites/test_target_adapters.py): its
``GenerationBatch`` feeds each token into the model one step before reporting it, so the
cache of a finished request covers the prompt and *all* its output tokens, and a later
prompt of (prompt + output + more) reports ``cached_tokens == len(prompt) + len(output)``.
"""

from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from engine.models import resolve_model
from suites.targets.protocol import Capabilities, Completion, TargetOptions

ISSUE_1215 = (
    "mlx-lm issue #1215: a prompt equal to a sequence in the prompt cache (rest == []) "
    "leaves no token to prefill; mlx_lm.server's generation thread dies on this exception"
)

# mlx_lm.server's defaults (0.32.2): --prompt-cache-size, --decode-concurrency,
# --prompt-concurrency, --prefill-step-size.
PROMPT_CACHE_SIZE = 10
DECODE_CONCURRENCY = 32
PROMPT_CONCURRENCY = 8
PREFILL_STEP_SIZE = 2048


class MlxLmTarget:
    """mlx-lm's ``LRUPromptCache`` and ``BatchGenerator``, used as its server uses them."""

    name = "mlx-lm"

    def __init__(self, model_folder: Path, prompt_cache_size: int = PROMPT_CACHE_SIZE) -> None:
        self.model, self.tokenizer = load(str(model_folder))
        # The server's ModelProvider.model_key: (model path, adapter, draft model).
        self.model_key = (str(model_folder), None, None)
        self.prompt_cache = LRUPromptCache(prompt_cache_size)
        self.version = version("mlx-lm")
        self.capabilities = Capabilities(
            hit_granularity=1,  # a token trie
            cached_tokens=True,  # len(prompt) - len(rest), the server's usage.prompt_tokens_details
            counters=False,  # LRUPromptCache counts no lookups or hits
            # A real reset: LRUPromptCache.trim_to(n_sequences=0) is mlx-lm's own eviction,
            # run until nothing is left, and leaves the cache as a new server's. mlx_lm.server
            # has no route to it (the mlx-lm-server target declares none); in process it is ours.
            reset=True,
            cache_salt=False,
            cache_off=True,  # the same batch with an empty cache that keeps nothing (reference())
            concurrent=True,  # one BatchGenerator for all prompts of a call
            token_prompts=True,
            output_kv="all",  # measured: see the module docstring
        )

    def generate(self, prompts: list[list[int]], max_tokens: int,
                 cache_salt: str | None = None) -> list[Completion]:
        if cache_salt is not None:
            raise ValueError("mlx-lm has no cache salt (capabilities.cache_salt is False)")
        return self._run(prompts, max_tokens, self.prompt_cache)

    def reference(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """The same batch, served from a cache that is empty and keeps nothing (max_size 0:
        every insert is evicted at once), so each prompt is computed in full."""
        return [completion.token_ids for completion in self._run(prompts, max_tokens, LRUPromptCache(0))]

    def counters(self) -> tuple[int, int]:
        raise NotImplementedError("mlx-lm's prompt cache has no counters (capabilities.counters is False)")

    def reset_prefix_cache(self) -> bool:
        self.prompt_cache.trim_to(n_sequences=0)
        return len(self.prompt_cache) == 0

    def close(self) -> None:
        self.prompt_cache.trim_to(n_sequences=0)
        self.model = None
        mx.clear_cache()

    def _run(self, prompts: list[list[int]], max_tokens: int,
             prompt_cache: LRUPromptCache) -> list[Completion]:
        """One server batch (mlx_lm/server.py, ResponseGenerator._generate), EOS ignored.

        A BatchGenerator per call, where the server keeps one while it is busy: it holds no
        prefix cache of its own, so nothing cached is lost between calls."""
        generator = BatchGenerator(
            self.model,
            completion_batch_size=DECODE_CONCURRENCY,
            prefill_batch_size=PROMPT_CONCURRENCY,
            prefill_step_size=PREFILL_STEP_SIZE,
            stream=mx.default_stream(mx.default_device()),
        )
        try:
            uids, cached = self._insert(generator, prompts, max_tokens, prompt_cache)
            outputs = self._step_until_done(generator, uids, prompt_cache)
        finally:
            generator.close()
        return [Completion(outputs[uid], count) for uid, count in zip(uids, cached, strict=True)]

    def _insert(self, generator: BatchGenerator, prompts: Iterable[list[int]], max_tokens: int,
                prompt_cache: LRUPromptCache) -> tuple[list[int], list[int]]:
        uids, cached = [], []
        for prompt in prompts:
            # A text completion is one segment of type "assistant" (server._tokenize).
            segments = [list(prompt)]
            cache, rest = prompt_cache.fetch_nearest_cache(self.model_key, list(prompt))
            prompt_cache_count = len(prompt) - len(rest)
            n = prompt_cache_count
            while n > 0:  # the server's segment trimming, verbatim
                if n >= len(segments[0]):
                    n -= len(segments.pop(0))
                else:
                    segments[0] = segments[0][n:]
                    break
            try:
                (uid,) = generator.insert_segments(
                    segments=[segments],
                    max_tokens=[max_tokens],
                    caches=[cache],
                    all_tokens=[list(prompt[:prompt_cache_count])],
                    samplers=[make_sampler(0.0)],
                    logits_processors=[make_logits_processors()],
                    # No stop sequences: EOS is ignored (the server always stops at EOS).
                )
            except ValueError as error:
                if rest == []:
                    error.add_note(f"{ISSUE_1215}; a prompt of {len(prompt)} tokens, all of them cached")
                raise
            uids.append(uid)
            cached.append(prompt_cache_count)
        return uids, cached

    def _step_until_done(self, generator: BatchGenerator, uids: list[int],
                         prompt_cache: LRUPromptCache) -> dict[int, list[int]]:
        outputs: dict[int, list[int]] = {uid: [] for uid in uids}
        segment_types = {uid: ["assistant"] for uid in uids}
        running = set(uids)
        while running:
            prompt_responses, generation_responses = generator.next()
            # The server stores a prompt's cache at the end of each segment but the last
            # token's (the prompt minus its last token, here).
            ends = [r.uid for r in prompt_responses
                    if r.end_of_segment and not r.end_of_prompt and segment_types[r.uid]]
            for uid, (cache, tokens) in generator.extract_cache(ends).items():
                prompt_cache.insert_cache(self.model_key, tokens[:], cache, cache_type=segment_types[uid].pop())
            for response in generation_responses:
                outputs[response.uid].append(response.token)
                if response.finish_reason is not None:
                    prompt_cache.insert_cache(
                        self.model_key, response.all_tokens[:], response.prompt_cache, cache_type="assistant"
                    )
                    running.discard(response.uid)
        return outputs


def open_target(options: TargetOptions) -> MlxLmTarget:
    return MlxLmTarget(resolve_model(options.model))
