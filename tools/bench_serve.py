"""The servers tools/bench --serve starts itself: ``engine serve`` and ``mlx_lm.server``.

Each runs in a subprocess on a free local port, on the bench's model folder and with the
bench's settings, so that the side-by-side table compares like with like:

* ``engine``: ``python -m engine.serve --model FOLDER`` with every engine setting of the
  offline sides as a dashed flag (``--block-size``, ``--num-kv-blocks``, ``--max-num-seqs``,
  ``--max-num-batched-tokens``, ``--max-model-len``); prefix caching on, its default;
* ``mlx-lm-server``: ``python -m mlx_lm server --model FOLDER`` with the offline mlx-lm side's
  batch settings (``--decode-concurrency`` = max_num_seqs, ``--prompt-concurrency 8``,
  ``--prefill-step-size 2048``) and a prompt cache that holds every request of the run
  (``--prompt-cache-size``; its default of 10 sequences would evict most of a 50-prompt pass).

A server inherits the bench's environment, so it runs the BLAS the bench chose (LD_PRELOAD)
and the device of ``ENGINE_DEVICE``. Its output goes to a log file, kept for the error message
if it fails to start or dies.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import httpx

SERVERS = ("engine", "mlx-lm-server")
LABELS = {"engine": "engine serve", "mlx-lm-server": "mlx_lm.server"}
START_TIMEOUT_S = 300.0
LOG_TAIL_LINES = 30


def available(name: str) -> str | None:
    """None where the server ``name`` can be started here, else why not."""
    if name == "engine" and importlib.util.find_spec("engine.serve") is None:
        return "engine serve is not in this checkout (no module engine.serve)"
    return None


def server_command(name: str, model_folder: Path, port: int, engine_settings: dict,
                   mlx_lm_settings: dict) -> list[str]:
    """The command line that starts ``name`` on ``port``."""
    common = ["--model", str(model_folder), "--host", "127.0.0.1", "--port", str(port)]
    if name == "engine":
        flags = [item for key, value in engine_settings.items() for item in (f"--{key.replace('_', '-')}", str(value))]
        return [sys.executable, "-m", "engine.serve", *common, *flags]
    if name == "mlx-lm-server":
        return [
            sys.executable, "-m", "mlx_lm", "server", *common,
            "--decode-concurrency", str(mlx_lm_settings["completion_batch_size"]),
            "--prompt-concurrency", str(mlx_lm_settings["prefill_batch_size"]),
            "--prefill-step-size", str(mlx_lm_settings["prefill_step_size"]),
            "--prompt-cache-size", str(mlx_lm_settings["prompt_cache_size"]),
            "--log-level", "WARNING",
        ]
    raise ValueError(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")


class ServerProcess:
    """One server subprocess, its URL and its log; a context manager that stops it."""

    def __init__(self, command: list[str], port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.command = command
        fd, log_name = tempfile.mkstemp(prefix=f"bench-server-{port}-", suffix=".log")
        self.log_path = Path(log_name)
        with os.fdopen(fd, "wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> float:
        """Seconds until GET /health (or /v1/models) answers 2xx; raises if the process exits."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{' '.join(self.command)} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            for path in ("/health", "/v1/models"):
                try:
                    if httpx.get(self.url + path, timeout=2.0, trust_env=False).is_success:
                        return time.monotonic() - started
                except httpx.HTTPError:
                    pass
            time.sleep(0.25)
        raise RuntimeError(f"{' '.join(self.command)} did not answer in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_path.unlink(missing_ok=True)


def start(name: str, model_folder: Path, engine_settings: dict, mlx_lm_settings: dict) -> ServerProcess:
    """Start ``name`` on a free port and wait until it answers."""
    port = free_port()
    server = ServerProcess(server_command(name, model_folder, port, engine_settings, mlx_lm_settings), port)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
