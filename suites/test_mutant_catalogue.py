"""tools/mutants' catalogue cannot go stale: every fault's edit must apply exactly once to the
sources as they are now, or the fault would test nothing.

``tools/mutants --check-catalogue`` reads files and runs no test, so this module is as fast as
the block-layer suites. tools/mutants never runs it against a mutant (a mutated copy fails
the check by construction).
"""

import subprocess
import sys
from pathlib import Path

from tools import mutants

ROOT = Path(__file__).resolve().parent.parent


def test_every_catalogued_fault_applies_exactly_once_to_the_current_sources():
    command = [sys.executable, "-m", "tools.mutants", "--check-catalogue"]
    check = subprocess.run(command, cwd=ROOT, check=False, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("all ") and check.stdout.endswith(" mutants apply exactly once\n")


def test_the_catalogue_check_names_every_fault_that_no_longer_applies(tmp_path, monkeypatch, capsys):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "pool.py").write_text("a = 1\nb = 2\nb = 2\n")
    catalogue = [
        mutants.mutant("applies", "extra", "Applies once.", ("engine/pool.py", "a = 1\n", "a = 0\n")),
        mutants.mutant("occurs-twice", "extra", "Text twice.", ("engine/pool.py", "b = 2\n", "b = 3\n")),
        mutants.mutant("moved-away", "extra", "Text gone.", ("engine/pool.py", "c = 3\n", "c = 4\n")),
        mutants.mutant("file-gone", "extra", "File gone.", ("engine/gone.py", "a = 1\n", "a = 0\n")),
    ]
    monkeypatch.setattr(mutants, "CATALOGUE", catalogue)
    monkeypatch.setattr(mutants, "REPO_ROOT", tmp_path)
    assert mutants.main(["--check-catalogue"]) == 2
    output = capsys.readouterr()
    problems = output.err.splitlines()[1:]
    assert [line.strip().split(":")[0] for line in problems] == ["occurs-twice", "moved-away", "file-gone"]
    assert "occurs 2 times" in problems[0] and "occurs 0 times" in problems[1]
    assert output.out == ""


def test_no_mutant_is_ever_run_against_this_check():
    """A mutated copy fails the check by construction: run there, it would kill every mutant."""
    files = mutants.ordered_test_files(ROOT)
    assert "suites/test_kv_prefix_cache.py" in files
    assert "suites/test_mutant_catalogue.py" not in files
