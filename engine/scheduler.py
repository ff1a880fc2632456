"""Continuous batching with a per-step token budget, chunked prefill and preemption.

Pure Python: it decides which tokens each request computes this step and where their KV
lives (through the KV-cache manager); the model runner computes them.
"""

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from engine.kv import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    start_pos: int
    num_tokens: int

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids[self.start_pos : self.start_pos + self.num_tokens]

    @property
    def completes_sequence(self) -> bool:
        """True when this chunk reaches the request's last known token: sample after it."""
        return self.start_pos + self.num_tokens == self.request.num_tokens


class Scheduler:
    """Running requests first (oldest first), then admissions while budget and seats last.

    When the pool runs out, the newest running request is preempted by recompute: its
    blocks are freed and it waits at the head of the queue with its outputs kept; it is
    prefilled again later (from the cache where its blocks survived).
    """

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Requests that finished, were preempted or aborted since the runner last heard of it.
        self.finished_ids: set[str] = set()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledChunk] = []
        preempted_this_step = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self._allocate(request, num_new):
                victim = self.running.pop()  # the newest: not yet scheduled in this step
                self._preempt(victim)
                preempted_this_step = True
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledChunk(request, request.num_computed_tokens, num_new))
                budget -= num_new
                index += 1
        # Admitting while preempting would only thrash: wait for running requests to finish.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted_this_step:
            request = self.waiting[0]
            num_hit_tokens = self.kv.admit(request.request_id, request.token_ids, budget, request.cache_salt)
            if num_hit_tokens is None:
                break
            self.waiting.popleft()
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            scheduled.append(ScheduledChunk(request, num_hit_tokens, num_new))
            budget -= num_new
        return scheduled

    def schedule_ahead(self, scheduled: list[ScheduledChunk]) -> list[ScheduledChunk] | None:
        """The next step, scheduled while ``scheduled`` (launched, its tokens not yet on the
        host) runs; None wherever it could differ from what ``schedule`` decides after
        ``finish_step``. Then it is one decode chunk per running request that continues:
        - nothing waits (an admission's hits could depend on this step's tokens), every running
          request samples in this step, and all the next step's decodes fit the budget;
        - a request whose count of output tokens reaches ``max_tokens`` now is left out (it
          finishes); one that may sample a stop token is scheduled, and if it does, it is
          freed as ``schedule`` would never have scheduled it (``finish_ahead``);
        - its new blocks are taken only where that evicts no cached block: a block given back
          unused then leaves the cache exactly as it was. Nothing else is changed, so a block
          it completes is cached once its last token is known (``finish_ahead``).
        """
        sampled = {chunk.request.request_id for chunk in scheduled if chunk.completes_sequence}
        if self.waiting or any(request.request_id not in sampled for request in self.running):
            return None
        continuing = [r for r in self.running if len(r.output_token_ids) + 1 < r.sampling.max_tokens]
        if not continuing or len(continuing) > self.max_num_batched_tokens:
            return None
        # The token sampled now sits at position ``num_tokens``: the next step computes it.
        needs = [self.kv.num_new_blocks(r.request_id, r.num_tokens + 1) for r in continuing]
        new_blocks = sum(needs)
        if not self.kv.can_allocate_without_eviction(new_blocks):
            return None
        for request, need in zip(continuing, needs, strict=True):
            if need:  # its token starts a block
                allocated = self.kv.allocate_slots(
                    request.request_id, request.token_ids, 1, request.num_tokens, cache_full_blocks=False
                )
                assert allocated is not None
        return [ScheduledChunk(request, request.num_tokens, 1) for request in continuing]

    def finish_ahead(self, ahead: list[ScheduledChunk]) -> list[ScheduledChunk]:
        """After ``finish_step`` of the step before it: the chunks of ``ahead`` whose requests go
        on, their blocks now cached (their last token is known); those of finished requests
        (a stop token, or aborted: their blocks are already free) are dropped, their rows'
        results unused."""
        going_on = [chunk for chunk in ahead if chunk.request.status is RequestStatus.RUNNING]
        for chunk in going_on:
            request, computed = chunk.request, chunk.start_pos + chunk.num_tokens
            if computed % self.kv.block_size == 0:  # it completes a block (the earlier ones are cached)
                self.kv.cache_full_blocks(request.request_id, request.token_ids[:computed], request.cache_salt)
        return going_on

    def finish_step(self, scheduled: list[ScheduledChunk]) -> list[Request]:
        """Advance each scheduled request; free and return the ones that finished."""
        finished = []
        for chunk in scheduled:
            request = chunk.request
            request.num_computed_tokens = chunk.start_pos + chunk.num_tokens
            if request.finish_reason is not None:
                request.status = RequestStatus.FINISHED
                self.running.remove(request)
                self.kv.free(request.request_id)
                self.finished_ids.add(request.request_id)
                finished.append(request)
        return finished

    def abort(self, requests: Iterable[Request], cut_short: bool = False) -> None:
        """Drop ``requests`` wherever they are and free their blocks.

        Freed by id, not by queue: a failure inside ``schedule`` may leave a request
        holding blocks that is not (yet) in ``running``. A step ``cut_short`` (by a failure
        before it was launched and finished) may have cached blocks whose K/V it never wrote
        (the manager caches a block at the step that schedules its last token); the block
        layer cannot forget single blocks, so the whole prefix cache is cleared then, and no
        later request can hit a block that was never written. A failure between steps keeps
        the cache: every step then launched writes its blocks.
        """
        requests = list(requests)  # walked twice below
        aborted = {request.request_id for request in requests}
        for request_id in aborted:
            self.kv.free(request_id)
        self.finished_ids |= aborted
        self.waiting = deque(request for request in self.waiting if request.request_id not in aborted)
        self.running = [request for request in self.running if request.request_id not in aborted]
        for request in requests:
            request.status = RequestStatus.FINISHED
        if cut_short:
            cleared = self.kv.reset_prefix_cache()
            assert cleared, f"blocks still in use after the abort: {self.kv.pool.num_used_blocks}"

    def _allocate(self, request: Request, num_new: int) -> bool:
        blocks = self.kv.allocate_slots(
            request.request_id,
            request.token_ids,
            num_new,
            request.num_computed_tokens,
            cache_salt=request.cache_salt,
        )
        return blocks is not None

    def take_finished_ids(self) -> set[str]:
        """The ids finished, preempted or aborted since the last call (for the runner's step)."""
        ids, self.finished_ids = self.finished_ids, set()
        return ids

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        self.finished_ids.add(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1
