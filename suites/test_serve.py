"""``engine serve`` over real HTTP: vLLM's wire format, the engine's outputs, and bad input.

One real uvicorn server for the module, on the session's ``LLM``; every expected output is
the offline ``LLM.generate`` output of the same request, computed before the server starts.
A bad request gets HTTP 400 in vLLM's error shape naming the field and the value, runs
nothing, and the server serves the next request as before.
"""

import httpx
import pytest

from engine import SamplingParams
from suites.engine_helpers import token_prompts
from suites.serve_helpers import events, greedy_body, idle, metrics, reset_engine, serving, wait_until

pytestmark = pytest.mark.model

MAX_TOKENS = 6
PROMPTS = token_prompts(1401, [40, 37, 21])
TEXT = " the cat sat on the mat and then the dog ran to the park"
SEEDED = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 7}


@pytest.fixture(scope="module")
def offline(shared_llm):
    """The engine's own outputs for this module's requests (greedy, or seeded as SEEDED)."""
    reset_engine(shared_llm)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = shared_llm.generate(PROMPTS, greedy)
    (text_output,) = shared_llm.generate([TEXT], greedy)
    (seeded,) = shared_llm.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **SEEDED))
    return {
        "tokens": [output.token_ids for output in outputs],
        "text_prompt": shared_llm.tokenizer.encode(TEXT),
        "text_tokens": text_output.token_ids,
        "seeded": seeded.token_ids,
        "decode": lambda ids: shared_llm.tokenizer.decode(ids, skip_special_tokens=True),
    }


@pytest.fixture(scope="module")
def server(offline, shared_llm):
    with serving(shared_llm, max_model_len=2048) as running:
        yield running


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        wait_until(lambda: idle(client), "the server is idle")
        assert client.post("/reset_prefix_cache").status_code == 200
        yield client


def complete(http: httpx.Client, body: dict) -> dict:
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_completion_is_the_engines_output_and_a_repeat_is_served_from_the_cache(http, offline):
    prompt = PROMPTS[0]
    first = complete(http, greedy_body(prompt, MAX_TOKENS))
    again = complete(http, greedy_body(prompt, MAX_TOKENS, model="tiny-qwen3"))
    for answer, cached in ((first, 0), (again, 32)):  # floor(39 / 16) whole blocks
        (choice,) = answer["choices"]
        assert answer["object"] == "text_completion" and answer["model"] == "tiny-qwen3"
        assert answer["id"].startswith("cmpl-")
        assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["stop_reason"] is None
        assert choice["token_ids"] == offline["tokens"][0]
        assert choice["prompt_token_ids"] == prompt
        assert choice["text"] == offline["decode"](offline["tokens"][0])
        assert answer["usage"] == {"prompt_tokens": 40, "completion_tokens": MAX_TOKENS, "total_tokens": 46,
                                   "prompt_tokens_details": {"cached_tokens": cached}}


def test_token_ids_come_back_only_when_asked(http):
    (choice,) = complete(http, {"prompt": PROMPTS[1], "max_tokens": 2})["choices"]
    assert "token_ids" not in choice and "prompt_token_ids" not in choice


def test_a_text_prompt_is_tokenized_as_the_engine_tokenizes_it(http, offline):
    answer = complete(http, greedy_body(TEXT, MAX_TOKENS))
    assert answer["choices"][0]["prompt_token_ids"] == offline["text_prompt"]
    assert answer["choices"][0]["token_ids"] == offline["text_tokens"]
    assert answer["usage"]["prompt_tokens"] == len(offline["text_prompt"])


def test_a_batch_gets_one_choice_per_prompt_in_order_and_its_usage_summed(http, offline):
    complete(http, greedy_body(PROMPTS, MAX_TOKENS))
    answer = complete(http, greedy_body(PROMPTS, MAX_TOKENS))
    assert [choice["index"] for choice in answer["choices"]] == [0, 1, 2]
    assert [choice["token_ids"] for choice in answer["choices"]] == offline["tokens"]
    assert [choice["prompt_token_ids"] for choice in answer["choices"]] == PROMPTS
    assert answer["usage"] == {"prompt_tokens": 98, "completion_tokens": 3 * MAX_TOKENS, "total_tokens": 116,
                               "prompt_tokens_details": {"cached_tokens": 32 + 32 + 16}}


