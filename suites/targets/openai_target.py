"""The ``openai`` target: any OpenAI-compatible server at ``options.url``.

vLLM (and vllm-metal's ``vllm serve``), ``mlx_lm.server``, or this repository's
``engine serve``. What the server offers is found by probing it once, at open, and each
capability's evidence is kept in ``target.evidence`` (and logged):

* prompts go as token ids where the server reads them as ids (it must echo them back:
  vLLM's ``return_token_ids`` gives ``choices[0].prompt_token_ids``), else as text decoded
  with the model folder's tokenizer (mlx-lm's loader, the one ``mlx_lm.server`` encodes
  with); a prompt whose text does not encode back to the same ids is refused;
* output ids come from ``choices[0].token_ids`` (vLLM) or ``choices[0].logprobs.content[k].id``
  (``mlx_lm.server`` with ``logprobs: true``);
* ``cached_tokens`` from ``usage.prompt_tokens_details.cached_tokens`` (vLLM needs
  ``--enable-prompt-tokens-details``);
* counters from ``GET /metrics`` (``vllm:prefix_cache_{queries,hits}_total``, summed over
  label sets), reset from ``POST /reset_prefix_cache`` (vLLM serves it only with
  ``VLLM_SERVER_DEV_MODE=1``);
* ``cache_salt`` on vLLM only (other servers ignore unknown fields, so a probe cannot tell);
* the hit granularity cannot be read from any endpoint: pass the server's block size
  (``TargetOptions.block_size``, vLLM's ``--block-size``); without it vLLM is assumed to run
  its default of 16 and mlx_lm.server is a token trie (1);
* which output tokens' KV the cache keeps is measured (``measure_output_kv``) where the server
  reports cached tokens.

The probes leave their prompts in the server's cache (where it has no reset); each starts
with a digit, which no prompt of suites/targets/scenario.py starts with.
"""

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from engine.models import resolve_model
from suites.targets.protocol import Capabilities, Completion, TargetOptions

log = logging.getLogger(__name__)

VLLM_DEFAULT_BLOCK_SIZE = 16
VLLM_LIKE = ("vllm", "engine serve")  # servers with vLLM's routes, fields and rules
COUNTER_NAMES = (  # (queries, hits), in tokens; the first pair the server exposes is used
    ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"),
    ("prefix_cache_queries_total", "prefix_cache_hits_total"),  # this engine's prometheus_text
)
# mlx_lm.server's system_fingerprint: "{mlx-lm version}-{mlx version}-{platform}-{gpu arch}".
MLX_LM_FINGERPRINT = re.compile(r"^(\d+\.\d+\.\d+[\w.]*)-(\d+\.\d+\.\d+[\w.]*)-")
PROBE_TEXT = "0 probe of the conformance suite"
FILLERS = (" the", " cat", " park", " dog", " and", " it")


class ServerError(RuntimeError):
    """The server refused a request or did not answer it."""


@dataclass(frozen=True, slots=True)
class RequestShape:
    """How one server takes a prompt and gives back the output ids."""

    model: str | None  # the "model" field; None: left out (the server's default model)
    prompt_as: str  # "token_ids" or "text"
    tokens_from: str  # "token_ids" (vLLM's return_token_ids) or "logprobs" (mlx_lm.server)


