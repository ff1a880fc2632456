"""The conformance report printed at the end of a run: what was checked, on what.

Tests record into the one ``REPORT`` of their process; under xdist each worker sends its
report to the controller, which merges them before printing.
"""

from dataclasses import asdict, dataclass, field

from suites.exactness import exactness


@dataclass
class ConformanceReport:
    rules_passed: int = 0
    rules_failed: int = 0
    golden_cases: int = 0
    hit_rates: dict[str, list[int]] = field(default_factory=dict)  # label -> [hits, queries]
    largest_logit_difference: float = 0.0
    logit_comparisons: int = 0
    steps_not_comparable: int = 0  # greedy steps after a near-tie, off a bit-exact backend
    tests_not_applicable: int = 0  # bit-exact-only tests skipped on this backend

    def record_hit_rate(self, label: str, hits: int, queries: int) -> None:
        total = self.hit_rates.setdefault(label, [0, 0])
        total[0] += hits
        total[1] += queries

    def record_logit_difference(self, difference: float) -> None:
        self.logit_comparisons += 1
        self.largest_logit_difference = max(self.largest_logit_difference, difference)

    def merge(self, other: dict) -> None:
        self.rules_passed += other["rules_passed"]
        self.rules_failed += other["rules_failed"]
        self.golden_cases += other["golden_cases"]
        for label, (hits, queries) in other["hit_rates"].items():
            self.record_hit_rate(label, hits, queries)
        self.largest_logit_difference = max(self.largest_logit_difference, other["largest_logit_difference"])
        self.logit_comparisons += other["logit_comparisons"]
        self.steps_not_comparable += other["steps_not_comparable"]
        self.tests_not_applicable += other["tests_not_applicable"]

    def as_dict(self) -> dict:
        return asdict(self)

    def _largest_difference(self) -> str:
        if not self.logit_comparisons:
            return "no logits compared"
        return f"{self.largest_logit_difference:.3g} over {self.logit_comparisons} comparisons"

    def lines(self, device: str, mlx_version: str) -> list[str]:
        mode = exactness()
        rows = [
            ("rules checked", f"{self.rules_passed} passed, {self.rules_failed} failed"),
            ("golden cases compared", str(self.golden_cases)),
            *(
                (f"hit rate, {label}", f"{hits}/{queries} = {hits / queries:.1%}")
                for label, (hits, queries) in sorted(self.hit_rates.items())
                if queries
            ),
            ("largest cache-on vs cache-off logit difference", self._largest_difference()),
            ("exactness mode", mode.mode),
            ("why", mode.evidence),
            ("logits compared", "bit for bit" if mode.bit_exact else "tokens exact up to the first near-tie, logit difference reported"),
            *(
                [
                    ("steps after a near-tie, not compared", str(self.steps_not_comparable)),
                    ("bit-exact-only tests skipped here", str(self.tests_not_applicable)),
                ]
                if not mode.bit_exact
                else []
            ),
            ("device", device),
            ("MLX", mlx_version),
        ]
        width = max(len(name) for name, _ in rows)
        return [f"{name:<{width}}  {value}" for name, value in rows]


REPORT = ConformanceReport()
