"""``POST /v1/completions``: one client's prompts through the engine loop, answered whole or streamed.

Prompts are tokenized here, on the event loop, so the engine thread only ever sees token ids.
Every request is checked (the request model, then the engine's own ValueErrors) before any
runs; a batch runs all of its prompts or none. A client that goes away aborts its requests,
which frees their blocks at the next step boundary.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.outputs import RequestOutput
from engine.sampling import SamplingParams
from engine.serve import protocol
from engine.serve.loop import EngineLoop, EngineUnavailable, PromptRefused, StepFailed, Submission
from engine.serve.protocol import CompletionRequest
from engine.serve.text import IncrementalText, text_token_ids

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; never seen by that client


class CompletionError(Exception):
    """A request answered with an error status: the body is vLLM's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param

    def response(self) -> JSONResponse:
        return JSONResponse(protocol.error_body(self.status, str(self), self.param), status_code=self.status)


def _param_of(message: str, default: str) -> str:
    """The request field an engine message starts with ("max_tokens must be >= 1, ..."), else ``default``."""
    word = message.split(" ", 1)[0]
    return word if word in CompletionRequest.model_fields else default


def _engine_error(error: Exception) -> CompletionError:
    if isinstance(error, StepFailed):
        return CompletionError(500, str(error))
    return CompletionError(503, str(error))


@dataclass(frozen=True, slots=True)
class Prepared:
    """A checked request: its prompts as ids, one SamplingParams each, and the ids whose text is hidden."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    hidden_stops: frozenset[int]


class Completions:
    def __init__(self, engine: EngineLoop, tokenizer, model_name: str) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids or ())

    async def create(self, body: CompletionRequest, request: Request) -> Response:
        prepared = self.prepare(body)
        try:
            submission = await self.engine.add(prepared.prompts, prepared.params, body.cache_salt)
        except PromptRefused as error:
            where = f"prompt {error.index} of the batch: " if len(prepared.prompts) > 1 else ""
            raise CompletionError(400, where + str(error), _param_of(str(error), "prompt")) from error
        except EngineUnavailable as error:
            raise _engine_error(error) from error
        if body.stream:
            return StreamingResponse(self._events(submission, prepared, body), media_type="text/event-stream")
        return await self._whole(submission, prepared, body, request)

    def prepare(self, body: CompletionRequest) -> Prepared:
        if body.model is not None and body.model != self.model_name:
            raise CompletionError(404, f"The model `{body.model}` does not exist.", "model")
        unsupported = body.unsupported()
        if unsupported is not None:
            name, value = unsupported
            raise CompletionError(400, f"{name}={value!r} is not supported by this server", name)
        if body.stream_options is not None:
            if not body.stream:
                raise CompletionError(400, "stream_options can only be given with stream=true", "stream_options")
            if body.stream_options.continuous_usage_stats:
                raise CompletionError(400, "stream_options.continuous_usage_stats=True is not supported by this server",
                                      "stream_options")
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in body.prompts()]
        params = []
        for prompt in prompts:
            # None: as vLLM, whatever room max_model_len leaves (the engine refuses a prompt that fills it).
            max_tokens = body.max_tokens if body.max_tokens is not None else max(
                1, self.engine.config.max_model_len - len(prompt))
            try:
                params.append(SamplingParams(
                    max_tokens=max_tokens,
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p,
                    top_k=0 if body.top_k in (None, -1) else body.top_k,
                    seed=body.seed,
                    stop_token_ids=list(body.stop_token_ids or ()),
                    ignore_eos=body.ignore_eos,
                ))
            except ValueError as error:
                raise CompletionError(400, str(error), _param_of(str(error), "prompt")) from error
        stops = frozenset(body.stop_token_ids or ()) | (frozenset() if body.ignore_eos else self.eos_token_ids)
        return Prepared(prompts, params, stops)

    # -- a whole answer ----------------------------------------------------------------

    async def _whole(self, submission: Submission, prepared: Prepared, body: CompletionRequest,
                     request: Request) -> Response:
        collect = asyncio.ensure_future(_outputs(submission))
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():
                collect.cancel()
            submission.abort()  # nothing left to abort once every request finished
        if not collect.done() or collect.cancelled():
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        try:
            outputs = collect.result()
        except (StepFailed, EngineUnavailable) as error:
            raise _engine_error(error) from error
        choices = [
            protocol.choice(
                index,
                self.tokenizer.decode(text_token_ids(output, prepared.hidden_stops), skip_special_tokens=True),
                output.finish_reason,
                protocol.stop_reason(output, prepared.params[index].stop_token_ids),
                **self._ids(body, output.token_ids, output.prompt_token_ids),
            )
            for index, output in enumerate(outputs)
        ]
        return JSONResponse(protocol.completion_body(
            protocol.new_completion_id(), self.model_name, choices, _usage(outputs)))

    # -- a stream ----------------------------------------------------------------------

    async def _events(self, submission: Submission, prepared: Prepared, body: CompletionRequest) -> AsyncIterator[str]:
        completion_id = protocol.new_completion_id()
        index_of = {request_id: index for index, request_id in enumerate(submission.request_ids)}
        texts = [IncrementalText(self.tokenizer) for _ in submission.request_ids]
        started: set[int] = set()
        outputs: list[RequestOutput] = []
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        try:
            async for update in submission.updates():
                index = index_of[update.request_id]
                output = update.output
                if output is None:
                    text, finish, reason = texts[index].add([update.token_id]), None, None
                else:
                    shown = len(text_token_ids(output, prepared.hidden_stops)) == len(output.token_ids)
                    text = texts[index].add([update.token_id] if shown else []) + texts[index].flush()
                    finish = output.finish_reason
                    reason = protocol.stop_reason(output, prepared.params[index].stop_token_ids)
                    outputs.append(output)
                prompt_ids = None if index in started else prepared.prompts[index]
                started.add(index)
                chunk = protocol.completion_body(completion_id, self.model_name, [protocol.choice(
                    index, text, finish, reason, **self._ids(body, [update.token_id], prompt_ids))], None)
                if not include_usage:
                    del chunk["usage"]
                yield _event(chunk)
            if include_usage:
                yield _event(protocol.completion_body(completion_id, self.model_name, [], _usage(outputs)))
        except (StepFailed, EngineUnavailable) as error:
            failure = _engine_error(error)
            yield _event(protocol.error_body(failure.status, str(failure), failure.param))
        finally:
            submission.abort()  # the client left mid-stream (a cancel lands here), or nothing to do
        yield "data: [DONE]\n\n"

    @staticmethod
    def _ids(body: CompletionRequest, token_ids: list[int], prompt_token_ids: list[int] | None) -> dict:
        if not body.return_token_ids:
            return {}
        return {"token_ids": list(token_ids), "prompt_token_ids": prompt_token_ids}


async def _outputs(submission: Submission) -> list[RequestOutput]:
    finished = {}
    async for update in submission.updates():
        if update.output is not None:
            finished[update.request_id] = update.output
    return [finished[request_id] for request_id in submission.request_ids]


async def _until_disconnected(request: Request) -> None:
    """Returns once the client has closed its connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(outputs: list[RequestOutput]) -> dict:
    """Summed over a batch, as vLLM sums it."""
    return protocol.usage(
        sum(len(output.prompt_token_ids) for output in outputs),
        sum(len(output.token_ids) for output in outputs),
        sum(output.num_cached_tokens for output in outputs),
    )


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
