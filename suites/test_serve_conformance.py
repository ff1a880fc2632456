"""``engine serve`` holds every prefix-caching rule as a black box, through the ``openai`` target.

Two real servers in subprocesses, started as a user starts them: ``engine serve`` (the console
script) and, as the cache-off reference, ``python -m engine.serve --no-enable-prefix-caching``.
The rules run in a pytest subprocess exactly as the README's command line runs them against
vLLM (``--target openai --target-url ... --target-reference-url ... --target-block-size 16``),
and its conformance report must show every rule passed, none failed and none not applicable,
each hit observed equal to the hit predicted.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0
RULES_TIMEOUT_S = 300.0


class ServeProcess:
    """One ``engine serve`` subprocess on a port it picks itself (``--port 0``), read from its log."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.command = [*command, "--port", "0"]
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, cwd=ROOT)
        self.url: str | None = None

    def wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.url is None:
            found = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", self.log.read_text(errors="replace"))
            if found:
                self.url = found.group(1)
            elif self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{' '.join(self.command)} did not start:\n{self.log.read_text()[-3000:]}")
            else:
                time.sleep(0.1)
        assert httpx.get(f"{self.url}/health", timeout=10.0).status_code == 200
        return self.url

    def stop(self) -> None:
        """SIGTERM, as a service manager stops it: it must end by itself."""
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{' '.join(self.command)} ignored SIGTERM for 30 s") from None


@pytest.fixture
def servers(tmp_path):
    under_test = ServeProcess([str(Path(sys.executable).with_name("engine")), "serve"], tmp_path / "serve.log")
    reference = ServeProcess([sys.executable, "-m", "engine.serve", "--no-enable-prefix-caching"],
                             tmp_path / "reference.log")
    try:
        yield under_test.wait_ready(), reference.wait_ready()
    finally:
        under_test.stop()
        reference.stop()


def test_engine_serve_holds_every_prefix_caching_rule_through_the_openai_target(servers, tmp_path):
    url, reference_url = servers
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "suites/test_prefix_cache_rules.py",
               "--target", "openai", "--target-url", url, "--target-reference-url", reference_url,
               "--target-block-size", "16", "--conformance-json", str(report_path)]
    run = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=RULES_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["target"]["name"] == "openai"
    assert report["target"]["capabilities"] == {
        "hit_granularity": 16, "cached_tokens": True, "counters": True, "reset": True, "cache_salt": True,
        "cache_off": True, "concurrent": True, "token_prompts": True, "output_kv": "all-but-last",
    }
    outcomes = report["outcomes"]
    assert outcomes["passed"] == len(report["rules"]) > 0, outcomes
    assert outcomes["failed"] == outcomes["errors"] == outcomes["not_applicable"] == 0, outcomes
    hits = [hit for rule in report["rules"] for hit in rule.get("hits", [])]
    assert hits and all(hit["observed"] == hit["expected"] for hit in hits)
    assert any(hit["expected"] > 0 for hit in hits)
