"""The wire format of ``/v1/completions``, shaped like vLLM's: the request model and the bodies.

A field the request model does not know is ignored, as vLLM ignores it; a field of the
OpenAI API that this server does not implement (``n``, ``logprobs``, ``stop`` strings, ...)
is refused with HTTP 400 when it asks for more than the default, never silently dropped.
"""

import time
import uuid
from http import HTTPStatus

from pydantic import BaseModel, ConfigDict, StrictInt

from engine.outputs import RequestOutput

TokenIds = list[StrictInt]
Prompt = str | TokenIds | list[str] | list[TokenIds]

# OpenAI fields this server does not implement, with the values that ask for nothing.
UNSUPPORTED = {
    "n": (1,),
    "best_of": (None, 1),
    "echo": (False,),
    "logprobs": (None,),
    "stop": (None, [], ""),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "prompt_logprobs": (None,),
}
ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    409: "ConflictError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: Prompt
    model: str | None = None
    max_tokens: StrictInt | None = 16
    temperature: float | None = None  # None: 1.0, as OpenAI and vLLM
    top_p: float | None = None
    top_k: StrictInt | None = None  # 0 or -1: off (vLLM takes both)
    seed: StrictInt | None = None
    stop_token_ids: TokenIds | None = None
    ignore_eos: bool = False
    cache_salt: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool | None = None
    user: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a single text or id list, or each of a batch."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) or not prompt:
            return [prompt]
        return list(prompt)

    def unsupported(self) -> tuple[str, object] | None:
        """(field, value) of the first field asking for what this server does not do."""
        extra = self.model_extra or {}
        for name, defaults in UNSUPPORTED.items():
            if name in extra and extra[name] not in defaults:
                return name, extra[name]
        return None


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """vLLM's error shape (its ErrorResponse)."""
    kind = ERROR_TYPES.get(status) or HTTPStatus(status).phrase
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def stop_reason(output: RequestOutput, user_stop_ids: list[int]) -> int | None:
    """vLLM's stop_reason: the id of the request's own stop token that ended it, else None."""
    if output.finish_reason == "stop" and output.token_ids and output.token_ids[-1] in user_stop_ids:
        return output.token_ids[-1]
    return None


def completion_body(completion_id: str, model: str, choices: list[dict], usage_body: dict) -> dict:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_body,
        "system_fingerprint": None,
    }


def choice(index: int, text: str, finish_reason: str | None, reason: int | None,
           token_ids: list[int] | None = None, prompt_token_ids: list[int] | None = None) -> dict:
    body = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": reason}
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = prompt_token_ids
    if token_ids is not None:
        body["token_ids"] = token_ids
    return body
