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
        # True from schedule() to finish_step(): the step's K/V may be only partly written.
        self.step_in_flight = False
        # Requests that finished, were preempted or aborted since the runner last heard of it.
        self.finished_ids: set[str] = set()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        self.step_in_flight = True
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
        self.step_in_flight = False
        return finished

    def abort(self, requests: Iterable[Request]) -> None:
        """Drop ``requests`` wherever they are and free their blocks (their generate call failed).

        Freed by id, not by queue: a failure inside ``schedule`` may leave a request
        holding blocks that is not (yet) in ``running``. A step cut short, between ``schedule`` and
        ``finish_step``, may have cached blocks whose K/V it never wrote (the manager caches
        a block at the step that schedules its last token); the block layer cannot forget
        single blocks, so the whole prefix cache is cleared then, and no later request can
        hit a block that was never written. A failure between steps keeps the cache.
        """
        aborted = {request.request_id for request in requests}
        for request_id in aborted:
            self.kv.free(request_id)
        self.finished_ids |= aborted
        self.waiting = deque(request for request in self.waiting if request.request_id not in aborted)
        self.running = [request for request in self.running if request.request_id not in aborted]
        if self.step_in_flight:
            self.step_in_flight = False
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
