"""Hypothesis profiles for this repository's test runs."""

import os

from hypothesis import HealthCheck, settings

# Profiles, chosen with HYPOTHESIS_PROFILE (default "ci"):
#   ci        deterministic and sized so every suite stays fast on each commit;
#   dev       random seeds, a little more search, for local work;
#   thorough  long searches before a release (>= 10,000 stateful steps in the block layer).
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=150, stateful_step_count=50, deadline=None)
settings.register_profile(
    "thorough",
    max_examples=1000,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Everything else (targets, fixtures, the conformance report) is the suite's pytest plugin,
# suites/plugin.py, installed with the package (entry point pytest11): users of the installed
# suite get it without this file.