def test_a_stream_sends_a_chunk_per_token_then_the_usage_then_done(http, offline):
    complete(http, greedy_body(PROMPTS[0], MAX_TOKENS))  # cached, so the usage shows a hit
    body = greedy_body(PROMPTS[:2], MAX_TOKENS, stream=True, stream_options={"include_usage": True})
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = events(response.iter_lines())
    assert received[-1] == "[DONE]"
    *chunks, usage = received[:-1]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 77, "completion_tokens": 2 * MAX_TOKENS, "total_tokens": 89,
        "prompt_tokens_details": {"cached_tokens": 32}}
    for index in (0, 1):
        mine = [chunk["choices"][0] for chunk in chunks if chunk["choices"][0]["index"] == index]
        assert len(mine) == MAX_TOKENS
        assert [token for choice in mine for token in choice["token_ids"]] == offline["tokens"][index]
        assert mine[0]["prompt_token_ids"] == PROMPTS[index]
        assert all("prompt_token_ids" not in choice for choice in mine[1:])
        assert "".join(choice["text"] for choice in mine) == offline["decode"](offline["tokens"][index])
        assert [choice["finish_reason"] for choice in mine] == [None] * (MAX_TOKENS - 1) + ["length"]
    assert len({chunk["id"] for chunk in chunks}) == 1


def test_a_stop_token_ends_the_output_with_its_id_and_without_its_text(http, offline):
    tokens = offline["tokens"][2]
    stop = tokens[2]
    cut = tokens[: tokens.index(stop) + 1]
    (choice,) = complete(http, greedy_body(PROMPTS[2], MAX_TOKENS, stop_token_ids=[stop]))["choices"]
    assert choice["token_ids"] == cut
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    assert choice["text"] == offline["decode"](cut[:-1])


def test_seeded_sampling_parameters_reach_the_engine(http, offline):
    body = {**greedy_body(PROMPTS[0], MAX_TOKENS), **SEEDED}
    assert complete(http, body)["choices"][0]["token_ids"] == offline["seeded"]
    assert offline["seeded"] != offline["tokens"][0]


def test_the_counters_count_every_prompt_token_looked_up_and_every_token_served(http):
    before = metrics(http)
    complete(http, greedy_body(PROMPTS[1], 2))
    complete(http, greedy_body(PROMPTS[1], 2))
    after = metrics(http)
    for queries, hits in (("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"),
                          ("prefix_cache_queries_total", "prefix_cache_hits_total")):
        assert (after[queries] - before[queries], after[hits] - before[hits]) == (2 * 37, 32)
    assert after["prefix_cache_requests_total"] - before["prefix_cache_requests_total"] == 2


def test_reset_is_refused_while_a_request_holds_blocks_and_empties_the_cache_once_idle(http):
    complete(http, greedy_body(PROMPTS[0], 2))
    with http.stream("POST", "/v1/completions", json=greedy_body(PROMPTS[1], 1500, stream=True)) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)  # the request is running
        refused = http.post("/reset_prefix_cache")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == 409 and "reset failed" in refused.json()["error"]["message"]
    wait_until(lambda: idle(http), "the closed stream's request is aborted")
    assert http.post("/reset_prefix_cache").status_code == 200
    after = complete(http, greedy_body(PROMPTS[0], 2))
    assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_health_models_and_version_answer(http):
    assert http.get("/health").status_code == 200
    (card,) = http.get("/v1/models").json()["data"]
    assert (card["id"], card["object"], card["max_model_len"]) == ("tiny-qwen3", "model", 2048)
    assert http.get("/version").json()["version"]
    missing = http.get("/no/such/route")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404


