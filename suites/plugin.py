"""The suite's pytest plugin (entry point ``pytest11``): targets, fixtures and the conformance report.

Installed with the package, so ``pytest --pyargs suites --target mlx-lm`` runs the rules from
any folder. What it adds:
- ``--target NAME`` (engine, mlx-lm, mlx-lm-server, openai) and the target's options;
- the fixtures: ``llm`` (our engine, reset to its defaults), ``target`` and ``scenario``;
- "not applicable" for a rule whose capabilities the target lacks, or that checks our
  engine's internals on another target, and strict expected failures for known peer bugs;
- the conformance report at the end of the run.
"""

import dataclasses

import pytest

from suites.conformance_report import NOT_APPLICABLE, REPORT
from suites.targets import TARGET_NAMES, open_target
from suites.targets.known_failures import known_failure
from suites.targets.protocol import TargetOptions

TARGET_FIXTURES = {"target", "scenario"}


def pytest_addoption(parser):
    group = parser.getgroup("prefix-conformance", "prefix-caching conformance")
    group.addoption("--target", choices=TARGET_NAMES, default="engine",
                    help="the engine under test (default: engine, this repository's)")
    group.addoption("--target-model", default=None,
                    help="model of the target: an embedded name (default tiny-qwen3) or a Hugging Face folder")
    group.addoption("--target-url", default=None, help="openai target: the server's base URL, e.g. http://127.0.0.1:8000")
    group.addoption("--target-reference-url", default=None,
                    help="openai target: the same server started with its prefix cache off (the cache-off reference)")
    group.addoption("--target-block-size", type=int, default=None,
                    help="openai target: the server's block size (vLLM: its --block-size, 16 by default)")
    group.addoption("--conformance-json", metavar="PATH", default=None,
                    help="write the conformance report as JSON (schema: docs/CONFORMANCE.md)")
    group.addoption("--conformance-markdown", metavar="PATH", default=None,
                    help="write the report as Markdown (also appended to $GITHUB_STEP_SUMMARY when it is set)")


def pytest_configure(config):
    """Select MLX's device from ENGINE_DEVICE before any test builds an array."""
    from engine.runner.device import select_device

    select_device()
    if not hasattr(config, "workeroutput"):
        config.pluginmanager.register(_OutcomeCounter(), "conformance-outcomes")
    config.addinivalue_line("markers", "needs(*capabilities): the target capabilities a rule needs (suites/targets/protocol.py)")


def target_model(config) -> str:
    """The target's model as the user named it (--target-model), or the engine's default."""
    from engine.llm import DEFAULT_MODEL

    return config.getoption("--target-model") or DEFAULT_MODEL


def target_options(config) -> TargetOptions:
    from engine.models import resolve_model

    return TargetOptions(
        model=str(resolve_model(target_model(config))),
        url=config.getoption("--target-url"),
        reference_url=config.getoption("--target-reference-url"),
        block_size=config.getoption("--target-block-size"),
    )


def pytest_collection_modifyitems(config, items):
    target = config.getoption("--target")
    if target != "engine":
        internal = pytest.mark.skip(reason=f"{NOT_APPLICABLE}: checks this repository's engine itself, not the {target} target")
        for item in items:
            if not TARGET_FIXTURES & set(getattr(item, "fixturenames", ())):
                item.add_marker(internal)
    if any("bit_exact" in item.keywords for item in items):
        from suites.exactness import exactness

        mode = exactness()
        if not mode.bit_exact:
            skip = pytest.mark.skip(reason=f"{NOT_APPLICABLE}: logits are not bit-exact here ({mode.evidence}); tokens are checked instead")
            for item in items:
                if "bit_exact" in item.keywords:
                    item.add_marker(skip)


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_llm():
    """The one ``LLM`` of this test session (of this xdist worker).

    Why only one: on Metal, memory held by a released ``LLM`` is not returned to the
    process, so a second ``LLM`` would find no KV budget left. Every setting a test needs
    (caching off, a small pool for eviction, another block size, the other tiny model)
    comes from ``reconfigure`` on this engine, which reuses its KV pool.
    """
    from engine import LLM

    llm = LLM()
    yield llm
    llm.close()


@pytest.fixture
def llm(shared_llm):
    """The shared ``LLM`` reset to the defaults: empty prefix cache, zero counters."""
    from engine.llm import DEFAULT_MODEL, EngineConfig

    shared_llm.reconfigure(model=DEFAULT_MODEL, **dataclasses.asdict(EngineConfig()))
    assert shared_llm.prefix_cache_stats().queries == 0
    return shared_llm


