"""The peer adapters on tiny-qwen3: mlx-lm in process, mlx_lm.server over HTTP, the openai client.

Each adapter's greedy output for a cold prompt is this engine's cache-off output, token for
token (MLX's CPU backend computes both bit for bit alike); the cached-token counts are the
ones mlx-lm's source implies; the capabilities are the ones detected; and mlx-lm issue #1215
(an exact full-prompt hit) raises, in process and over HTTP, where the server then stays dead.
The tests that start servers (about 7 s each on two cores) carry the ``model`` marker like all
of this file.
"""

from importlib.metadata import version

import numpy as np
import pytest

from engine import SamplingParams
from engine.kv import PrefixCacheStats
from engine.models import resolve_model
from engine.outputs import prometheus_text
from suites.targets.protocol import Capabilities, Completion, TargetOptions

pytestmark = pytest.mark.model

MAX_TOKENS = 8
MLX_LM_VERSION = version("mlx-lm")
WORDS = "the cat sat on a mat and then dog ran to park while it was raining".split()


@pytest.fixture(scope="module")
def folder():
    return resolve_model("tiny-qwen3")


@pytest.fixture(scope="module")
def tokenizer(folder):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(folder)


def engine_cache_off(llm, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    llm.reconfigure(enable_prefix_caching=False)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return [output.token_ids for output in outputs]


def text_prompts(tokenizer, seed: int, count: int, words: int = 9) -> list[list[int]]:
    """Prompts of whole words whose text encodes back to the same ids (mlx_lm.server takes text)."""
    rng = np.random.default_rng(seed)
    prompts = [tokenizer.encode(" ".join(rng.choice(WORDS, size=words))) for _ in range(count)]
    assert all(tokenizer.encode(tokenizer.decode(p)) == p for p in prompts)
    return prompts


def round_trip_exchange(llm, tokenizer, seed: int) -> list[int]:
    """A prompt whose text, with its greedy output appended, still encodes to the same ids:
    what a text-only server must be sent to see prompt + output as one cached sequence."""
    for prompt in text_prompts(tokenizer, seed, 50):
        (output,) = engine_cache_off(llm, [prompt])
        if tokenizer.encode(tokenizer.decode(prompt + output)) == prompt + output:
            return prompt
    raise AssertionError("no prompt among 50 keeps its text with its output appended")


# -- mlx-lm in process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def mlx_lm(folder):
    from suites.targets.mlx_lm_target import open_target

    target = open_target(TargetOptions(model=str(folder)))
    yield target
    target.close()


@pytest.fixture
def fresh_mlx_lm(mlx_lm):
    assert mlx_lm.reset_prefix_cache()
    return mlx_lm


def test_mlx_lm_declares_what_its_prompt_cache_offers(mlx_lm):
    assert (mlx_lm.name, mlx_lm.version) == ("mlx-lm", MLX_LM_VERSION)
    assert mlx_lm.capabilities == Capabilities(
        hit_granularity=1, cached_tokens=True, counters=False, reset=True, cache_salt=False,
        cache_off=True, concurrent=True, token_prompts=True, output_kv="all",
    )
    with pytest.raises(ValueError, match="no cache salt"):
        mlx_lm.generate([[1, 2, 3]], 1, cache_salt="a")


def test_mlx_lm_cold_outputs_equal_the_engine_cache_off(fresh_mlx_lm, llm, tokenizer):
    prompts = [[5], [9, 4], *text_prompts(tokenizer, 1, 3), list(range(1, 70))]
    prompts.append(prompts[-1])  # the same prompt twice in one batch: both are looked up before either runs
    expected = engine_cache_off(llm, prompts)
    completions = fresh_mlx_lm.generate(prompts, MAX_TOKENS)
    assert [c.token_ids for c in completions] == expected
    assert [c.cached_tokens for c in completions] == [0] * len(prompts)
    assert fresh_mlx_lm.reference(prompts, MAX_TOKENS) == expected


def test_mlx_lm_serves_a_repeated_prompt_but_its_last_token(fresh_mlx_lm, llm, tokenizer):
    prompts = text_prompts(tokenizer, 2, 2)
    first = fresh_mlx_lm.generate(prompts, MAX_TOKENS)
    again = fresh_mlx_lm.generate(prompts, MAX_TOKENS)
    assert [c.cached_tokens for c in again] == [len(p) - 1 for p in prompts]
    assert [c.token_ids for c in again] == [c.token_ids for c in first] == engine_cache_off(llm, prompts)


def test_mlx_lm_keeps_the_kv_of_every_output_token(fresh_mlx_lm):
    """The evidence for output_kv = "all": a prompt continuing prompt + output hits all of it."""
    prompt = list(range(100, 120))
    (first,) = fresh_mlx_lm.generate([prompt], MAX_TOKENS)
    follow = [*prompt, *first.token_ids, 7, 8, 9]
    (second,) = fresh_mlx_lm.generate([follow], 2)
    assert second.cached_tokens == len(prompt) + MAX_TOKENS == 28
    caps = fresh_mlx_lm.capabilities
    assert second.cached_tokens == caps.expected_hit(follow, [caps.kv_sequence(prompt, first.token_ids)])


def test_mlx_lm_reset_empties_its_prompt_cache(fresh_mlx_lm):
    prompt = list(range(200, 215))
    fresh_mlx_lm.generate([prompt], 2)
    assert fresh_mlx_lm.reset_prefix_cache()
    (again,) = fresh_mlx_lm.generate([prompt], 2)
    assert again.cached_tokens == 0


def test_mlx_lm_raises_on_an_exact_full_prompt_hit_issue_1215(fresh_mlx_lm):
    """Not fixed here: the server's code path raises, so the adapter does."""
    prompt = list(range(300, 316))
    (first,) = fresh_mlx_lm.generate([prompt], MAX_TOKENS)
    with pytest.raises(ValueError, match=r"Sequence \d+ has an empty prompt") as raised:
        fresh_mlx_lm.generate([prompt + first.token_ids], MAX_TOKENS)
    assert any("#1215" in note for note in raised.value.__notes__)
    (after,) = fresh_mlx_lm.generate([prompt], MAX_TOKENS)  # in process nothing died
    assert after.token_ids == first.token_ids


# -- mlx_lm.server, through the openai target -------------------------------------------


@pytest.fixture(scope="module")
def server(folder):
    from suites.targets.mlx_lm_server_target import open_target

    target = open_target(TargetOptions(model=str(folder)))
    yield target
    target.close()


def test_server_capabilities_are_detected_by_probing(server):
    assert (server.name, server.version) == ("mlx-lm-server", MLX_LM_VERSION)
    assert server.capabilities == Capabilities(
        hit_granularity=1, cached_tokens=True, counters=False, reset=False, cache_salt=False,
        cache_off=True, concurrent=True, output_kv="all",
    )
    assert server.evidence["kind"].startswith("mlx_lm.server")
    assert server.evidence["prompt"].startswith("text")  # it refuses token-id prompts
    assert server.evidence["output_kv"].startswith("all: measured")
    assert not server.client.ignores_eos


def test_server_cold_outputs_equal_the_engine_cache_off_and_a_repeat_is_served(server, llm, tokenizer):
    prompts = text_prompts(tokenizer, 3, 3)
    expected = engine_cache_off(llm, prompts)
    cold = server.generate(prompts, MAX_TOKENS)
    assert [c.token_ids for c in cold] == expected
    assert [c.cached_tokens for c in cold] == [0, 0, 0]
    again = server.generate(prompts, MAX_TOKENS)
    assert [c.token_ids for c in again] == expected
    assert [c.cached_tokens for c in again] == [len(p) - 1 for p in prompts]
    assert server.reference(prompts, MAX_TOKENS) == expected


def test_the_reference_server_keeps_nothing(server, tokenizer):
    from suites.targets.openai_target import CompletionClient

    client = CompletionClient(server.reference_server.url, tokenizer)
    client.probe(None)
    (prompt,) = text_prompts(tokenizer, 4, 1)
    assert [client.complete(prompt, 2).cached_tokens for _ in range(2)] == [0, 0]
    client.close()


def test_the_openai_target_recognises_mlx_lm_server_untold(server, folder):
    from suites.targets.openai_target import open_target

    target = open_target(TargetOptions(model=str(folder), url=server.server.url))
    try:
        assert (target.kind, target.version) == ("mlx_lm.server", MLX_LM_VERSION)
        assert target.capabilities.hit_granularity == 1
        assert not target.capabilities.cache_off
        with pytest.raises(NotImplementedError):
            target.reference([[1]], 1)
    finally:
        target.close()


def test_server_dies_on_an_exact_full_prompt_hit_issue_1215_and_stays_dead(folder, llm, tokenizer):
    from suites.targets.mlx_lm_server_target import ServerDied, open_target

    prompt = round_trip_exchange(llm, tokenizer, 5)
    target = open_target(TargetOptions(model=str(folder)))
    try:
        (first,) = target.generate([prompt], MAX_TOKENS)
        with pytest.raises(ServerDied, match=r"(?s)died: .*ValueError: Sequence \d+ has an empty prompt"):
            target.generate([prompt + first.token_ids], MAX_TOKENS)
        assert target.dead is not None
        with pytest.raises(ServerDied, match="server died earlier: "):
            target.generate([prompt], MAX_TOKENS)
    finally:
        target.close()


# -- the openai client's parts, without a server ------------------------------------------


def test_prefix_cache_counters_are_summed_over_label_sets():
    from suites.targets.openai_target import prefix_cache_counters

    vllm_text = "\n".join([
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
        "# TYPE vllm:prefix_cache_queries_total counter",
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 300.0',
        'vllm:prefix_cache_queries_total{engine="1",model_name="m"} 200.0',
        'vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e9',
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
        "# TYPE vllm:prefix_cache_hits_total counter",
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 128.0',
        'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 64.0',
        "",
    ])
    assert prefix_cache_counters(vllm_text) == ("vllm:prefix_cache_queries_total", 500, 192)
    ours = prometheus_text(PrefixCacheStats(queries=40, hits=16, requests=3), "tiny")
    assert prefix_cache_counters(ours) == ("prefix_cache_queries_total", 40, 16)
    assert prefix_cache_counters("# nothing here\n") is None


def test_a_text_prompt_that_does_not_survive_encoding_is_refused(tokenizer):
    from suites.targets.openai_target import CompletionClient, RequestShape

    client = CompletionClient("http://127.0.0.1:9", tokenizer)  # never reached: refused before sending
    client.shape = RequestShape(None, "text", "logprobs")
    # A word encoded in two pieces: its text encodes back as the word's own ids.
    pieces = next(
        pieces
        for word in WORDS
        for cut in range(2, len(word) + 1)
        if (pieces := [*tokenizer.encode(" " + word[:cut - 1]), *tokenizer.encode(word[cut - 1:])])
        != tokenizer.encode(" " + word)
    )
    with pytest.raises(ValueError, match="does not survive decode and encode"):
        client.complete(pieces, 1)
    client.close()


class CacheModel:
    """A server simulated by the protocol's own arithmetic: hits by granularity, and the KV
    its finished requests keep by ``output_kv``."""

    class Tokenizer:
        def encode(self, text):
            return [ord(c) for c in text]

    def __init__(self, unit: int, output_kv: str) -> None:
        self.capabilities = Capabilities(hit_granularity=unit, output_kv=output_kv)
        self.tokenizer = self.Tokenizer()
        self.sequences: list[list[int]] = []

    def complete_all(self, prompts, max_tokens, cache_salt=None):
        (prompt,) = prompts
        hit = self.capabilities.expected_hit(prompt, self.sequences)
        output = list(range(1000, 1000 + max_tokens))
        self.sequences.append(self.capabilities.kv_sequence(prompt, output))
        return [Completion(output, hit)]


@pytest.mark.parametrize("unit", [1, 16])
@pytest.mark.parametrize("output_kv", ["none", "all-but-last", "all"])
def test_the_output_kv_measurement_tells_the_three_kinds_apart(unit, output_kv):
    from suites.targets.openai_target import measure_output_kv

    measured, how = measure_output_kv(CacheModel(unit, output_kv), unit)
    assert measured == output_kv, how
