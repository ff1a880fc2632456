"""The conformance report printed at the end of a run: what was checked, on what, with what verdict.

Two kinds of content, kept apart so that nothing is counted twice under xdist:
- outcomes (passed, failed, not applicable, expected peer failures, ...) are counted from
  pytest's own test reports, once, by the process that prints the report;
- measurements (golden cases, hit rates, logit differences) are recorded by the tests in the
  process that runs them; each xdist worker hands its measurements to the controller.
"""

from dataclasses import asdict, dataclass, field

from suites.exactness import exactness

NOT_APPLICABLE = "not applicable"


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

    # -- what tests record --------------------------------------------------------------

    @property
    def golden_cases(self) -> int:
        return self.measured.golden_cases

    @golden_cases.setter
    def golden_cases(self, value: int) -> None:
        self.measured.golden_cases = value

    @property
    def steps_not_comparable(self) -> int:
        return self.measured.steps_not_comparable

    @steps_not_comparable.setter
    def steps_not_comparable(self, value: int) -> None:
        self.measured.steps_not_comparable = value

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
        """Count one phase's report; each test lands in exactly one outcome."""
        outcomes = self.outcomes
        if report.when == "call":
            if hasattr(report, "wasxfail"):
                if report.skipped:
                    outcomes.expected_failures += 1
                else:  # a strict xfail that passed fails the run; a non-strict one is counted the same
                    outcomes.unexpected_passes += 1
            elif report.passed:
                outcomes.passed += 1
            elif report.failed:
                outcomes.failed += 1
            elif report.skipped:  # pytest.skip() inside the test body
                self._count_skip(report)
        elif report.when == "setup":
            if report.skipped:
                if hasattr(report, "wasxfail"):
                    outcomes.expected_failures += 1
                else:
                    self._count_skip(report)
            elif report.failed:
                outcomes.errors += 1
        elif report.when == "teardown" and report.failed:
            outcomes.errors += 1

    def _count_skip(self, report) -> None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason.removeprefix("Skipped: ").startswith(NOT_APPLICABLE):
            self.outcomes.not_applicable += 1
        else:
            self.outcomes.skipped += 1

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
            return "no logits compared"
        return f"{self.measured.largest_logit_difference:.3g} over {self.measured.logit_comparisons} comparisons"

    def lines(self, device: str, mlx_version: str) -> list[str]:
        mode = exactness()
        o = self.outcomes
        verdict = f"{o.passed} passed, {o.failed + o.errors + o.unexpected_passes} failed, {o.not_applicable} not applicable"
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
            ("logits compared", "none" if not self.measured.logit_comparisons else "bit for bit" if mode.bit_exact
             else "tokens exact up to the first near-tie, logit difference reported"),
            *([("steps after a near-tie, not compared", str(self.measured.steps_not_comparable))] if not mode.bit_exact else []),
            *(("note", note) for note in self.notes),
            ("device", device),
            ("MLX", mlx_version),
        ]
        width = max(len(name) for name, _ in rows)
        return [f"{name:<{width}}  {value}" for name, value in rows]


REPORT = ConformanceReport()
