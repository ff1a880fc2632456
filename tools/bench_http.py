"""The prefix-repetition workload against an OpenAI-compatible server, over HTTP (tools/bench --url).

What ``vllm bench serve`` does, on the workload of tools/bench_workload.py: every request is
``POST /v1/completions`` with ``stream: true`` and ``stream_options.include_usage``, greedy,
``max_tokens`` = the workload's output length and ``ignore_eos``; each request has its own
HTTP client (so its own connection), and all are sent at once (request rate inf) or at most
``max_concurrency`` at a time. A pass is the whole workload; a target gets an untimed warm-up
first, then ``repeats`` passes, the first one cold.

How a server is asked is found once, by ``probe``:

* prompts go as token ids where the server reads them as such (it answers a one-token request
  whose ``usage.prompt_tokens`` is the number of ids sent), else as text (tools/bench_text.py:
  whole-word prompts that the model's tokenizer reads back as the same ids); the pass checks
  every answer's ``usage.prompt_tokens`` against the ids the server should have seen;
* ``mlx_lm.server`` (known by its ``system_fingerprint``) always stops at end of text and has
  no ``ignore_eos``, so its requests also carry ``logit_bias`` {EOS: -1e9}: every side then
  produces the same number of output tokens (its batch generator applies a logits processor
  row by row, a small cost that is the server's own);
* the hit rate is ``usage.prompt_tokens_details.cached_tokens`` over ``usage.prompt_tokens``
  where every answer carries them, else the change of the server's ``/metrics`` counters
  (``vllm:prefix_cache_hits_total`` / ``queries_total``, or this engine's unprefixed names).

The metrics are vLLM's, from the client's clock: a request starts when it is sent; TTFT = its
first chunk with choices; ITL = every gap between its chunks; E2EL = its last chunk; TPOT =
(E2EL - TTFT) / (output tokens - 1), the output tokens from ``usage.completion_tokens``;
output throughput = all output tokens / (the last chunk of the pass - the start of the pass).
A server that sends several tokens in one chunk shows fewer, longer ITLs. A request whose
connection fails before any answer is sent again (at most MAX_RESENDS times) and counted; its
TTFT runs from the first attempt. (``mlx_lm.server`` listens with socketserver's backlog of 5:
in a burst of 50 connections, Linux drops or resets the ones that overflow it; its log then
shows that the reset requests never reached it.)
"""

import asyncio
import json
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np

from tools.bench_workload import latency_metrics

# mlx_lm.server's system_fingerprint: "{mlx-lm version}-{mlx version}-{platform}-{gpu arch}".
MLX_LM_FINGERPRINT = re.compile(r"^\d+\.\d+\.\d+[\w.]*-\d+\.\d+\.\d+[\w.]*-")
COUNTER_NAMES = (  # (queries, hits) in tokens: vLLM's, then this engine's prometheus_text
    ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"),
    ("prefix_cache_queries_total", "prefix_cache_hits_total"),
)
EOS_BIAS = -1e9
# A Prometheus sample line: name, optional {labels}, value.
SAMPLE_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE)
TIMEOUT_S = 600.0
MAX_RESENDS = 5


class ServerError(RuntimeError):
    """The server refused a request, answered it wrongly, or did not answer."""


