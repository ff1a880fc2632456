"""The conformance report printed at the end of a run: what was checked, on what, with what verdict.

Two kinds of content, kept apart so that nothing is counted twice under xdist:
- outcomes (passed, failed, not applicable, expected peer failures, ...) are counted from
  pytest's own test reports, once, by the process that prints the report;
- measurements (golden cases, hit rates, logit differences) are recorded by the tests in the
  process that runs them; each xdist worker hands its measurements to the controller.
"""

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from suites.exactness import exactness

NOT_APPLICABLE = "not applicable"
SCHEMA_VERSION = 1


@dataclass
class Outcomes:
    """One count per test, the same tests pytest's summary counts."""

    passed: int = 0
    failed: int = 0
    errors: int = 0  # failed outside the test body (set-up, tear-down)
    not_applicable: int = 0  # skipped because the target or backend cannot run the rule
    skipped: int = 0  # skipped for another reason (a missing optional package)
    expected_failures: int = 0  # known peer failures (strict xfail), failing as recorded
    unexpected_passes: int = 0  # strict xfail that passed: pytest reports them as failed

    def total(self) -> int:
        return sum(asdict(self).values())


@dataclass
class Measurements:
    golden_cases: int = 0
    hit_rates: dict[str, list[int]] = field(default_factory=dict)  # label -> [hits, queries]
    largest_logit_difference: float = 0.0
    logit_comparisons: int = 0
    steps_not_comparable: int = 0  # greedy steps after a near-tie, off a bit-exact backend


