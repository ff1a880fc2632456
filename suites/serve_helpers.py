"""Small shared pieces of the ``engine serve`` suites (suites/test_serve*.py).

The in-process server runs on the session's one ``LLM`` (suites/plugin.py says why there is
only one): while it serves, only its engine thread touches that ``LLM``, so a test computes
its offline expectations before it starts the server, or after it stopped it.
"""

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator

import httpx

from engine.llm import DEFAULT_MODEL, EngineConfig
from engine.serve import ServeConfig, Server

# Long enough that a request nobody aborts would still run long after any test's patience
# (about 2.5 ms a token here), and within the default pool: 16,000 tokens is 1,003 blocks.
LONG_MAX_MODEL_LEN = 16384
LONG_MAX_TOKENS = 16000


def reset_engine(llm, **settings) -> None:
    """The shared LLM at the engine's defaults (empty cache, zero counters), changed by ``settings``."""
    llm.reconfigure(model=DEFAULT_MODEL, **{**dataclasses.asdict(EngineConfig()), **settings})


@contextlib.contextmanager
def serving(llm, **settings) -> Iterator[Server]:
    """A real uvicorn server on a free port of 127.0.0.1, on a thread of this process."""
    reset_engine(llm, **settings)
    server = Server(llm, ServeConfig(port=0, log_level="warning"), access_log=False).start()
    try:
        yield server
    finally:
        server.stop()
    assert not llm.has_unfinished_requests(), "the server stopped with requests left in the engine"


def greedy_body(prompt, max_tokens: int, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, **extra}


def metrics(client: httpx.Client) -> dict[str, float]:
    """Every sample of GET /metrics by name (each of ours has one label set)."""
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return {sample.name: sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def events(lines: Iterator[str]) -> list[dict | str]:
    """The server-sent events of a stream: each ``data:`` payload, parsed ("[DONE]" kept as is)."""
    found: list[dict | str] = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            found.append(data if data == "[DONE]" else json.loads(data))
    return found


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def idle(client: httpx.Client) -> bool:
    """No request queued or running, and no block held."""
    sample = metrics(client)
    return (sample["vllm:num_requests_running"], sample["vllm:num_requests_waiting"],
            sample["engine_kv_blocks_used"]) == (0, 0, 0)
