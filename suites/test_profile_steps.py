"""tools/profile_steps runs the bench's workload step by step and splits each step's time."""

import pytest

from tools import profile_steps

pytestmark = pytest.mark.model


def test_profile_steps_reports_every_step_split_into_build_launch_and_wait(capsys):
    assert profile_steps.main(["--model", "tiny-llama", "--num-prompts", "4", "--output-len", "6", "--kernels", "0"]) == 0
    out = capsys.readouterr().out
    assert "first pass: 6 steps" in out and "second pass: 6 steps" in out
    assert out.count("= build") == 4  # every step, and the steps of 4 decode rows, in each pass
