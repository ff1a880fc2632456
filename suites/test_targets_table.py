"""docs/TARGETS.md says only what the committed reports of real runs say."""

import json
import shutil

from tools import targets_table


def test_the_committed_table_matches_the_committed_reports():
    assert targets_table.main(["--check"]) == 0


def test_a_changed_report_makes_the_check_fail(tmp_path):
    reports = tmp_path / "targets"
    shutil.copytree(targets_table.REPORTS, reports)
    table = tmp_path / "TARGETS.md"
    assert targets_table.main(["--reports", str(reports), "--output", str(table)]) == 0
    assert targets_table.main(["--check", "--reports", str(reports), "--output", str(table)]) == 0
    path = reports / "mlx-lm.json"
    report = json.loads(path.read_text())
    rule = next(r for r in report["rules"] if r["outcome"] == "passed")
    rule["outcome"] = "failed"
    report["outcomes"]["passed"] -= 1
    report["outcomes"]["failed"] += 1
    path.write_text(json.dumps(report))
    assert targets_table.main(["--check", "--reports", str(reports), "--output", str(table)]) == 1
    targets_table.main(["--reports", str(reports), "--output", str(table)])
    assert "| FAILED |" in table.read_text() and "Not a known failure" in table.read_text()


def test_a_known_peer_failure_comes_with_its_reproduction_and_issue():
    text = targets_table.TABLE.read_text()
    assert "https://github.com/ml-explore/mlx-lm/issues/1215" in text
    assert "Sequence 1 has an empty prompt" in text