class CompletionClient:
    """``POST /v1/completions`` on one server, greedy, in the shape it was found to take."""

    def __init__(self, url: str, tokenizer, timeout: float = 300.0) -> None:
        self.url = url
        self.tokenizer = tokenizer
        self.http = httpx.Client(base_url=url, timeout=httpx.Timeout(timeout, connect=10.0))
        self.shape: RequestShape | None = None  # set by probe()

    def complete(self, prompt: list[int], max_tokens: int, cache_salt: str | None = None) -> Completion:
        assert self.shape is not None, "probe() the server first"
        body = self._body(prompt, max_tokens, self.shape)
        if cache_salt is not None:
            body["cache_salt"] = cache_salt
        answer = self._post_completion(body)
        read = (answer.get("usage") or {}).get("prompt_tokens")
        if read is not None and read != len(prompt):
            # Its cached_tokens would count a sequence other than ours (e.g. a BOS it added).
            raise ServerError(f"{self.url} read the prompt of {len(prompt)} ids as {read} tokens")
        return Completion(self._output_ids(answer, self.shape), cached_tokens(answer))

    def complete_all(self, prompts: list[list[int]], max_tokens: int,
                     cache_salt: str | None = None) -> list[Completion]:
        """All prompts sent at once, one thread each, so the server batches them as it will."""
        if len(prompts) <= 1:
            return [self.complete(prompt, max_tokens, cache_salt) for prompt in prompts]
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            futures = [pool.submit(self.complete, prompt, max_tokens, cache_salt) for prompt in prompts]
            return [future.result() for future in futures]

    def get(self, path: str) -> httpx.Response | None:
        """A GET that answers None where the server does not (no such route, a broken handler)."""
        try:
            return self.http.get(path)
        except httpx.HTTPError as error:
            log.info("GET %s%s: %s", self.url, path, error)
            return None

    def close(self) -> None:
        self.http.close()

    def _body(self, prompt: list[int], max_tokens: int, shape: RequestShape) -> dict:
        body = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        body["prompt"] = list(prompt) if shape.prompt_as == "token_ids" else self._text(prompt)
        if shape.model is not None:
            body["model"] = shape.model
        if shape.tokens_from == "token_ids":
            body["return_token_ids"] = True
        else:
            body["logprobs"] = True
        return body

    def _text(self, prompt: list[int]) -> str:
        text = self.tokenizer.decode(prompt)
        back = self.tokenizer.encode(text)
        if back != list(prompt):
            first = next((i for i, (a, b) in enumerate(zip(prompt, back)) if a != b),
                         min(len(prompt), len(back)))
            raise ValueError(
                f"{self.url} takes text prompts only, and this prompt of {len(prompt)} ids does not survive "
                f"decode and encode: it parts at position {first} ({list(prompt[first:first + 3])} became "
                f"{back[first:first + 3]}); use prompts whose text encodes back to the same ids"
            )
        return text

    def _post_completion(self, body: dict) -> dict:
        try:
            response = self.http.post("/v1/completions", json=body)
        except httpx.HTTPError as error:
            raise ServerError(f"POST {self.url}/v1/completions got no answer: {error!r}") from error
        if not response.is_success:
            raise ServerError(
                f"POST {self.url}/v1/completions answered {response.status_code}: {response.text[:500]}"
            )
        return response.json()

    @staticmethod
    def _output_ids(answer: dict, shape: RequestShape) -> list[int]:
        choice = answer["choices"][0]
        if shape.tokens_from == "token_ids":
            return list(choice["token_ids"])
        return [entry["id"] for entry in choice["logprobs"]["content"]]

    def probe(self, model: str | None) -> tuple[dict, str]:
        """Find the request shape with a one-token request; (its answer, the evidence)."""
        probe = self.tokenizer.encode(PROBE_TEXT)
        ids_shape = RequestShape(model, "token_ids", "token_ids")
        try:
            answer = self._post_completion(self._body(probe, 1, ids_shape))
            echoed = answer["choices"][0].get("prompt_token_ids")
            if echoed == probe and isinstance(answer["choices"][0].get("token_ids"), list):
                self.shape = ids_shape
                return answer, "token ids: the server echoed them in choices[0].prompt_token_ids"
            reason = f"prompt_token_ids {echoed!r} do not echo the ids sent"
        except (ServerError, KeyError, IndexError, TypeError) as error:
            reason = str(error)
        text_shape = RequestShape(model, "text", "logprobs")
        try:
            answer = self._post_completion(self._body(probe, 1, text_shape))
            self._output_ids(answer, text_shape)
        except (ServerError, KeyError, IndexError, TypeError) as error:
            raise ServerError(
                f"{self.url} takes neither token-id prompts ({reason}) nor text prompts ({error})"
            ) from None
        self.shape = text_shape
        return answer, f"text, decoded with the model's tokenizer (token ids refused: {reason[:120]})"


