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

    def marker(self, version: str):
        module, name = self.raises.split(":")
        raises = getattr(importlib.import_module(module), name)
        return pytest.mark.xfail(strict=True, raises=raises, reason=f"known peer failure ({self.target} {version}): {self.why}")


EXCHANGE_RULE = "test_a_prompt_equal_to_a_whole_previous_exchange_is_served_and_the_target_keeps_serving"
ISSUE_1215 = ("mlx-lm #1215 (fix #1887 open): an exact full-prompt hit leaves an empty prompt; BatchGenerator raises "
              "'Sequence N has an empty prompt'")

KNOWN_FAILURES = (
    KnownFailure("mlx-lm", ("0.32.2",), EXCHANGE_RULE, "builtins:ValueError", ISSUE_1215),
    KnownFailure("mlx-lm-server", ("0.32.2",), EXCHANGE_RULE, "suites.targets.mlx_lm_server_target:ServerDied",
                 ISSUE_1215 + "; the server's generation thread dies and it answers no request after"),
)


def known_failure(target: str, version: str, rule: str):
    """The strict xfail marker of ``rule`` on ``target`` at ``version``, or None."""
    for failure in KNOWN_FAILURES:
        if target == failure.target and version in failure.versions and rule == failure.rule:
            return failure.marker(version)
    return None
