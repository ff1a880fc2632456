"""``engine serve``: the engine behind an OpenAI-compatible HTTP API, shaped like vLLM's server.

One file per concept: ``config`` (the flags, derived from ``EngineConfig``), ``loop`` (the
thread that owns the ``LLM``; clients' requests join its running batch between steps),
``protocol`` (the wire format), ``completions`` (``POST /v1/completions``, whole or streamed),
``text`` (detokenizing), ``metrics`` (``GET /metrics``), ``app`` (the routes) and ``server``
(uvicorn, in the foreground or on a thread).
"""

from engine.serve.config import ServeConfig
from engine.serve.server import Server, serve

__all__ = ["ServeConfig", "Server", "serve"]