@dataclass(frozen=True, slots=True)
class ServerShape:
    """How one server is asked: the fixed fields of every request, and how prompts go."""

    url: str
    kind: str  # "mlx_lm.server" (known by its fingerprint) or "openai" (any other)
    prompt_as: str  # "token_ids" or "text"
    fields: dict  # model, ignore_eos, logit_bias: added to every request body
    evidence: str

    def body(self, prompt: Sequence[int] | str, max_tokens: int) -> dict:
        return {
            **self.fields,
            "prompt": prompt if isinstance(prompt, str) else list(prompt),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


@dataclass(slots=True)
class StreamRecord:
    """One streamed completion as the client saw it (times from ``time.perf_counter``)."""

    start: float
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    resent: int = 0  # times sent again after a connection that failed before any answer

    @property
    def output_tokens(self) -> int:
        """``usage.completion_tokens``; where the server sent no usage, the number of chunks."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)


# -- probing ---------------------------------------------------------------------------


def probe(url: str, probe_ids: Sequence[int], probe_text: str, server_ids: Sequence[int],
          eos_ids: Sequence[int]) -> ServerShape:
    """Ask one-token requests until one is answered: ids first, then text (whose server-side
    tokenization is ``server_ids``); the model field only where the server needs one."""
    url = url.rstrip("/")
    with httpx.Client(base_url=url, timeout=TIMEOUT_S, trust_env=False) as http:
        fields: dict = {"ignore_eos": True}
        refused = []
        for prompt, expected, prompt_as in ((list(probe_ids), len(probe_ids), "token_ids"),
                                            (probe_text, len(server_ids), "text")):
            answer, why = _complete_once(http, {**fields, "prompt": prompt})
            # A server that wants a "model" field (vLLM before it defaulted one) gets its first model.
            wants_model = answer is None and "model" in why.lower() and "model" not in fields
            if wants_model and (model := _first_model(http)) is not None:
                fields["model"] = model
                answer, why = _complete_once(http, {**fields, "prompt": prompt})
            if answer is None:
                refused.append(f"{prompt_as}: {why}")
                continue
            read = (answer.get("usage") or {}).get("prompt_tokens")
            if read != expected:
                refused.append(f"{prompt_as}: usage.prompt_tokens {read}, expected {expected}")
                continue
            fingerprint = str(answer.get("system_fingerprint") or "")
            kind = "mlx_lm.server" if MLX_LM_FINGERPRINT.match(fingerprint) else "openai"
            if kind == "mlx_lm.server":
                fields["logit_bias"] = {str(eos): EOS_BIAS for eos in eos_ids}
            evidence = (
                f"{kind} (fingerprint {fingerprint!r}, GET /version {_version(http)}); prompts as {prompt_as} "
                f"(usage.prompt_tokens {read} as expected)"
                + (f"; refused before: {'; '.join(refused)}" if refused else "")
                + ("; EOS suppressed by logit_bias (no ignore_eos)" if "logit_bias" in fields else "")
            )
            return ServerShape(url, kind, prompt_as, fields, evidence)
    raise ServerError(f"{url} takes neither prompt form: {'; '.join(refused)}")


def _complete_once(http: httpx.Client, body: dict) -> tuple[dict | None, str]:
    try:
        response = http.post("/v1/completions", json={**body, "max_tokens": 1, "temperature": 0.0})
    except httpx.HTTPError as error:
        return None, f"no answer ({error!r})"
    if not response.is_success:
        return None, f"{response.status_code} {response.text[:200]!r}"
    try:
        return response.json(), ""
    except json.JSONDecodeError:
        return None, f"not JSON: {response.text[:200]!r}"


def _first_model(http: httpx.Client) -> str | None:
    try:
        models = http.get("/v1/models").json().get("data") or []
    except (httpx.HTTPError, json.JSONDecodeError, AttributeError):
        return None
    return models[0].get("id") if models else None


def _version(http: httpx.Client) -> str:
    """GET /version's answer (vLLM's route, and this engine's), for the evidence."""
    try:
        response = http.get("/version")
    except httpx.HTTPError:
        return "no answer"
    return response.text[:80].strip() if response.is_success else str(response.status_code)


# -- counters --------------------------------------------------------------------------


def read_counters(url: str) -> tuple[int, int] | None:
    """(queries, hits) of the server's prefix cache from GET /metrics, each summed over its
    label sets; None where the server exposes neither pair of COUNTER_NAMES."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/metrics", timeout=30.0, trust_env=False)
    except httpx.HTTPError:
        return None
    if not response.is_success:
        return None
    totals: dict[str, float] = {}
    for match in SAMPLE_LINE.finditer(response.text):
        name, value = match.group(1), match.group(2)
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    for queries, hits in COUNTER_NAMES:
        if queries in totals and hits in totals:
            return int(totals[queries]), int(totals[hits])
    return None


# -- one pass --------------------------------------------------------------------------


def run_pass(shape: ServerShape, prompts: Sequence[Sequence[int] | str], max_tokens: int,
             max_concurrency: int | None = None, on_chunk: Callable[[], None] | None = None
             ) -> tuple[float, list[StreamRecord]]:
    """Send every prompt (at most ``max_concurrency`` at a time); (the pass's start, the records)."""
    return asyncio.run(_run_pass(shape, prompts, max_tokens, max_concurrency, on_chunk or (lambda: None)))


async def _run_pass(shape, prompts, max_tokens, max_concurrency, on_chunk):
    # One SSL context for every client: httpx builds one per client otherwise (about 50 ms each).
    context = ssl.create_default_context()
    gate = asyncio.Semaphore(max_concurrency or len(prompts))
    start = time.perf_counter()

    async def one(prompt) -> StreamRecord:
        async with gate:
            record = StreamRecord(start=time.perf_counter())
            body = shape.body(prompt, max_tokens)
            while True:
                try:
                    await _stream(shape, body, context, on_chunk, record)
                    return record
                except NotAnswered as error:
                    record.resent += 1
                    if record.resent > MAX_RESENDS:
                        raise ServerError(f"POST {shape.url}/v1/completions: {error}") from error
                except httpx.HTTPError as error:
                    raise ServerError(f"POST {shape.url}/v1/completions: {error!r}") from error

    records = await asyncio.gather(*(one(prompt) for prompt in prompts))
    return start, list(records)


class NotAnswered(Exception):
    """The connection failed before any answer: the server never read the request."""


async def _stream(shape: ServerShape, body: dict, context: ssl.SSLContext, on_chunk, record: StreamRecord) -> None:
    timeout = httpx.Timeout(TIMEOUT_S, connect=30.0)
    async with httpx.AsyncClient(base_url=shape.url, timeout=timeout, verify=context, trust_env=False) as client:
        try:
            response = await client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
        except httpx.TimeoutException:
            raise  # the server may be working on it: not sent again
        except httpx.TransportError as error:
            # mlx_lm.server listens with a backlog of 5 (socketserver's default): in a burst of
            # connections, Linux resets the ones that overflowed it, about 1 s later.
            raise NotAnswered(repr(error)) from error
        try:
            await _read_events(shape, response, on_chunk, record)
        finally:
            await response.aclose()
    if not record.chunk_times:
        raise ServerError(f"{shape.url} streamed no chunk with choices")


async def _read_events(shape: ServerShape, response: httpx.Response, on_chunk, record: StreamRecord) -> None:
    if not response.is_success:
        text = (await response.aread()).decode(errors="replace")
        raise ServerError(f"POST {shape.url}/v1/completions answered {response.status_code}: {text[:500]}")
    async for line in response.aiter_lines():
        now = time.perf_counter()  # when the line arrived, before it is parsed
        if not line.startswith("data:"):
            continue  # blank separators, ": keepalive" comments
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise ServerError(f"{shape.url}: {chunk['error']}")
        if choices := chunk.get("choices"):
            record.chunk_times.append(now)
            record.text += choices[0].get("text") or ""
            on_chunk()
        if usage := chunk.get("usage"):
            record.prompt_tokens = usage.get("prompt_tokens")
            record.completion_tokens = usage.get("completion_tokens")
            details = usage.get("prompt_tokens_details") or {}
            record.cached_tokens = details.get("cached_tokens")


# -- what a pass measured --------------------------------------------------------------


def stream_metrics(start: float, records: Sequence[StreamRecord]) -> dict[str, float]:
    """The metrics of tools/bench_workload.METRICS for one pass, with vLLM's definitions."""
    ttft = np.array([r.chunk_times[0] - r.start for r in records])
    e2el = np.array([r.chunk_times[-1] - r.start for r in records])
    tpot = np.array([
        (r.chunk_times[-1] - r.chunk_times[0]) / (r.output_tokens - 1) for r in records if r.output_tokens > 1
    ])
    itl = np.concatenate([np.diff(r.chunk_times) for r in records])
    duration = max(r.chunk_times[-1] for r in records) - start
    return latency_metrics(ttft, tpot, itl, e2el, sum(r.output_tokens for r in records), duration)


def check_prompt_tokens(shape: ServerShape, records: Sequence[StreamRecord], expected: Sequence[int]) -> None:
    """Every answer's ``usage.prompt_tokens`` is the length the server should have seen."""
    for number, (record, length) in enumerate(zip(records, expected)):
        if record.prompt_tokens is not None and record.prompt_tokens != length:
            raise ServerError(
                f"{shape.url} read prompt {number} as {record.prompt_tokens} tokens, expected {length}"
            )


def usage_hits(records: Sequence[StreamRecord]) -> tuple[int, int] | None:
    """(cached tokens, prompt tokens) summed over the pass; None unless every answer has both."""
    if any(r.cached_tokens is None or r.prompt_tokens is None for r in records):
        return None
    return sum(r.cached_tokens for r in records), sum(r.prompt_tokens for r in records)


# -- a server, measured ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpPlan:
    """What every server is sent: the workload's prompts as ids and as text, the lengths a
    text-reading server sees, the warm-up and probe prompts (which share no first token with
    the workload, so they leave nothing in a cache that a workload prompt could hit)."""

    prompts: list[list[int]]
    texts: list[str]
    text_lengths: list[int]  # len(tokenizer.encode(text)): what a server that takes text sees
    output_len: int
    warmup: list[list[int]]
    warmup_texts: list[str]
    probe: list[int]
    probe_text: str
    probe_text_ids: list[int]
    eos_ids: list[int]

    def prompts_for(self, shape: ServerShape) -> tuple[list, list[int]]:
        """(the prompts in the form the server takes, the prompt length it should report)."""
        if shape.prompt_as == "token_ids":
            return self.prompts, [len(p) for p in self.prompts]
        return self.texts, self.text_lengths


WARMUP_OUTPUT_LEN = 4


def measure(url: str, plan: HttpPlan, repeats: int, max_concurrency: int | None = None,
            on_chunk: Callable[[], None] | None = None) -> dict:
    """Probe the server, warm it up (untimed), then ``repeats`` passes of the workload."""
    shape = probe(url, plan.probe, plan.probe_text, plan.probe_text_ids, plan.eos_ids)
    warmup = plan.warmup if shape.prompt_as == "token_ids" else plan.warmup_texts
    run_pass(shape, warmup, WARMUP_OUTPUT_LEN, max_concurrency)
    prompts, lengths = plan.prompts_for(shape)
    passes, hits, outputs, resent = [], [], [], []
    source = None
    for _ in range(repeats):
        before = read_counters(shape.url)
        start, records = run_pass(shape, prompts, plan.output_len, max_concurrency, on_chunk)
        after = read_counters(shape.url)
        check_prompt_tokens(shape, records, lengths)
        passes.append(stream_metrics(start, records))
        outputs.append(sum(r.output_tokens for r in records))
        resent.append(sum(r.resent for r in records))
        found = usage_hits(records)
        if found is not None:
            source = "usage.prompt_tokens_details.cached_tokens"
        elif before is not None and after is not None:
            found = (after[1] - before[1], after[0] - before[0])
            source = "GET /metrics prefix_cache_hits_total / queries_total"
        hits.append(list(found) if found is not None else None)
    return {
        "url": shape.url,
        "kind": shape.kind,
        "prompt_as": shape.prompt_as,
        "evidence": shape.evidence,
        "passes": passes,
        "hit_tokens": hits,  # per pass: [hits, queries], or None where the server reports neither
        "hit_source": source,
        "output_tokens": outputs,  # per pass, summed over the requests
        "expected_output_tokens": len(prompts) * plan.output_len,
        "resent": resent,  # per pass: requests sent again after a connection failed unanswered
    }
