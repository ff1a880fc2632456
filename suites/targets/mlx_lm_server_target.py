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

import re
import socket
import subprocess
import sys
import tempfile
import time
from functools import wraps
from pathlib import Path

import httpx

from engine.models import resolve_model
from suites.targets.openai_target import OpenAITarget, ServerError
from suites.targets.protocol import Completion, TargetOptions

START_TIMEOUT_S = 120.0
LOG_TAIL_LINES = 30


class ServerDied(ServerError):
    """The mlx_lm.server under test can serve no more requests."""


class ServerProcess:
    """One ``python -m mlx_lm server`` subprocess, its port and its log."""

    def __init__(self, model_folder: Path, *extra_args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix=f"mlx-lm-server-{self.port}-", suffix=".log")[1])
        command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_folder),
                   "--host", "127.0.0.1", "--port", str(self.port), *extra_args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.command = " ".join(command)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.command} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0, trust_env=False).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise ServerError(f"{self.command} did not answer GET /health in {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """GET /health: mlx_lm.server answers 503 once its generation thread has died."""
        if self.process.poll() is not None:
            return False
        try:
            return httpx.get(f"{self.url}/health", timeout=5.0, trust_env=False).is_success
        except httpx.HTTPError:
            return False

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def error_lines(self) -> str:
        """The log's exception lines (e.g. "ValueError: Sequence 3 has an empty prompt.")."""
        text = self.log_path.read_text(errors="replace")
        found = re.findall(r"^(?:\w+\.)*\w*(?:Error|Exception): .*$|^.*generation thread died: .*$", text, re.M)
        return "\n".join(dict.fromkeys(found)) or "(no exception in the server's log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_path.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
        self.server = ServerProcess(model_folder)
        self.reference_server = ServerProcess(model_folder, "--prompt-cache-size", "0")
        try:
            self.server.wait_ready()
            self.reference_server.wait_ready()
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
        self.evidence = {**self.client.evidence, "server": self.server.command}

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
