"""Known failures of released peers: expected (strict xfail), pinned to the versions seen failing.

A failing peer is a finding, not a broken build: on exactly these versions the rule is reported
as a known peer failure. On any other version the rule runs plainly, and a strict xfail that
passes fails the run: a fixed peer turns the entry red, and the entry goes. Each entry names
the upstream issue and docs/TARGETS.md holds the reproduction.
"""

import importlib
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class KnownFailure:
    target: str
    versions: tuple[str, ...]
    rule: str
    raises: str  # the exception the failure shows as ("module:Class"); any other still fails the rule
    why: str
    issue: str  # the upstream issue's address
    reproduction: str  # a few lines that show it without this suite

    def marker(self, version: str):
        module, name = self.raises.split(":")
        raises = getattr(importlib.import_module(module), name)
        return pytest.mark.xfail(strict=True, raises=raises, reason=f"known peer failure ({self.target} {version}): {self.why}")


EXCHANGE_RULE = "test_a_prompt_equal_to_a_whole_previous_exchange_is_served_and_the_target_keeps_serving"
GOLDEN_RULE = "test_the_golden_cases_cold_and_warm_equal_the_golden_with_exact_hits"
ISSUE_1215 = ("mlx-lm #1215 (fix #1887 open): an exact full-prompt hit leaves an empty prompt; BatchGenerator raises "
              "'Sequence N has an empty prompt'")
URL_1215 = "https://github.com/ml-explore/mlx-lm/issues/1215"
# Checked on mlx-lm 0.32.2 with MLX 0.32.4 on the CPU, tiny-qwen3's folder (the engine's model cache).
REPRODUCTION_1215_SERVER = """\
# python -m mlx_lm server --model ~/.cache/mlx-prefix-conformance/models/tiny-qwen3-<checksum> --port 8179
import httpx
url = "http://127.0.0.1:8179/v1/completions"
prompt = " the cat sat on the mat and then the dog ran to the park with a ball"
first = httpx.post(url, json={"prompt": prompt, "max_tokens": 6, "temperature": 0}, timeout=60).json()
httpx.post(url, json={"prompt": prompt + first["choices"][0]["text"], "max_tokens": 6, "temperature": 0}, timeout=60)
# -> RemoteProtocolError: Server disconnected without sending a response
#    server log: mlx_lm.server generation thread died: Sequence 1 has an empty prompt.
httpx.post(url, json={"prompt": " any other prompt", "max_tokens": 2}, timeout=60).text
# -> '{"error": "generation thread died"}' for every request from now on
"""
REPRODUCTION_1215_IN_PROCESS = """\
from mlx_lm.models.cache import LRUPromptCache
# after a request for prompt p generated tokens t, mlx_lm.server inserts the cache under p + t:
#   cache.insert_cache(model_key, p + t, prompt_cache)
# a later request whose prompt is exactly p + t gets the whole prompt from the trie:
#   prompt_cache, rest = cache.fetch_nearest_cache(model_key, p + t)   # rest == []
#   batch_generator.insert_segments(segments=[[rest]], ...)            # ValueError: Sequence N has an empty prompt.
"""

KNOWN_FAILURES = (
    KnownFailure("mlx-lm", ("0.32.2",), EXCHANGE_RULE, "builtins:ValueError", ISSUE_1215, URL_1215,
                 REPRODUCTION_1215_IN_PROCESS),
    # The golden workload meets the same bug: a later case's prompt equals a sequence an earlier
    # case left in the trie (mlx-lm also stores each prompt but its last token after prefill).
    KnownFailure("mlx-lm", ("0.32.2",), GOLDEN_RULE, "builtins:ValueError", ISSUE_1215, URL_1215,
                 REPRODUCTION_1215_IN_PROCESS),
    KnownFailure("mlx-lm-server", ("0.32.2",), EXCHANGE_RULE, "suites.targets.mlx_lm_server_target:ServerDied",
                 ISSUE_1215 + "; the server's generation thread dies and it answers no request after", URL_1215,
                 REPRODUCTION_1215_SERVER),
)


def known_failure(target: str, version: str, rule: str):
    """The strict xfail marker of ``rule`` on ``target`` at ``version``, or None."""
    for failure in KNOWN_FAILURES:
        if target == failure.target and version in failure.versions and rule == failure.rule:
            return failure.marker(version)
    return None
