"""Targets: the engines the conformance rules run against (``pytest --target NAME``)."""

import importlib

from suites.targets.protocol import Target, TargetOptions

# name -> the module whose open_target(options) opens it
TARGET_MODULES = {
    "engine": "suites.targets.engine_target",
    "mlx-lm": "suites.targets.mlx_lm_target",
    "mlx-lm-server": "suites.targets.mlx_lm_server_target",
    "openai": "suites.targets.openai_target",
}
TARGET_NAMES = tuple(TARGET_MODULES)


def open_target(name: str, options: TargetOptions) -> Target:
    if name not in TARGET_MODULES:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGET_NAMES)}")
    return importlib.import_module(TARGET_MODULES[name]).open_target(options)
