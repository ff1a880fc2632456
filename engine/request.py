"""A request's state as it moves through the scheduler."""

import enum
from dataclasses import dataclass, field

from engine.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    seed: int  # the effective sampling seed (drawn when the caller gave none)
    stop_token_ids: frozenset[int]
    cache_salt: str | None = None
    token_ids: list[int] = field(default_factory=list)  # prompt, then outputs
    num_computed_tokens: int = 0
    # Tokens served from the prefix cache at the first admission (vLLM's meaning).
    num_cached_tokens: int | None = None
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    logits: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    def append_output(self, token_id: int) -> None:
        """Add a sampled token; a stop token or the ``max_tokens``-th token finishes the request.

        A stop token (the caller's ``stop_token_ids``, and the model's end-of-text unless
        ``ignore_eos``) is kept as the last output token, as in vLLM's token ids, with
        finish reason "stop", also when it is the ``max_tokens``-th; otherwise that one
        finishes the request with "length".
        """
        self.token_ids.append(token_id)
        if token_id in self.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output_token_ids) >= self.sampling.max_tokens:
            self.finish_reason = "length"
