"""``engine serve`` when things go wrong: clients that leave, a shutdown, a step that raises.

Real clients over real HTTP, each asking for far more tokens (16,000) than a test waits for, so
that only an abort can free the engine in time: a client that closes its stream or its
connection aborts its request, and the blocks in use return to 0 within seconds. A shutdown
answers every request in flight, running or waiting (HTTP 503, or an error event on a stream),
and a step that raises answers each with HTTP 500 or an error event, after which the server
serves the next request exactly as the engine would.
"""

import threading

import httpx
import pytest

from engine import SamplingParams
from engine.runner.model_runner import ModelRunner
from suites.engine_helpers import token_prompts
from suites.serve_helpers import (
    LONG_MAX_MODEL_LEN,
    LONG_MAX_TOKENS,
    events,
    greedy_body,
    idle,
    metrics,
    reset_engine,
    serving,
    wait_until,
)

pytestmark = pytest.mark.model

PROMPTS = token_prompts(1402, [40, 33, 45, 29, 50])
ABORT_WITHIN_S = 5.0  # 16,000 tokens take over 30 s here: only an abort is done this soon


class InjectedFault(Exception):
    pass


@pytest.fixture
def server(shared_llm):
    with serving(shared_llm, max_model_len=LONG_MAX_MODEL_LEN) as running:
        yield running


def long_body(index: int, stream: bool) -> dict:
    return greedy_body(PROMPTS[index], LONG_MAX_TOKENS, stream=stream)


class Clients:
    """Long requests sent from threads, each one's answer kept: a list of events for a stream,
    the response for a whole answer. ``streaming(name)`` waits for a stream's first token."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: dict[str, object] = {}
        self.threads: list[threading.Thread] = []
        self.started: dict[str, threading.Event] = {}

    def send(self, name: str, index: int, stream: bool) -> None:
        self.started[name] = threading.Event()
        thread = threading.Thread(target=self._send, args=(name, index, stream), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _send(self, name: str, index: int, stream: bool) -> None:
        with httpx.Client(base_url=self.url, timeout=60.0) as http:
            if stream:
                with http.stream("POST", "/v1/completions", json=long_body(index, True)) as response:
                    self.answers[name] = events(self._lines(name, response))
            else:
                self.answers[name] = http.post("/v1/completions", json=long_body(index, False))

    def _lines(self, name: str, response: httpx.Response):
        for line in response.iter_lines():
            yield line
            if line.startswith("data: "):
                self.started[name].set()

    def streaming(self, name: str) -> None:
        assert self.started[name].wait(30.0), f"{name} got no token"

    def join(self) -> None:
        for thread in self.threads:
            thread.join(30.0)
            assert not thread.is_alive(), "a client got no answer"


def queued(http: httpx.Client) -> tuple[int, int]:
    """(running, waiting) requests."""
    sample = metrics(http)
    return int(sample["vllm:num_requests_running"]), int(sample["vllm:num_requests_waiting"])


def assert_stream_failed(received: list, status: int, words: str) -> None:
    assert received[-1] == "[DONE]"
    error = received[-2]["error"]
    assert error["code"] == status and words in error["message"], error
    assert all("choices" in chunk for chunk in received[:-2])


def assert_response_failed(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and words in error["message"], error


def test_a_client_that_closes_its_stream_aborts_its_request_and_frees_its_blocks(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as http:
        with http.stream("POST", "/v1/completions", json=long_body(0, True)) as response:
            lines = response.iter_lines()
            received = []
            while len(received) < 3:  # three tokens streamed
                received += [line for line in [next(lines)] if line.startswith("data: ")]
            assert metrics(http)["engine_kv_blocks_used"] > 0
        wait_until(lambda: idle(http), "the closed stream's request is aborted", ABORT_WITHIN_S)
        assert metrics(http)["engine_steps_total"] < LONG_MAX_TOKENS / 4
        assert http.post("/v1/completions", json=greedy_body(PROMPTS[1], 4)).status_code == 200


def test_a_client_that_stops_waiting_for_a_whole_answer_aborts_its_request(server):
    impatient = httpx.Client(base_url=server.url, timeout=httpx.Timeout(0.5, connect=10.0))
    with impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/v1/completions", json=long_body(0, False))
    with httpx.Client(base_url=server.url, timeout=60.0) as http:
        wait_until(lambda: idle(http), "the request of the client that left is aborted", ABORT_WITHIN_S)
        assert metrics(http)["engine_steps_total"] < LONG_MAX_TOKENS / 4
        assert http.post("/v1/completions", json=greedy_body(PROMPTS[1], 4)).status_code == 200


def test_shutdown_answers_every_request_in_flight_running_or_waiting_with_an_error(shared_llm):
    with serving(shared_llm, max_model_len=LONG_MAX_MODEL_LEN, max_num_seqs=4) as server:
        clients = Clients(server.url)
        with httpx.Client(base_url=server.url, timeout=60.0) as http:
            for index, name in enumerate(["stream-a", "stream-b"]):
                clients.send(name, index, stream=True)
                clients.streaming(name)
            for index, name in enumerate(["whole-a", "whole-b", "whole-waiting"], start=2):
                clients.send(name, index, stream=False)
                wait_until(lambda count=index + 1: sum(queued(http)) == count, f"{name} is queued")
            assert queued(http) == (4, 1)
        server.stop()
        clients.join()
    for name in ("stream-a", "stream-b"):
        assert_stream_failed(clients.answers[name], 503, "shutting down")
    for name in ("whole-a", "whole-b", "whole-waiting"):
        assert_response_failed(clients.answers[name], 503, "shutting down")
    assert shared_llm.kv_manager.pool.num_used_blocks == 0


def test_a_step_that_raises_fails_every_request_in_flight_and_the_server_serves_on(shared_llm, monkeypatch):
    reset_engine(shared_llm)
    (expected,) = shared_llm.generate([PROMPTS[2]], SamplingParams(max_tokens=6, ignore_eos=True))
    armed = threading.Event()
    execute = ModelRunner.execute

    def execute_or_fail(self, chunks):
        if armed.is_set():
            armed.clear()
            raise InjectedFault("injected into the model runner")
        return execute(self, chunks)

    monkeypatch.setattr(ModelRunner, "execute", execute_or_fail)
    with serving(shared_llm, max_model_len=LONG_MAX_MODEL_LEN) as server:
        clients = Clients(server.url)
        with httpx.Client(base_url=server.url, timeout=60.0) as http:
            for index, name in enumerate(["stream-a", "stream-b"]):
                clients.send(name, index, stream=True)
                clients.streaming(name)
            clients.send("whole-a", 2, stream=False)
            wait_until(lambda: queued(http) == (3, 0), "three requests run")
            armed.set()
            clients.join()
            wait_until(lambda: idle(http), "the failed step's requests are gone")
            assert http.get("/health").status_code == 200
            answers = [http.post("/v1/completions", json=greedy_body(PROMPTS[2], 6)).json() for _ in range(2)]
    for name in ("stream-a", "stream-b"):
        assert_stream_failed(clients.answers[name], 500, "InjectedFault('injected into the model runner')")
    assert_response_failed(clients.answers["whole-a"], 500, "the engine step failed")
    # A step cut short clears the prefix cache (engine/scheduler.py says why): cold, then a hit.
    assert [answer["choices"][0]["token_ids"] for answer in answers] == [expected.token_ids] * 2
    assert [answer["usage"]["prompt_tokens_details"]["cached_tokens"] for answer in answers] == [0, 32]