def cached_tokens(answer: dict) -> int | None:
    details = (answer.get("usage") or {}).get("prompt_tokens_details") or {}
    value = details.get("cached_tokens")
    return value if isinstance(value, int) else None


def prefix_cache_counters(metrics_text: str) -> tuple[str, int, int] | None:
    """(the queries counter's name, queries, hits), each summed over its label sets; None
    where the text has neither pair of COUNTER_NAMES."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    for queries, hits in COUNTER_NAMES:
        if queries in totals and hits in totals:
            return queries, int(totals[queries]), int(totals[hits])
    return None


class OpenAITarget:
    """An OpenAI-compatible server, and optionally a second one with caching off (the reference)."""

    name = "openai"

    def __init__(self, url: str, model_folder: Path, block_size: int | None = None,
                 reference_url: str | None = None, cache_salt: bool | None = None) -> None:
        from mlx_lm.utils import load_tokenizer  # mlx_lm.server's own tokenizer loader

        self.url = url.rstrip("/")
        self.tokenizer = load_tokenizer(model_folder)
        self.evidence: dict[str, str] = {}
        self.client = CompletionClient(self.url, self.tokenizer)
        self.kind, model, self.version = self._identify_by_routes()
        probe_answer, self.evidence["prompt"] = self.client.probe(model)
        if self.kind == "openai":
            self.kind, self.version = self._identify_by_fingerprint(probe_answer)
        self._reference = None
        if reference_url is not None:
            self._reference = CompletionClient(reference_url.rstrip("/"), self.tokenizer)
            _, how = self._reference.probe(model)
            self.evidence["cache_off"] = f"reference server {reference_url}; prompts as {how}"
        else:
            self.evidence["cache_off"] = "no reference_url given"
        self._counter_name = self._detect_counters()
        self._baseline = (0, 0)
        self.ignores_eos = self.kind in VLLM_LIKE
        self.evidence["ignores_eos"] = {
            "vllm": "vLLM honours ignore_eos",
            "engine serve": "engine serve honours ignore_eos",
            "mlx_lm.server": "no: mlx_lm.server always stops at EOS (its stop sequences hold the EOS ids)",
        }.get(self.kind, "ignore_eos is sent; whether it is honoured is unknown")
        capabilities = Capabilities(
            hit_granularity=self._granularity(block_size),
            cached_tokens=self._detect_cached_tokens(probe_answer),
            counters=self._counter_name is not None,
            reset=self._detect_reset(),
            cache_salt=self._detect_cache_salt(cache_salt),
            cache_off=self._reference is not None,
            concurrent=True,  # generate() sends its prompts at once, one thread each
            token_prompts=self.client.shape.prompt_as == "token_ids",
        )
        self.capabilities = replace(capabilities, output_kv=self._output_kv(capabilities))
        if self.capabilities.reset:
            self.reset_prefix_cache()  # the probes' prompts out of the way
        if self._counter_name is not None:
            self._baseline = self._read_counters()  # the probes' lookups not counted
        for capability, evidence in self.evidence.items():
            log.info("%s %s: %s", self.url, capability, evidence)

    def generate(self, prompts: list[list[int]], max_tokens: int,
                 cache_salt: str | None = None) -> list[Completion]:
        if cache_salt is not None and not self.capabilities.cache_salt:
            raise ValueError(f"{self.url} has no cache salt (capabilities.cache_salt is False)")
        return self.client.complete_all(prompts, max_tokens, cache_salt)

    def reference(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        if self._reference is None:
            raise NotImplementedError("no reference server: pass reference_url (cache_off is False)")
        return [completion.token_ids for completion in self._reference.complete_all(prompts, max_tokens)]

    def counters(self) -> tuple[int, int]:
        if self._counter_name is None:
            raise NotImplementedError(
                f"{self.url}/metrics has no prefix-cache counters (capabilities.counters is False)"
            )
        queries, hits = self._read_counters()
        return queries - self._baseline[0], hits - self._baseline[1]

    def reset_prefix_cache(self) -> bool:
        done = _reset_done(self._post_reset())
        if done and self._counter_name is not None:
            # vLLM's counters are cumulative; the baseline makes counters() start again from 0.
            self._baseline = self._read_counters()
        return done

    def close(self) -> None:
        self.client.close()
        if self._reference is not None:
            self._reference.close()

    # -- detection -----------------------------------------------------------------

    def _identify_by_routes(self) -> tuple[str, str | None, str]:
        """("vllm", its first served model, its version) where the routes say vLLM, else
        ("openai", None, "unknown"): the model field is then left to the server's default."""
        version = _json(self.client.get("/version")).get("version")
        metrics = self.client.get("/metrics")
        vllm_metrics = metrics is not None and metrics.is_success and "vllm:" in metrics.text
        if not (version or vllm_metrics):
            return "openai", None, "unknown"
        models = _json(self.client.get("/v1/models")).get("data") or [{}]
        model = models[0].get("id")
        # This repository's `engine serve` speaks vLLM's routes and names itself as the owner.
        kind = "engine serve" if models[0].get("owned_by") == "engine" else "vllm"
        self.evidence["kind"] = (
            f"{kind} (GET /version: {version!r}, vllm: metrics: {vllm_metrics}); model {model!r}"
        )
        return kind, model, str(version or "unknown")

    def _identify_by_fingerprint(self, answer: dict) -> tuple[str, str]:
        fingerprint = str(answer.get("system_fingerprint") or "")
        if match := MLX_LM_FINGERPRINT.match(fingerprint):
            self.evidence["kind"] = f"mlx_lm.server (system_fingerprint {fingerprint!r})"
            return "mlx_lm.server", match.group(1)
        self.evidence["kind"] = f"an OpenAI-compatible server of unknown make (fingerprint {fingerprint!r})"
        return "openai", "unknown"

    def _granularity(self, block_size: int | None) -> int:
        if block_size is not None:
            self.evidence["hit_granularity"] = f"{block_size}, as given (the server's block size)"
            return block_size
        if self.kind in VLLM_LIKE:
            self.evidence["hit_granularity"] = (
                f"{VLLM_DEFAULT_BLOCK_SIZE}: vLLM's default, assumed; "
                "pass the server's --block-size if it runs another"
            )
            return VLLM_DEFAULT_BLOCK_SIZE
        if self.kind == "mlx_lm.server":
            self.evidence["hit_granularity"] = "1: mlx_lm.server's LRUPromptCache is a token trie"
            return 1
        raise ValueError(f"{self.url}: the server's hit granularity is unknown; pass its block size (block_size)")

    def _detect_cached_tokens(self, answer: dict) -> bool:
        value = cached_tokens(answer)
        self.evidence["cached_tokens"] = (
            f"usage.prompt_tokens_details.cached_tokens = {value} in the probe's answer" if value is not None
            else "the probe's answer has no usage.prompt_tokens_details.cached_tokens "
            "(vLLM: --enable-prompt-tokens-details)"
        )
        return value is not None

    def _detect_counters(self) -> str | None:
        metrics = self.client.get("/metrics")
        found = prefix_cache_counters(metrics.text) if metrics is not None and metrics.is_success else None
        if found is None:
            status = "no answer" if metrics is None else metrics.status_code
            self.evidence["counters"] = f"GET /metrics ({status}) has no prefix_cache_queries_total / hits_total"
            return None
        name, queries, hits = found
        self.evidence["counters"] = f"GET /metrics has {name} (queries {queries}, hits {hits} at open)"
        return name

    def _read_counters(self) -> tuple[int, int]:
        response = self.client.get("/metrics")
        if response is None or not response.is_success:
            status = "no answer" if response is None else response.status_code
            raise ServerError(f"GET {self.url}/metrics failed: {status}")
        found = prefix_cache_counters(response.text)
        if found is None or found[0] != self._counter_name:
            raise ServerError(f"GET {self.url}/metrics no longer has {self._counter_name}")
        return found[1], found[2]

    def _post_reset(self) -> httpx.Response | None:
        try:
            return self.client.http.post("/reset_prefix_cache")
        except httpx.HTTPError as error:
            log.info("POST %s/reset_prefix_cache: %s", self.url, error)
            return None

    def _detect_reset(self) -> bool:
        response = self._post_reset()
        status = "no answer" if response is None else f"{response.status_code} {response.text[:100]!r}"
        done = _reset_done(response)
        self.evidence["reset"] = f"POST /reset_prefix_cache answered {status}" + ("" if done else ": no reset")
        return done

    def _detect_cache_salt(self, declared: bool | None) -> bool:
        if declared is not None:
            self.evidence["cache_salt"] = f"{declared}, as given"
            return declared
        self.evidence["cache_salt"] = (
            f"{self.kind} takes cache_salt in the request body, as vLLM" if self.kind in VLLM_LIKE
            else "not vLLM: a server ignores an unknown cache_salt field silently, so none is declared"
        )
        return self.kind in VLLM_LIKE

    def _output_kv(self, capabilities: Capabilities) -> str:
        known = {"vllm": "all-but-last", "engine serve": "all-but-last", "mlx_lm.server": "all"}.get(self.kind, "none")
        if not (capabilities.cached_tokens and capabilities.hit_granularity):
            self.evidence["output_kv"] = f"{known}: not measured (no cached_tokens), from the server's make"
            return known
        measured, how = measure_output_kv(self.client, capabilities.hit_granularity)
        if measured is None:
            self.evidence["output_kv"] = f"{known}: not measured ({how}), from the server's make"
            return known
        self.evidence["output_kv"] = f"{measured}: measured; {how}"
        return measured


