"""Render docs/TARGETS.md from the JSON conformance reports of real runs (docs/targets/*.json).

    python -m tools.targets_table            # rewrite docs/TARGETS.md
    python -m tools.targets_table --check    # exit 1 when docs/TARGETS.md differs from its reports

The reports come from ``tox -e targets`` (pytest --conformance-json); the reproductions and
upstream issues of peer failures from suites/targets/known_failures.py. Nothing here is typed
by hand, so the table says only what a run reported.
"""

import argparse
import json
import sys
from pathlib import Path

from suites.targets.known_failures import KNOWN_FAILURES

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "docs" / "targets"
TABLE = ROOT / "docs" / "TARGETS.md"
ORDER = ("engine", "mlx-lm", "mlx-lm-server", "openai")
SHOWN = {"passed": "held", "failed": "FAILED", "errors": "ERROR", "not_applicable": "n/a",
         "expected_failures": "known peer failure", "unexpected_passes": "FIXED (xfail passed)", "skipped": "skipped"}


def load_reports(folder: Path) -> list[dict]:
    reports = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    return sorted(reports, key=lambda r: (ORDER.index(r["target"]["name"]) if r["target"]["name"] in ORDER else 99,
                                          r["target"]["name"]))


def rule_name(node_id: str) -> str:
    return node_id.split("::", 1)[1]


def render(reports: list[dict]) -> str:
    lines = [
        "# Targets: the rules on each engine",
        "",
        "Produced by `python -m tools.targets_table` from the JSON reports in `docs/targets/` (written by",
        "`tox -e targets`); do not edit by hand. A rule is *not applicable* where the target lacks a",
        "capability it needs (never counted as held); a *known peer failure* is a strict expected",
        "failure pinned to the peer's version, with its reproduction below.",
        "",
        "| target | version | held | failed | not applicable | known peer failures | machine | exactness |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        o, m = report["outcomes"], report["machine"]
        failed = o["failed"] + o["errors"] + o["unexpected_passes"]
        lines.append(
            f"| {report['target']['name']} | {report['target']['version']} | {o['passed']} | {failed} | "
            f"{o['not_applicable']} | {o['expected_failures']} | {m['os']}, {m['machine']}, MLX {m['mlx_version']} "
            f"{m['device']} | {m['exactness']['mode']} |"
        )
    lines += ["", "## Capabilities declared", "", "| target | " + " | ".join(_capability_names(reports)) + " |",
              "|---|" + "---|" * len(_capability_names(reports))]
    for report in reports:
        capabilities = report["target"]["capabilities"]
        lines.append(f"| {report['target']['name']} | " + " | ".join(str(capabilities.get(n, "")) for n in _capability_names(reports)) + " |")
    rules = sorted({rule_name(rule["id"]) for report in reports for rule in report["rules"]})
    lines += ["", "## Rule by rule", "", "| rule | " + " | ".join(r["target"]["name"] for r in reports) + " |",
              "|---|" + "---|" * len(reports)]
    for rule in rules:
        cells = []
        for report in reports:
            found = [r for r in report["rules"] if rule_name(r["id"]) == rule]
            cells.append(SHOWN[found[0]["outcome"]] if found else "")
        lines.append(f"| `{rule}` | " + " | ".join(cells) + " |")
    lines += _failures(reports)
    return "\n".join(lines) + "\n"


def _capability_names(reports: list[dict]) -> list[str]:
    return sorted({name for report in reports for name in report["target"]["capabilities"]})


def _failures(reports: list[dict]) -> list[str]:
    lines = ["", "## Failures and their reproductions"]
    found = False
    for report in reports:
        name, version = report["target"]["name"], report["target"]["version"]
        for rule in report["rules"]:
            if rule["outcome"] in ("passed", "not_applicable", "skipped"):
                continue
            found = True
            lines += ["", f"### {name} {version}: `{rule_name(rule['id'])}` ({SHOWN[rule['outcome']]})", ""]
            known = [f for f in KNOWN_FAILURES if f.target == name and f.rule == rule_name(rule["id"]).split("[")[0]]
            if known:
                lines += [f"{known[0].why}. Upstream: {known[0].issue}", "", "```python", known[0].reproduction.rstrip(), "```"]
            else:
                lines += [f"Not a known failure: {rule.get('reason') or 'see the run log'}"]
    if not found:
        lines += ["", "None in these reports."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/TARGETS.md differs from the reports")
    parser.add_argument("--reports", type=Path, default=REPORTS)
    parser.add_argument("--output", type=Path, default=TABLE)
    args = parser.parse_args(argv)
    reports = load_reports(args.reports)
    if not reports:
        print(f"no reports in {args.reports}; run tox -e targets", file=sys.stderr)
        return 1
    text = render(reports)
    if args.check:
        if not args.output.exists() or args.output.read_text() != text:
            print(f"{args.output} differs from the reports in {args.reports}: run python -m tools.targets_table", file=sys.stderr)
            return 1
        print(f"{args.output} matches its {len(reports)} reports")
        return 0
    args.output.write_text(text)
    print(f"{args.output} written from {len(reports)} reports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
