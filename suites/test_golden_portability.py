"""A golden written on one machine holds on another: what differs between machines never fails
the comparison (tools/regen --check and the golden suites share it), a changed token always does."""

import copy
import dataclasses
import json

import numpy as np
import pytest

from suites import golden
from suites.exactness import NOISE_BOUND

CASE = "bs16/family/suffix013"


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(golden.golden_path("tiny-qwen3").read_text())


def run_on_another_machine(committed: dict) -> dict:
    """The committed golden as a fresh run on another machine would report it (nothing changed yet)."""
    fresh = copy.deepcopy(committed)
    fresh["producer"] = {"arithmetic": "0123456789abcdef", "mlx_version": "9.9.9", "device": "Device(gpu, 0)", "machine": "arm64"}
    return fresh


def last_bits_moved(value: float) -> float:
    """One float32 step up: the size of a difference another BLAS or GPU makes."""
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


@pytest.mark.parametrize("same_bytes", [True, False], ids=["same-arithmetic", "other-arithmetic"])
def test_the_producer_and_the_reference_difference_never_fail_the_check(committed, same_bytes):
    fresh = run_on_another_machine(committed)
    # PyTorch's CPU kernels differ between CPUs: 1.335e-05 on an AMD EPYC against 1.144e-05 here.
    fresh["reference_max_logit_difference"] = {"transformers_vs_engine": 1.335e-05}
    assert golden.golden_differences(committed, fresh, same_bytes=same_bytes) == []


def test_a_reference_difference_beyond_its_bound_fails_the_check(committed):
    fresh = run_on_another_machine(committed)
    fresh["reference_max_logit_difference"] = {"transformers_vs_engine": golden.REFERENCE_BOUND_EXACT * 2}
    assert golden.golden_differences(committed, fresh, same_bytes=False) == []  # within the noise off exact backends
    bound = golden.REFERENCE_BOUND_EXACT
    assert golden.golden_differences(committed, fresh, same_bytes=True) == [
        f"reference difference transformers_vs_engine: {bound * 2:.3g} exceeds its bound {bound:.3g}"
    ]


def test_a_margin_moved_in_its_last_bits_holds_on_other_arithmetic_and_fails_on_the_same(committed):
    fresh = run_on_another_machine(committed)
    margin = committed["cases"][CASE]["min_margin"]
    fresh["cases"][CASE]["min_margin"] = last_bits_moved(margin)
    assert fresh["cases"][CASE]["min_margin"] != margin
    assert golden.golden_differences(committed, fresh, same_bytes=False) == []
    problems = golden.golden_differences(committed, fresh, same_bytes=True)
    assert len(problems) == 1 and problems[0].startswith(f"{CASE}: min_margin") and "must be identical" in problems[0]


def test_a_margin_beyond_the_noise_bound_fails_on_any_arithmetic(committed):
    fresh = run_on_another_machine(committed)
    fresh["cases"][CASE]["min_margin"] += 2 * NOISE_BOUND + 1e-3
    for same_bytes in (True, False):
        assert len(golden.golden_differences(committed, fresh, same_bytes=same_bytes)) == 1


@pytest.mark.parametrize("same_bytes", [True, False], ids=["same-arithmetic", "other-arithmetic"])
@pytest.mark.parametrize("field", ["token_ids", "prompt_token_ids"])
def test_a_changed_token_fails_the_check_on_any_arithmetic(committed, same_bytes, field):
    fresh = run_on_another_machine(committed)
    fresh["cases"][CASE][field][-1] += 1
    problems = golden.golden_differences(committed, fresh, same_bytes=same_bytes)
    assert len(problems) == 1 and problems[0].startswith(f"{CASE}: {field}")


def test_a_missing_or_extra_case_fails_the_check(committed):
    fresh = run_on_another_machine(committed)
    fresh["cases"]["bs16/extra"] = fresh["cases"].pop(CASE)
    assert golden.golden_differences(committed, fresh, same_bytes=False) == [
        f"{CASE}: only in the committed golden",
        "bs16/extra: not in the committed golden",
    ]


@pytest.mark.parametrize("bit_exact", [True, False])
def test_bytes_are_compared_only_with_the_producers_measured_arithmetic(monkeypatch, bit_exact):
    """same_arithmetic: the probe says bit-exact here, and the producer's fingerprint is this machine's."""
    here = golden.exactness()
    monkeypatch.setattr(golden, "model_exactness", lambda llm: dataclasses.replace(here, bit_exact=bit_exact))
    assert golden.same_arithmetic({"producer": {"arithmetic": here.fingerprint}}, llm=None) == bit_exact
    assert not golden.same_arithmetic({"producer": {"arithmetic": "another machine"}}, llm=None)
    assert not golden.same_arithmetic({}, llm=None)