# -- bad input ---------------------------------------------------------------------------

GOOD = PROMPTS[2]
BAD_REQUESTS = [
    # (body, status, param, words of the message)
    ({"prompt": []}, 400, "prompt", "empty prompt"),
    ({"prompt": [1, 5000]}, 400, "prompt", "token id 5000 is outside the vocabulary"),
    ({"prompt": [1, -3]}, 400, "prompt", "token id -3"),
    ({"prompt": "", "max_tokens": 2}, 400, "prompt", "empty prompt"),
    ({"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens", "max_tokens must be >= 1, got 0"),
    ({"prompt": [1, 2], "max_tokens": 2047}, 400, "prompt", "max_tokens=2047 exceeds max_model_len=2048"),
    ({"prompt": [1, 2], "max_tokens": 1.5}, 400, "max_tokens", "invalid max_tokens=1.5"),
    ({"prompt": [1, 2], "temperature": -1}, 400, "temperature", "temperature must be >= 0, got -1.0"),
    ({"prompt": [1, 2], "temperature": "hot"}, 400, "temperature", "invalid temperature='hot'"),
    ({"prompt": [1, 2], "top_p": 0}, 400, "top_p", "top_p must be in (0, 1], got 0.0"),
    ({"prompt": [1, 2], "top_k": -2}, 400, "top_k", "top_k must be >= 0"),
    ({"prompt": [1, 2], "seed": -1}, 400, "seed", "seed must be >= 0, got -1"),
    ({"prompt": [1, 2], "cache_salt": ""}, 400, "cache_salt", "cache_salt must be a non-empty string or None, got ''"),
    ({"prompt": [1, 2], "stop_token_ids": ["a"]}, 400, "stop_token_ids", "invalid stop_token_ids=['a']"),
    ({"prompt": 5}, 400, "prompt", "invalid prompt=5"),
    ({"prompt": [1, "two"]}, 400, "prompt", "invalid prompt=[1, 'two']"),
    ({"max_tokens": 2}, 400, "prompt", "prompt is required"),
    ({"prompt": [1, 2], "n": 2}, 400, "n", "n=2 is not supported"),
    ({"prompt": [1, 2], "logprobs": 1}, 400, "logprobs", "logprobs=1 is not supported"),
    ({"prompt": [1, 2], "stop": ["\n"]}, 400, "stop", "stop=['\\n'] is not supported"),
    ({"prompt": [1, 2], "stream_options": {"include_usage": True}}, 400, "stream_options", "stream=true"),
    ({"prompt": [GOOD, [1, 5000], GOOD]}, 400, "prompt", "prompt 1 of the batch: token id 5000"),
    ({"prompt": [1, 2], "model": "gpt-4"}, 404, "model", "The model `gpt-4` does not exist."),
]


@pytest.mark.parametrize(("body", "status", "param", "message"), BAD_REQUESTS,
                         ids=[f"{case[2]}-{index}" for index, case in enumerate(BAD_REQUESTS)])
def test_a_bad_request_is_refused_naming_the_field_and_the_server_serves_on(http, offline, body, status, param,
                                                                               message):
    before = metrics(http)
    for sent in ([body] if "stream_options" in body else [body, {**body, "stream": True}]):
        refused = http.post("/v1/completions", json=sent)
        assert refused.status_code == status, refused.text
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == (status, param)
        assert message in error["message"]
        assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    after = metrics(http)
    assert after["prefix_cache_requests_total"] == before["prefix_cache_requests_total"], "a refused request ran"
    (choice,) = complete(http, greedy_body(GOOD, MAX_TOKENS))["choices"]
    assert choice["token_ids"] == offline["tokens"][2]


def test_a_body_that_is_not_json_is_refused(http):
    refused = http.post("/v1/completions", content=b'{"prompt": [1, 2],', headers={"content-type": "application/json"})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"].startswith("the body is not valid JSON")
    assert http.get("/health").status_code == 200
