"""Targets: the engines the conformance rules run against (``pytest --target NAME``)."""
