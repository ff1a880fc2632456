"""The suite's command-line tools, one module each.

Each runs three ways: ``python -m tools.<name>``, its console script (``conformance-<name>``,
pyproject.toml's ``[project.scripts]``) where the project is installed, and ``tools/<name>``,
a launcher kept for the commands the docs and habits already use.
"""
