"""The FastAPI app of ``engine serve``: vLLM's routes over one engine loop.

``POST /v1/completions``, ``GET /metrics``, ``POST /reset_prefix_cache``, ``GET /health``,
``GET /v1/models``, ``GET /version``. Every error answers in vLLM's shape,
``{"error": {"message", "type", "param", "code"}}``; a request the server cannot read is
HTTP 400 naming the field and the value it got.
"""

import time
from importlib.metadata import version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from engine.serve import protocol
from engine.serve.completions import CompletionError, Completions
from engine.serve.loop import EngineLoop, EngineUnavailable
from engine.serve.metrics import metrics_registry, render
from engine.serve.protocol import CompletionRequest

PACKAGE = "mlx-prefix-conformance"
MAX_VALUE_CHARS = 200
PROMPT_SHAPES = "a prompt is a text, a list of token ids, or a list of either"


def build_app(engine: EngineLoop, served_model_name: str) -> FastAPI:
    app = FastAPI(title="engine serve", version=version(PACKAGE))
    completions = Completions(engine, engine.tokenizer, served_model_name)
    registry = metrics_registry(engine, served_model_name)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(error)
        return JSONResponse(protocol.error_body(400, message, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(protocol.error_body(error.status_code, str(error.detail)), status_code=error.status_code)

    @app.exception_handler(CompletionError)
    async def completion_error(request: Request, error: CompletionError) -> JSONResponse:
        return error.response()

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await completions.create(body, request)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        """200 once the cache is empty; 409 while requests hold blocks (vLLM's answer since it checks)."""
        try:
            done = await engine.reset_prefix_cache()
        except EngineUnavailable as error:
            raise CompletionError(503, str(error)) from error
        if not done:
            raise CompletionError(409, "Prefix cache reset failed: requests in flight hold blocks; retry when idle.")
        return Response(status_code=200)

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            raise CompletionError(503, "the engine loop is not running")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "engine",
            "root": engine.model_name,
            "parent": None,
            "max_model_len": engine.config.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/version")
    async def server_version() -> dict:
        return {"version": version(PACKAGE)}

    return app


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) for a body the request model refused: the field, what it got, and why."""
    errors = error.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    location = [str(part) for part in first["loc"] if part != "body"]
    param = location[0] if location else None
    reasons = "; ".join(dict.fromkeys(
        f"{'.'.join(str(part) for part in e['loc'] if part != 'body')}: {e['msg']}" for e in errors[:4]
    ))
    if first["type"] == "missing":
        return f"{param} is required ({reasons})", param
    if param == "prompt":
        reasons = PROMPT_SHAPES
    body = error.body if isinstance(error.body, dict) else {}
    value = repr(body[param] if param in body else first.get("input"))
    if len(value) > MAX_VALUE_CHARS:
        value = value[:MAX_VALUE_CHARS] + "..."
    return f"invalid {param}={value}: {reasons}", param