@pytest.fixture
def conformance():
    """The run's conformance report, for tests to record what they measured."""
    return REPORT


class _PeerTargets:
    """The session's peer target, opened once; reopened when a peer died in an earlier rule."""

    def __init__(self, config) -> None:
        self.config = config
        self.current = None

    def get(self):
        if self.current is not None and getattr(self.current, "dead", None):
            REPORT.note(f"{self.current.name} died in an earlier rule ({self.current.dead}); reopened")
            self.current.close()
            self.current = None
        if self.current is None:
            self.current = open_target(self.config.getoption("--target"), target_options(self.config))
            REPORT.describe_target(self.current)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()


@pytest.fixture(scope="session")
def peer_targets(request):
    targets = _PeerTargets(request.config)
    yield targets
    targets.close()


@pytest.fixture
def target(request):
    """The target under test, with the rule's needs checked: lacking one, the rule is not applicable."""
    name = request.config.getoption("--target")
    if name == "engine":
        from suites.targets.engine_target import EngineTarget

        chosen = EngineTarget(request.getfixturevalue("llm"))
        REPORT.describe_target(chosen)
    else:
        chosen = request.getfixturevalue("peer_targets").get()
    marker = request.node.get_closest_marker("needs")
    missing = chosen.capabilities.lacks(marker.args if marker else ())
    if missing:
        pytest.skip(f"{NOT_APPLICABLE}: {chosen.name} lacks {', '.join(missing)}")
    failure = known_failure(chosen.name, chosen.version, request.node.originalname)
    if failure is not None:
        request.node.add_marker(failure)
    return chosen


@pytest.fixture(scope="session")
def target_golden(request):
    """The committed cache-off golden of the target's model (the embedded tiny models have one),
    checked against the model folder's weights; without one, the golden rules are not applicable."""
    from engine.models import weight_checksum
    from suites import golden
    from suites.golden_cases import golden_cases

    model = target_model(request.config)
    if not golden.golden_path(model).exists():
        pytest.skip(f"{NOT_APPLICABLE}: no golden file for model {golden.golden_name(model)!r} in {golden.GOLDEN_DIR}")
    committed = golden.load_golden(model, weight_checksum(target_options(request.config).model))
    return [(case, committed["cases"][case.name]) for case in golden_cases()]


@pytest.fixture(scope="session")
def prompt_source(request):
    from suites.targets.scenario import PromptSource

    return PromptSource(target_options(request.config).model)


@pytest.fixture
def scenario(request, target, prompt_source):
    """A rule's run on the target; the hits it predicted and observed travel with the test's
    report (``user_properties``, which xdist hands to the controller) into the JSON report."""
    from suites.targets.scenario import Scenario

    hits: list = []
    request.node.user_properties.append(("hits", hits))
    return Scenario(target, prompt_source, hits)


# -- the report -----------------------------------------------------------------------


class _OutcomeCounter:
    """Counts each test's outcome once, in the process that prints the report: under xdist the
    controller, which receives every worker's reports (a worker registers no counter)."""

    def pytest_runtest_logreport(self, report):
        REPORT.count(report)


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand its measurements to the controller
        workeroutput["conformance"] = REPORT.measurements()


def pytest_testnodedown(node, error):
    if "conformance" in getattr(node, "workeroutput", {}):
        REPORT.merge(node.workeroutput["conformance"])


def pytest_terminal_summary(terminalreporter, config):
    if hasattr(config, "workeroutput") or not REPORT.outcomes_counted():
        return
    import json
    import os
    from pathlib import Path

    import mlx.core as mx

    device, version = str(mx.default_device()), mx.__version__
    terminalreporter.section("conformance report")
    for line in REPORT.lines(device, version):
        terminalreporter.write_line(line)
    if config.getoption("--conformance-json"):
        path = Path(config.getoption("--conformance-json"))
        path.write_text(json.dumps(REPORT.as_json(device, version), indent=2, sort_keys=True) + "\n")
        terminalreporter.write_line(f"conformance report written to {path}")
    markdown = REPORT.as_markdown(device, version)
    if config.getoption("--conformance-markdown"):
        Path(config.getoption("--conformance-markdown")).write_text(markdown)
    if os.environ.get("GITHUB_STEP_SUMMARY"):  # GitHub Actions: the job page's summary, appended to
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as out:
            out.write(markdown)

