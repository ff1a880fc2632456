"""Known peer failures are pinned to the versions seen failing: a fixed peer runs the rule plainly."""

import pytest

from suites.targets.known_failures import EXCHANGE_RULE, KNOWN_FAILURES, known_failure
from suites.targets.mlx_lm_server_target import ServerDied


def test_a_known_failure_is_a_strict_xfail_for_its_exception_only():
    marker = known_failure("mlx-lm-server", "0.32.2", EXCHANGE_RULE)
    assert marker.kwargs["strict"] is True and marker.kwargs["raises"] is ServerDied
    assert "mlx-lm #1215" in marker.kwargs["reason"]


@pytest.mark.parametrize(("target", "version", "rule"), [
    ("mlx-lm", "0.32.3", EXCHANGE_RULE),  # another release: the rule runs plainly
    ("engine", "0.32.2", EXCHANGE_RULE),  # another target
    ("mlx-lm", "0.32.2", "test_a_repeated_prompt_is_served_from_the_cache_up_to_its_last_token"),
])
def test_anything_else_runs_the_rule_plainly(target, version, rule):
    assert known_failure(target, version, rule) is None


def test_every_known_failure_names_an_upstream_issue_and_a_rule_that_exists():
    from suites import test_prefix_cache_rules as rules

    for failure in KNOWN_FAILURES:
        assert "#" in failure.why
        assert hasattr(rules, failure.rule)
