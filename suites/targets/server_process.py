"""A server under test in a subprocess: its port, its log, its start and its stop.

Used by the mlx-lm-server target (two mlx_lm.server processes) and by tools/bench --serve
(engine serve and mlx_lm.server). The log file keeps what the server printed, for the error
message when it fails to start or dies.
"""

import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import httpx

from suites.targets.openai_target import ServerError

LOG_TAIL_LINES = 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """One server subprocess listening on 127.0.0.1:``port``; a context manager that stops it."""

    def __init__(self, command: list[str], port: int, log_prefix: str = "server") -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.command = command
        fd, log_name = tempfile.mkstemp(prefix=f"{log_prefix}-{port}-", suffix=".log")
        self.log_path = Path(log_name)
        with open(fd, "wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def wait_ready(self, timeout: float, paths: tuple[str, ...] = ("/health", "/v1/models")) -> float:
        """Seconds until one of ``paths`` answers 2xx; raises ServerError if the process exits first."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                command = " ".join(self.command)
                raise ServerError(f"{command} exited with {self.process.returncode}:\n{self.log_tail()}")
            for path in paths:
                try:
                    if httpx.get(self.url + path, timeout=2.0, trust_env=False).is_success:
                        return time.monotonic() - started
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        command = " ".join(self.command)
        raise ServerError(f"{command} did not answer {' or '.join(paths)} in {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """Running, and GET /health answers 2xx (mlx_lm.server: 503 once its generation thread died)."""
        if self.process.poll() is not None:
            return False
        try:
            return httpx.get(f"{self.url}/health", timeout=5.0, trust_env=False).is_success
        except httpx.HTTPError:
            return False

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def error_lines(self) -> str:
        """The log's exception lines (e.g. "ValueError: Sequence 3 has an empty prompt.")."""
        text = self.log_path.read_text(errors="replace")
        found = re.findall(r"^(?:\w+\.)*\w*(?:Error|Exception): .*$|^.*generation thread died: .*$", text, re.M)
        return "\n".join(dict.fromkeys(found)) or "(no exception in the server's log)"

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_path.unlink(missing_ok=True)
