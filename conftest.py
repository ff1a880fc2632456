"""Shared test set-up: hypothesis profiles, backend selection, and the single shared LLM."""

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


def pytest_configure(config):
    """Select MLX's device from ENGINE_DEVICE before any test builds an array."""
    from engine.runner.device import select_device

    select_device()


# -- the single shared LLM -------------------------------------------------------------

import pytest  # noqa: E402

# Settings every test starts from; a test changes them through ``llm.reconfigure``.
DEFAULT_ENGINE = dict(
    block_size=16,
    num_kv_blocks=2048,
    enable_prefix_caching=True,
    max_num_seqs=8,
    max_num_batched_tokens=512,
    max_model_len=4096,
)
DEFAULT_MODEL = "tiny-qwen3"


@pytest.fixture(scope="session")
def shared_llm():
    """The one ``LLM`` of this test session (of this xdist worker).

    Why only one: on Metal, memory held by a released ``LLM`` is not returned to the
    process, so a second ``LLM`` would find no KV budget left. Every setting a test needs
    (caching off, a small pool for eviction, another block size, the other tiny model)
    comes from ``reconfigure`` on this engine, which reuses its KV pool.
    """
    from engine import LLM

    llm = LLM(model=DEFAULT_MODEL, **DEFAULT_ENGINE)
    yield llm
    llm.close()


@pytest.fixture
def llm(shared_llm):
    """The shared ``LLM`` reset to the defaults: empty prefix cache, zero counters."""
    shared_llm.reconfigure(model=DEFAULT_MODEL, **DEFAULT_ENGINE)
    assert shared_llm.prefix_cache_stats().queries == 0
    return shared_llm


# -- the conformance report ------------------------------------------------------------


@pytest.fixture
def conformance():
    """The run's conformance report, for tests to record what they measured."""
    from suites.conformance_report import REPORT

    return REPORT


def pytest_collection_modifyitems(config, items):
    """Tests of bit-identical logits apply only where the backend can give them."""
    if not any("bit_exact" in item.keywords for item in items):
        return
    from suites.conformance_report import REPORT
    from suites.exactness import exactness

    mode = exactness()
    if mode.bit_exact:
        return
    skip = pytest.mark.skip(reason=f"not applicable: logits are not bit-exact here ({mode.evidence}); tokens are checked instead")
    for item in items:
        if "bit_exact" in item.keywords:
            item.add_marker(skip)
            REPORT.tests_not_applicable += 1


def pytest_runtest_logreport(report):
    if report.when == "call" and "model" in report.keywords:
        from suites.conformance_report import REPORT

        if report.passed:
            REPORT.rules_passed += 1
        elif report.failed:
            REPORT.rules_failed += 1


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the report to the controller
        from suites.conformance_report import REPORT

        workeroutput["conformance"] = REPORT.as_dict()


def pytest_testnodedown(node, error):
    from suites.conformance_report import REPORT

    if "conformance" in node.workeroutput:
        REPORT.merge(node.workeroutput["conformance"])


def pytest_terminal_summary(terminalreporter, config):
    if hasattr(config, "workeroutput"):
        return
    from suites.conformance_report import REPORT

    if REPORT.rules_passed + REPORT.rules_failed == 0:
        return
    import mlx.core as mx

    terminalreporter.section("conformance report")
    for line in REPORT.lines(str(mx.default_device()), mx.__version__):
        terminalreporter.write_line(line)
