"""Known failures of released peers: expected (strict xfail), pinned to the versions seen failing.

A failing peer is a finding, not a broken build: on exactly these versions the rule is reported
as a known peer failure. On any other version the rule runs plainly, and a strict xfail that
passes fails the run: a fixed peer turns the entry red, and the entry goes. Each entry names
the upstream issue and docs/TARGETS.md holds the reproduction.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownFailure:
    targets: tuple[str, ...]
    versions: tuple[str, ...]
    rule: str
    why: str


KNOWN_FAILURES = (
    KnownFailure(
        targets=("mlx-lm", "mlx-lm-server"),
        versions=("0.32.2",),
        rule="test_a_prompt_equal_to_a_whole_previous_exchange_is_served_and_the_target_keeps_serving",
        why="mlx-lm #1215 (fix #1887 open): an exact full-prompt hit leaves an empty prompt; "
        "BatchGenerator raises 'Sequence N has an empty prompt' and the server's generation thread dies",
    ),
)


def known_failure(target: str, version: str, rule: str) -> str | None:
    """The reason ``rule`` is expected to fail on ``target`` at ``version``, or None."""
    for failure in KNOWN_FAILURES:
        if target in failure.targets and version in failure.versions and rule == failure.rule:
            return f"known peer failure ({target} {version}): {failure.why}"
    return None
