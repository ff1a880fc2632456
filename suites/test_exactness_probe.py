"""The exactness probe: bit-exact comparisons run only where this machine is measured to allow them."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from suites import exactness as probe

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")


def test_the_probe_finds_a_difference_of_one_bit():
    check = probe._Probe(mx.float32)
    row = mx.array([[1.0, 2.0, 3.0]])
    check.compare("same", row, row)
    check.compare("one float32 step apart", row, row + mx.array([[0.0, 0.0, 2.0**-22]]))
    assert check.checks == 2
    assert check.differences == ["one float32 step apart: differs by 2.4e-07"]


def test_the_verdict_names_its_evidence_and_is_the_same_every_time():
    first, again = probe.measure_exactness(), probe.exactness()
    assert first.fingerprint == again.fingerprint and len(first.fingerprint) == 16
    assert first.bit_exact == (first.differences == ())
    assert first.evidence.startswith(f"probe ({mx.default_device()}, float32): ")
    assert first.mode == ("bit-exact" if first.bit_exact else "tokens")


def test_the_token_mode_can_be_forced_and_nothing_else(monkeypatch):
    monkeypatch.setenv(probe.EXACTNESS_ENV, "tokens")
    forced = probe.exactness()
    assert not forced.bit_exact and forced.evidence.startswith("ENGINE_EXACTNESS=tokens (forced)")
    monkeypatch.setenv(probe.EXACTNESS_ENV, "bit-exact")
    with pytest.raises(ValueError, match="ENGINE_EXACTNESS='bit-exact'"):
        probe.exactness()


def test_probe_shapes_follow_the_model_config():
    config = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152}
    assert dict(probe.model_shapes(config)) == dict(hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152)


@pytest.mark.skipif(not OPENBLAS.exists() or mx.default_device() != mx.cpu, reason="needs Debian's libopenblas0-pthread and the CPU device")
def test_a_preloaded_blas_under_any_name_is_measured_not_row_invariant(tmp_path):
    """The old guess looked for "blas" in LD_PRELOAD; a neutral link name must not fool the suite."""
    neutral = tmp_path / "libfast.so.0"
    neutral.symlink_to(OPENBLAS)
    script = "from suites.exactness import measure_exactness as m; e = m(); print(e.mode); print(e.evidence)"
    env = {**os.environ, "LD_PRELOAD": str(neutral)}
    env.pop(probe.EXACTNESS_ENV, None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    mode, evidence = result.stdout.splitlines()
    assert mode == "tokens", evidence
    assert "product" in evidence and "differs by" in evidence
