"""The ``mlx-lm-server`` target: ``python -m mlx_lm server`` in a subprocess, driven over HTTP.

Two servers are started from the same model folder: the one under test (mlx_lm.server's
defaults, its prompt cache of 10 sequences) and the reference, started with
``--prompt-cache-size 0``. In mlx-lm 0.32.2 that is a cache that keeps nothing:
``LRUPromptCache(0).insert_cache`` evicts every sequence as it is inserted, so every lookup
misses and each request is computed in full (a repeated prompt reports 0 cached tokens
there). It is the cheapest correct reference: one more model load for the session, where a
fresh server per reference call would load the model every time.

Both are driven through the openai target (prompts as text, output ids from logprobs,
granularity 1). mlx_lm.server cannot ignore EOS: its stop sequences always hold the EOS ids.

mlx-lm issue #1215 is reproduced, not hidden: a prompt equal to a sequence in the cache (a
previous prompt plus its full completion) kills the server's generation thread ("ValueError:
Sequence N has an empty prompt." in its log); the request that triggered it gets no answer
and every later one {"error": "generation thread died"}. The target raises ``ServerDied``
with the server's error, and every later call raises "server died earlier: ..." at once:
no retry, no restart.
"""

import sys
from functools import wraps
from pathlib import Path

from engine.models import resolve_model
from suites.targets.openai_target import OpenAITarget, ServerError
from suites.targets.protocol import Completion, TargetOptions
from suites.targets.server_process import ServerProcess, free_port

START_TIMEOUT_S = 120.0


class ServerDied(ServerError):
    """The mlx_lm.server under test can serve no more requests."""


def start_mlx_lm_server(model_folder: Path, *extra_args: str) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_folder),
               "--host", "127.0.0.1", "--port", str(port), *extra_args]
    return ServerProcess(command, port, log_prefix="mlx-lm-server")


def _until_dead(method):
    """Run ``method``; a failure that leaves the server unhealthy marks it dead for the session."""

    @wraps(method)
    def guarded(self, *args, **kwargs):
        if self.dead is not None:
            raise ServerDied(f"server died earlier: {self.dead}")
        try:
            return method(self, *args, **kwargs)
        except ServerError as error:
            if self.server.healthy():
                raise
            self.dead = f"{error}\nmlx_lm.server's log: {self.server.error_lines()}"
            raise ServerDied(f"mlx_lm.server ({self.server.url}) died: {self.dead}") from error

    return guarded


class MlxLmServerTarget:
    """mlx_lm.server seen through the openai target, with its own servers to start and stop."""

    name = "mlx-lm-server"

    def __init__(self, model_folder: Path) -> None:
        self.dead: str | None = None  # why the server under test can serve no more, once it cannot
        self.client: OpenAITarget | None = None
        self.server = start_mlx_lm_server(model_folder)
        self.reference_server = start_mlx_lm_server(model_folder, "--prompt-cache-size", "0")
        try:
            self.server.wait_ready(START_TIMEOUT_S, paths=("/health",))
            self.reference_server.wait_ready(START_TIMEOUT_S, paths=("/health",))
            self.client = OpenAITarget(self.server.url, model_folder, block_size=1,
                                       reference_url=self.reference_server.url)
        except BaseException:
            self.close()
            raise
        if self.client.kind != "mlx_lm.server":
            self.close()
            raise ServerError(f"{self.server.url} is not mlx_lm.server: {self.client.evidence['kind']}")
        self.version = self.client.version
        self.capabilities = self.client.capabilities
        self.evidence = {**self.client.evidence, "server": " ".join(self.server.command)}

    @_until_dead
    def generate(self, prompts: list[list[int]], max_tokens: int,
                 cache_salt: str | None = None) -> list[Completion]:
        return self.client.generate(prompts, max_tokens, cache_salt)

    @_until_dead
    def reference(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        return self.client.reference(prompts, max_tokens)

    def counters(self) -> tuple[int, int]:
        return self.client.counters()

    def reset_prefix_cache(self) -> bool:
        return self.client.reset_prefix_cache()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.server.stop()
        self.reference_server.stop()


def open_target(options: TargetOptions) -> MlxLmServerTarget:
    return MlxLmServerTarget(resolve_model(options.model))
