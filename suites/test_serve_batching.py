"""``engine serve`` batches the requests of concurrent clients (continuous batching).

Fifty clients at once on the seed benchmark's workload shape (one 512-token prefix, fifty
128-token suffixes, block size 16): the engine thread admits their requests between steps,
so several run in one step, and each client gets exactly the offline ``LLM.generate`` output
of its prompt. Which request of the cold pass misses depends on arrival order, so that pass is
held to the offline multiset of hits (one miss, 49 prefix hits) and the offline counters
(25088/32000); on the warm pass every hit is deterministic and is held per request
(624 tokens each; 31200/32000). A request that arrives while another runs joins it and finishes
first: no request waits for another.
"""

import asyncio

import httpx
import pytest

from engine import SamplingParams
from suites.engine_helpers import token_prompts
from suites.serve_helpers import (
    LONG_MAX_MODEL_LEN,
    LONG_MAX_TOKENS,
    greedy_body,
    metrics,
    reset_engine,
    serving,
)
from tools.bench_workload import Workload, prefix_repetition_prompts

pytestmark = pytest.mark.model

WORKLOAD = Workload(prefix_len=512, suffix_len=128, num_prompts=50, output_len=8)
COLD_HITS, WARM_HITS, QUERIES = 25088, 31200, 32000


async def send_all(url: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """Every prompt from its own client connection, all at once."""
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as http:
        responses = await asyncio.gather(
            *(http.post("/v1/completions", json=greedy_body(prompt, max_tokens)) for prompt in prompts))
    assert [response.status_code for response in responses] == [200] * len(prompts)
    return [response.json() for response in responses]


def counters(sample: dict[str, float]) -> tuple[float, float]:
    return sample["vllm:prefix_cache_queries_total"], sample["vllm:prefix_cache_hits_total"]


def test_fifty_concurrent_clients_share_the_running_batch_and_each_gets_the_offline_output(
        shared_llm, conformance, record_property):
    prompts = prefix_repetition_prompts(WORKLOAD, shared_llm.vocab_size, shared_llm.tokenizer.eos_token_ids or ())
    params = SamplingParams(max_tokens=WORKLOAD.output_len, ignore_eos=True)
    reset_engine(shared_llm)
    cold = shared_llm.generate(prompts, params)
    warm = shared_llm.generate(prompts, params)
    assert sorted(output.num_cached_tokens for output in cold) == [0] + [512] * 49
    assert [output.num_cached_tokens for output in warm] == [624] * 50  # floor(639 / 16) blocks

    with serving(shared_llm) as server:
        cold_answers = asyncio.run(send_all(server.url, prompts, WORKLOAD.output_len))
        with httpx.Client(base_url=server.url) as http:
            after_cold = metrics(http)
            warm_answers = asyncio.run(send_all(server.url, prompts, WORKLOAD.output_len))
            after_warm = metrics(http)

    for answers, offline in ((cold_answers, cold), (warm_answers, warm)):
        assert [answer["choices"][0]["token_ids"] for answer in answers] == [o.token_ids for o in offline]
        assert [answer["usage"]["prompt_tokens"] for answer in answers] == [WORKLOAD.prompt_len] * 50
    cold_hits = [answer["usage"]["prompt_tokens_details"]["cached_tokens"] for answer in cold_answers]
    warm_hits = [answer["usage"]["prompt_tokens_details"]["cached_tokens"] for answer in warm_answers]
    assert sorted(cold_hits) == sorted(output.num_cached_tokens for output in cold)
    assert warm_hits == [output.num_cached_tokens for output in warm]
    assert counters(after_cold) == (QUERIES, COLD_HITS)
    assert counters(after_warm) == (2 * QUERIES, COLD_HITS + WARM_HITS)

    batch = int(after_warm["engine_max_step_batch_size"])
    record_property("max_step_batch_size", batch)
    conformance.record_hit_rate("engine serve, 50 concurrent clients, cold", COLD_HITS, QUERIES)
    conformance.record_hit_rate("engine serve, 50 concurrent clients, warm", WARM_HITS, QUERIES)
    conformance.note(f"engine serve: 50 concurrent clients ran up to {batch} requests in one step")
    assert 1 < batch <= shared_llm.config.max_num_seqs


def test_a_request_that_arrives_while_another_runs_joins_it_and_finishes_first(shared_llm):
    long_prompt, short_prompt = token_prompts(1403, [40, 30])
    reset_engine(shared_llm)
    (expected,) = shared_llm.generate([short_prompt], SamplingParams(max_tokens=4, ignore_eos=True))
    with serving(shared_llm, max_model_len=LONG_MAX_MODEL_LEN) as server, \
            httpx.Client(base_url=server.url, timeout=60.0) as http:
        body = greedy_body(long_prompt, LONG_MAX_TOKENS, stream=True)
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the connection
            while not next(lines).startswith("data: "):
                pass
            short = http.post("/v1/completions", json=greedy_body(short_prompt, 4)).json()
            during = metrics(http)
    assert short["choices"][0]["token_ids"] == expected.token_ids
    assert during["vllm:num_requests_running"] == 1, "the long request still runs"
    assert during["engine_max_step_batch_size"] == 2, "the short request ran in the long one's steps"
