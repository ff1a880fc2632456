"""A minimal MLX paged-KV inference engine with automatic prefix caching.

The public names load lazily, so ``import engine.kv`` (the pure-Python block layer)
never imports MLX.
"""

import importlib

_PUBLIC = {
    "LLM": "engine.llm",
    "EngineConfig": "engine.llm",
    "RequestOutput": "engine.outputs",
    "TokenUpdate": "engine.outputs",
    "SamplingParams": "engine.sampling",
    "PrefixCacheStats": "engine.kv",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