@dataclass
class ConformanceReport:
    outcomes: Outcomes = field(default_factory=Outcomes)
    measured: Measurements = field(default_factory=Measurements)
    target: dict = field(default_factory=dict)  # name, version, capabilities
    notes: list[str] = field(default_factory=list)
    rules: dict[str, dict] = field(default_factory=dict)  # node id -> outcome, reason, hits

    # -- what tests record --------------------------------------------------------------

    def record_hit_rate(self, label: str, hits: int, queries: int) -> None:
        total = self.measured.hit_rates.setdefault(label, [0, 0])
        total[0] += hits
        total[1] += queries

    def record_logit_difference(self, difference: float) -> None:
        self.measured.logit_comparisons += 1
        self.measured.largest_logit_difference = max(self.measured.largest_logit_difference, difference)

    def describe_target(self, target) -> None:
        self.target = {"name": target.name, "version": target.version, "capabilities": target.capabilities.as_dict()}

    def note(self, line: str) -> None:
        self.notes.append(line)

    # -- outcomes, from pytest's reports --------------------------------------------------

    def count(self, report) -> None:
        """Count one phase's report as pytest's summary does: one outcome per test, and a failed
        tear-down adds an error (after a pass, pytest counts both)."""
        outcome = self._outcome(report)
        if outcome is None:
            return
        reason = getattr(report, "wasxfail", "") or (self._skip_reason(report) if report.skipped else "")
        if outcome == "unexpected_passes":
            reason = str(report.longrepr)
        setattr(self.outcomes, outcome, getattr(self.outcomes, outcome) + 1)
        rule = self.rules.setdefault(report.nodeid, {"id": report.nodeid})
        if rule.get("outcome") in (None, "passed"):  # a tear-down error outranks a pass in the rule's line
            rule.update(outcome=outcome, reason=reason or None)
        hits = dict(report.user_properties).get("hits")
        if hits:
            rule["hits"] = hits

    def _outcome(self, report) -> str | None:
        if report.when == "call":
            if hasattr(report, "wasxfail"):
                return "expected_failures" if report.skipped else "unexpected_passes"
            if report.skipped:  # pytest.skip() inside the test body
                return self._skip_outcome(report)
            if report.failed and str(report.longrepr).startswith("[XPASS(strict)]"):
                return "unexpected_passes"  # a fixed peer: pytest fails the test, we say why
            return "passed" if report.passed else "failed"
        if report.when == "setup" and report.skipped:
            return "expected_failures" if hasattr(report, "wasxfail") else self._skip_outcome(report)
        if report.failed:  # set-up or tear-down
            return "errors"
        return None

    @staticmethod
    def _skip_reason(report) -> str:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return reason.removeprefix("Skipped: ")

    def _skip_outcome(self, report) -> str:
        return "not_applicable" if self._skip_reason(report).startswith(NOT_APPLICABLE) else "skipped"

    def outcomes_counted(self) -> bool:
        return self.outcomes.total() > 0

    # -- xdist ------------------------------------------------------------------------------

    def measurements(self) -> dict:
        return {"measured": asdict(self.measured), "target": self.target, "notes": self.notes}

    def merge(self, worker: dict) -> None:
        other = worker["measured"]
        self.measured.golden_cases += other["golden_cases"]
        for label, (hits, queries) in other["hit_rates"].items():
            self.record_hit_rate(label, hits, queries)
        self.measured.largest_logit_difference = max(self.measured.largest_logit_difference, other["largest_logit_difference"])
        self.measured.logit_comparisons += other["logit_comparisons"]
        self.measured.steps_not_comparable += other["steps_not_comparable"]
        self.target = self.target or worker["target"]
        self.notes += [note for note in worker["notes"] if note not in self.notes]

    # -- the printed report -------------------------------------------------------------------

    def _largest_difference(self) -> str:
        if not self.measured.logit_comparisons:
            return "none recorded"
        return f"{self.measured.largest_logit_difference:.3g} over {self.measured.logit_comparisons} comparisons"

    def lines(self, device: str, mlx_version: str) -> list[str]:
        rows = self.rows(device, mlx_version)
        width = max(len(name) for name, _ in rows)
        return [f"{name:<{width}}  {value}" for name, value in rows]

    def rows(self, device: str, mlx_version: str) -> list[tuple[str, str]]:
        mode = exactness()
        o = self.outcomes
        verdict = f"{o.passed} passed, {o.failed + o.unexpected_passes} failed"
        if o.errors:
            verdict += f", {o.errors} errors"
        verdict += f", {o.not_applicable} not applicable"
        if o.expected_failures:
            verdict += f", {o.expected_failures} known peer failures"
        if o.skipped:
            verdict += f", {o.skipped} skipped"
        target = self.target or {"name": "engine", "version": "", "capabilities": {}}
        capabilities = ", ".join(
            f"{name}={value}" for name, value in target["capabilities"].items() if value not in (False, 0, "none")
        )
        rows = [
            ("target", f"{target['name']} {target['version']}".strip() + (f" ({capabilities})" if capabilities else "")),
            ("rules", verdict),
            ("golden cases compared", str(self.measured.golden_cases)),
            *(
                (f"hit rate, {label}", f"{hits}/{queries} = {hits / queries:.1%}")
                for label, (hits, queries) in sorted(self.measured.hit_rates.items())
                if queries
            ),
            ("largest cache-on vs cache-off logit difference", self._largest_difference()),
            ("exactness mode", f"{mode.mode}: {mode.evidence}"),
            ("logits compared", "bit for bit" if mode.bit_exact else "tokens exact up to the first near-tie, logit difference reported"),
            *([("steps after a near-tie, not compared", str(self.measured.steps_not_comparable))] if not mode.bit_exact else []),
            *(("note", note) for note in self.notes),
            ("device", device),
            ("MLX", mlx_version),
        ]
        return rows

    # -- machine-readable -----------------------------------------------------------------------

    def as_json(self, device: str, mlx_version: str) -> dict:
        """The run as one JSON document (schema in docs/CONFORMANCE.md, versioned)."""
        mode = exactness()
        return {
            "schema_version": SCHEMA_VERSION,
            "target": self.target or {"name": "engine", "version": None, "capabilities": {}},
            "machine": {
                "os": f"{platform.system()} {platform.release()}",
                "cpu": platform.processor() or platform.machine(),
                "machine": platform.machine(),
                "python": platform.python_version(),
                "mlx_version": mlx_version,
                "device": device,
                "blas_libraries_loaded": loaded_blas(),
                "exactness": {"mode": mode.mode, "evidence": mode.evidence, "differences": list(mode.differences),
                              "fingerprint": mode.fingerprint},
            },
            "outcomes": asdict(self.outcomes),
            "rules": sorted(self.rules.values(), key=lambda rule: rule["id"]),
            "golden_cases": self.measured.golden_cases,
            "hit_rates": {label: {"hits": h, "queries": q} for label, (h, q) in sorted(self.measured.hit_rates.items())},
            "largest_logit_difference": self.measured.largest_logit_difference if self.measured.logit_comparisons else None,
            "logit_comparisons": self.measured.logit_comparisons,
            "steps_not_comparable": self.measured.steps_not_comparable,
            "notes": self.notes,
        }

    def as_markdown(self, device: str, mlx_version: str) -> str:
        """A summary for a CI job page: the verdict, then every rule that did not pass."""
        lines = ["## Prefix-caching conformance", "", "| | |", "|---|---|"]
        lines += [f"| {name} | {value.replace('|', '/')} |" for name, value in self.rows(device, mlx_version)]
        other = [rule for rule in sorted(self.rules.values(), key=lambda r: r["id"]) if rule["outcome"] != "passed"]
        if other:
            lines += ["", "| rule | outcome | why |", "|---|---|---|"]
            lines += [f"| `{r['id']}` | {r['outcome'].replace('_', ' ')} | {(r['reason'] or '').replace('|', '/')} |" for r in other]
        return "\n".join(lines) + "\n"


def loaded_blas() -> list[str]:
    """The BLAS libraries this process has mapped (Linux: /proc/self/maps); [] where unknown."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    names = {Path(line.split()[-1]).name for line in maps.read_text().splitlines() if "/" in line}
    return sorted(name for name in names if "blas" in name.lower() or "accelerate" in name.lower() or "mkl" in name.lower())


REPORT = ConformanceReport()
