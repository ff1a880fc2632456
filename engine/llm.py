"""The LLM facade, shaped like vLLM's: generate, SamplingParams, RequestOutput, counters."""

import copy
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from engine.kv import HASH_FUNCTIONS, KVCacheManager, PrefixCacheStats
from engine.models import fixed_config, resolve_model, weight_checksum
from engine.outputs import RequestOutput, TokenUpdate, prometheus_text
from engine.request import Request
from engine.runner.device import select_device
from engine.runner.model_runner import ChunkInput, ModelRunner, StepInput, kv_geometry
from engine.runner.paged_attention import KVPool
from engine.runner.sampler import LaunchedSampling, collect, launch_sampling
from engine.sampling import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Every engine setting, with its default: the one place defaults are written."""

    block_size: int = 16
    num_kv_blocks: int = 2048
    enable_prefix_caching: bool = True
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 512
    max_model_len: int = 4096
    hash_algorithm: str = "sha256"

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        for name in ("num_kv_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hash_algorithm not in HASH_FUNCTIONS:
            raise ValueError(f"unknown hash_algorithm {self.hash_algorithm!r}; choose from {sorted(HASH_FUNCTIONS)}")


@dataclass(slots=True)
class LaunchedStep:
    """A step whose forward and sampling are launched on the device, its tokens not yet read."""

    scheduled: list[ScheduledChunk]
    sampled: list[Request]  # the requests it samples a token for, in sampling row order
    sampling: LaunchedSampling


DEFAULT_MODEL = "tiny-qwen3"
_DEFAULTS = EngineConfig()


class LLM:
    """A paged-KV engine with automatic prefix caching over one mlx-lm model.

    The KV pool is allocated once, sized in slots (``num_kv_blocks * block_size``).
    ``reconfigure`` changes block size, pool limit, caching and batching on the same pool
    (and switches between models of the same KV geometry), so one process never needs a
    second ``LLM``: on Metal, memory held by a released one is not returned.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        block_size: int = _DEFAULTS.block_size,
        num_kv_blocks: int = _DEFAULTS.num_kv_blocks,
        enable_prefix_caching: bool = _DEFAULTS.enable_prefix_caching,
        max_num_seqs: int = _DEFAULTS.max_num_seqs,
        max_num_batched_tokens: int = _DEFAULTS.max_num_batched_tokens,
        max_model_len: int = _DEFAULTS.max_model_len,
        hash_algorithm: str = _DEFAULTS.hash_algorithm,
        device: str | None = None,
    ) -> None:
        self.config = EngineConfig(
            block_size, num_kv_blocks, enable_prefix_caching, max_num_seqs,
            max_num_batched_tokens, max_model_len, hash_algorithm,
        )
        self.device = select_device(device)
        self._request_counter = itertools.count()
        self._live: dict[str, Request] = {}  # queued or running, by id
        self._pool: KVPool | None = None
        self._ahead: LaunchedStep | None = None  # the next step, launched before this one's tokens were read
        self.num_steps_ahead = 0  # steps launched ahead so far (the suites check that the path is taken)
        self._load_model(model)
        self._allocate_pool(num_kv_blocks * block_size, block_size)
        self._build()

    # -- public API ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._model.args.vocab_size

    @property
    def num_slots(self) -> int:
        return self._pool.num_slots

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    @property
    def kv_manager(self) -> KVCacheManager:
        return self._kv

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]] | str,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        cache_salt: str | Sequence[str | None] | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        Every input is checked before any work starts, so a bad one raises ValueError
        and leaves the engine exactly as it was. ``on_token(index, token_id)``, if given,
        is called as each token is sampled, with the prompt's index in ``prompts``
        (tools/bench takes its per-token timestamps there).

        Any exception raised during the run (a forward, ``on_token``, KeyboardInterrupt)
        aborts every request of the call and is raised again: no request stays queued and
        every block is free (``Scheduler.abort`` says which cached prefixes survive). The
        counters keep the lookups of the requests admitted before the failure, as for any
        admission; requests never admitted are not counted.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        params = self._per_prompt(sampling_params or SamplingParams(), len(prompts), "sampling_params")
        salts = self._per_prompt(cache_salt, len(prompts), "cache_salt")
        requests = [self._make_request(p, sp, s) for p, sp, s in zip(prompts, params, salts, strict=True)]
        index_of = {request.request_id: index for index, request in enumerate(requests)}
        try:
            for request in requests:
                self._add(request)
            while self._scheduler.has_unfinished():
                for update in self.step():
                    if on_token is not None:
                        on_token(index_of[update.request_id], update.token_id)
        except BaseException:
            self._abort(requests)
            raise
        return [self._to_output(request) for request in requests]

    # -- one step at a time (engine serve: requests of many clients join the running batch) --

    def add_request(
        self, prompt: str | Sequence[int], sampling_params: SamplingParams | None = None, cache_salt: str | None = None
    ) -> str:
        """Queue one request; it joins the running batch at the next ``step``. Returns its id.

        Checked as ``generate`` checks its inputs: a bad one raises ValueError and queues nothing.
        """
        request = self._make_request(prompt, sampling_params or SamplingParams(), cache_salt)
        self._add(request)
        return request.request_id

    def step(self) -> list[TokenUpdate]:
        """Run one scheduled step of every queued request; one update per sampled token.

        A finished request's update carries its whole output, and the engine forgets it. If
        the step raises, every unfinished request is aborted (their blocks freed) and the
        exception propagates: a step cut short leaves nothing half-done behind.

        Where the next step cannot depend on this step's tokens (``Scheduler.schedule_ahead``),
        it is launched before this one's tokens are read, so the device never waits for the
        host; a request added after this call then joins the step after that one.
        """
        try:
            sampled = self._step()
        except BaseException:
            self._abort(list(self._live.values()), cut_short=True)
            raise
        updates = []
        for request in sampled:
            output = None
            if request.finish_reason is not None:
                output = self._to_output(self._live.pop(request.request_id))
            updates.append(TokenUpdate(request.request_id, request.output_token_ids[-1], output))
        return updates

    def abort(self, request_id: str) -> bool:
        """Drop a queued or running request and free its blocks; False if it is not live."""
        request = self._live.get(request_id)
        if request is None:
            return False
        self._abort([request])
        return True

    def has_unfinished_requests(self) -> bool:
        return self._scheduler.has_unfinished()

    def _add(self, request: Request) -> None:
        self._live[request.request_id] = request
        self._scheduler.add(request)

    def _abort(self, requests: list[Request], cut_short: bool = False) -> None:
        for request in requests:
            self._live.pop(request.request_id, None)
        self._scheduler.abort(requests, cut_short)
        if self._ahead is not None and not any(r.request_id in self._live for r in self._ahead.sampled):
            self._ahead = None  # its rows, still computing, are never read

    def prefix_cache_stats(self) -> PrefixCacheStats:
        return copy.copy(self._kv.stats)

    def prefix_cache_metrics(self) -> str:
        """The counters in Prometheus text format."""
        return prometheus_text(self._kv.stats, self.model_name)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block. False (nothing changed) while any block is in use."""
        return self._kv.reset_prefix_cache()

    def reconfigure(self, model: str | None = None, **changes) -> None:
        """Change engine settings (EngineConfig fields) on the same KV pool.

        The prefix cache and counters start afresh. A new ``block_size`` without a
        ``num_kv_blocks`` re-views all of the pool's slots; ``num_kv_blocks * block_size``
        may not exceed them. A model with another KV geometry gets a new pool.
        """
        if self._scheduler.has_unfinished():
            raise RuntimeError("cannot reconfigure while requests are running")
        new_config = replace(self.config, **changes)  # validates
        if "block_size" in changes and "num_kv_blocks" not in changes:
            new_config = replace(new_config, num_kv_blocks=self._pool.num_slots // new_config.block_size)
        num_slots = new_config.num_kv_blocks * new_config.block_size
        if model is not None and model != self.model_name:
            old_geometry = kv_geometry(self._model)
            self._load_model(model)
            if kv_geometry(self._model) != old_geometry:
                self._allocate_pool(max(num_slots, self._pool.num_slots), new_config.block_size)
        if num_slots > self._pool.num_slots:
            raise ValueError(
                f"num_kv_blocks={new_config.num_kv_blocks} x block_size={new_config.block_size} exceeds "
                f"the pool's {self._pool.num_slots} slots"
            )
        self.config = new_config
        self._pool.reshape(new_config.block_size)
        self._build()

    def close(self) -> None:
        """Free the KV pool and the model."""
        # A launched step's kernels hold its buffers (the pool's among them) until the device
        # has run them; wait, so that clear_cache below can give them back.
        mx.synchronize()
        if self._pool is not None:
            self._pool.release()
        self._pool = None
        self._model = None
        self._runner = None
        self._ahead = None
        mx.clear_cache()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------

    def _load_model(self, model: str) -> None:
        from mlx_lm.utils import load

        path = resolve_model(model)
        config = fixed_config(path)
        overrides = {"rope_theta": config["rope_theta"]} if "rope_theta" in config else {}
        self._model, self.tokenizer = load(str(path), model_config=overrides)
        if config.get("torch_dtype") in ("bfloat16", "float16"):
            # mlx-lm keeps the stored dtype; a model declared in half precision runs in it.
            self._model.set_dtype(getattr(mx, config["torch_dtype"]))
        self.model_name = model
        self.model_path: Path = path
        self.weight_checksum = weight_checksum(path)
        self._eos_token_ids = frozenset(self.tokenizer.eos_token_ids or ())

    def _allocate_pool(self, num_slots: int, block_size: int) -> None:
        if self._pool is not None:
            self._pool.release()
            mx.clear_cache()
        g = kv_geometry(self._model)
        self._pool = KVPool(g.num_layers, num_slots, block_size, g.kv_heads, g.head_dim, g.dtype)

    def _build(self) -> None:
        c = self.config
        self._kv = KVCacheManager(c.num_kv_blocks, c.block_size, c.enable_prefix_caching, c.hash_algorithm)
        self._scheduler = Scheduler(self._kv, c.max_num_seqs, c.max_num_batched_tokens)
        self._runner = ModelRunner(self._model, self._pool)

    @staticmethod
    def _per_prompt(value, count: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
            return list(value)
        return [value] * count

    def _make_request(self, prompt, params: SamplingParams, cache_salt: str | None) -> Request:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {params!r}")
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not token_ids:
            raise ValueError(f"empty prompt: {prompt!r}")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        total = len(token_ids) + params.max_tokens
        if total > self.config.max_model_len:
            raise ValueError(
                f"prompt of {len(token_ids)} tokens + max_tokens={params.max_tokens} exceeds "
                f"max_model_len={self.config.max_model_len}"
            )
        # The last sampled token is never written to the KV pool.
        if not self._kv.can_fit(total - 1):
            raise ValueError(
                f"a request of {total - 1} tokens needs {-(-(total - 1) // self.config.block_size)} blocks; "
                f"the pool has num_kv_blocks={self.config.num_kv_blocks}"
            )
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string or None, got {cache_salt!r}")
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= self._eos_token_ids
        return Request(
            request_id=str(next(self._request_counter)),
            prompt_token_ids=token_ids,
            sampling=params,
            seed=params.seed if params.seed is not None else random.getrandbits(63),
            stop_token_ids=frozenset(stops),
            cache_salt=cache_salt,
        )

    def _step(self) -> list[Request]:
        """Run one scheduled step; return the requests that got a new token, in schedule order."""
        launched, self._ahead = self._ahead, None
        if launched is None:
            scheduled = self._scheduler.schedule()
            if not scheduled:
                raise RuntimeError("the scheduler made no progress (pool too small for the running requests)")
            launched = self._launch(scheduled)
        if launched.sampling.device_tokens is not None:
            ahead = self._scheduler.schedule_ahead(launched.scheduled)
            if ahead is not None:
                self._ahead = self._launch(ahead, fed_back=launched)
                self.num_steps_ahead += 1
        return self._finish(launched)

    def _launch(self, scheduled: list[ScheduledChunk], fed_back: LaunchedStep | None = None) -> LaunchedStep:
        """Launch the step's forward and sampling; with ``fed_back``, every chunk is one decode
        token that ``fed_back`` samples, taken on the device."""
        row_of = {} if fed_back is None else {r.request_id: i for i, r in enumerate(fed_back.sampled)}
        inputs = [
            ChunkInput(
                chunk.request.request_id,
                None if fed_back else chunk.token_ids,
                chunk.start_pos,
                self._kv.block_table(chunk.request.request_id),
                row_of[chunk.request.request_id] if fed_back else None,
            )
            for chunk in scheduled
        ]
        step = StepInput(inputs, self._scheduler.take_finished_ids(), fed_back.sampling.device_tokens if fed_back else None)
        logits = self._runner.execute(step)
        # Every chunk of a fed-back step samples: its tokens make the requests' sequences.
        rows = [index for index, chunk in enumerate(scheduled) if fed_back or chunk.completes_sequence]
        sampled = [scheduled[index].request for index in rows]
        # A request's output step: its outputs so far, with the one fed back not yet appended.
        offset = 1 if fed_back else 0
        sampling = launch_sampling(
            logits, rows, [r.sampling for r in sampled], [r.seed for r in sampled],
            [len(r.output_token_ids) + offset for r in sampled],
        )
        return LaunchedStep(scheduled, sampled, sampling)

    def _finish(self, launched: LaunchedStep) -> list[Request]:
        """Read the step's tokens, advance its requests (those still live), and confirm the
        step launched ahead of it."""
        tokens, host_logits = collect(launched.sampling)
        sampled = []
        for position, (request, token) in enumerate(zip(launched.sampled, tokens, strict=True)):
            if request.request_id not in self._live:
                continue  # aborted while its step ran
            if request.sampling.return_logits:
                request.logits.append(host_logits[position])
            request.append_output(token)
            sampled.append(request)
        self._scheduler.finish_step([c for c in launched.scheduled if c.request.request_id in self._live])
        if self._ahead is not None:
            going_on = self._scheduler.finish_ahead(self._ahead.scheduled)
            if going_on:
                self._ahead.scheduled = going_on
            else:
                self._ahead = None  # every request of it finished: its rows are never read
        return sampled

    def _to_output(self, request: Request) -> RequestOutput:
        logits = np.stack(request.logits) if request.sampling.return_logits else None
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            token_ids=request.output_token_ids,
            num_cached_tokens=request.num_cached_tokens or 0,
            finish_reason=request.finish_reason,
            num_preemptions=request.num_preemptions,
            logits=logits,
        )