def measure_output_kv(client: CompletionClient, unit: int) -> tuple[str | None, str]:
    """Which output tokens' KV a finished request leaves for a later prompt ("none",
    "all-but-last" or "all"; None where it cannot be measured), and how it was found.

    Two requests, each a prompt of ``a`` whole units, then that prompt plus its ``m`` output
    tokens and one more token: with ``m = unit + 1`` "none" hits ``a`` units and the others
    ``a + 1``; with ``m = unit`` "all" hits ``a + 1`` units and the others ``a``. Each
    prompt starts with its own digit, so neither can hit the other's sequences.
    """
    length = unit * -(-4 // unit)  # whole units, at least 4 tokens
    units = {}
    for first, outputs in (("1", unit + 1), ("2", unit)):
        # A text-only server needs prompt + output to encode back to the same ids: the
        # filler word is the first of a few for which it does.
        for filler in FILLERS:
            prompt = client.tokenizer.encode(f"{first} measure" + filler * length)[:length]
            try:
                (answer,) = client.complete_all([prompt], outputs)
                if len(answer.token_ids) != outputs:
                    return None, f"the server stopped after {len(answer.token_ids)} of {outputs} tokens"
                (follow,) = client.complete_all([[*prompt, *answer.token_ids, prompt[-1]]], 1)
                break
            except ValueError:
                continue
        else:
            return None, f"no prompt of the fillers {FILLERS} and its output survive decode and encode"
        units[outputs] = (follow.cached_tokens or 0) // unit
    base = length // unit
    if units[unit + 1] == base:
        kept = "none"
    elif units[unit] > base:
        kept = "all"
    else:
        kept = "all-but-last"
    return kept, (
        f"prompts of {length} tokens, then prompt + m outputs + 1: units hit "
        f"{units[unit + 1]} with m = {unit + 1}, {units[unit]} with m = {unit} (prompt: {base} units of {unit})"
    )


def _json(response: httpx.Response | None) -> dict:
    if response is None or not response.is_success:
        return {}
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _reset_done(response: httpx.Response | None) -> bool:
    """A 2xx answer; vLLM answers 200 with {"success": false} when it could not reset."""
    return response is not None and response.is_success and _json(response).get("success", True) is not False


def open_target(options: TargetOptions) -> OpenAITarget:
    if options.url is None:
        raise ValueError("the openai target needs the server's base URL (TargetOptions.url)")
    return OpenAITarget(options.url, resolve_model(options.model), options.block_size, options.reference_url)
