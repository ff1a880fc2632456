"""The engine loop: one thread owns the ``LLM``; the requests of every client join its running batch.

Everything that touches the ``LLM`` runs on this thread, between two ``step`` calls: adding
requests, aborting them, resetting the prefix cache, reading its state. The server's event
loop submits those as commands and awaits their futures; each request's tokens travel back
to its client's asyncio queue through ``call_soon_threadsafe``. A request added while others
run is admitted at the next step (continuous batching): no request waits for another to
finish. After each step the thread publishes an ``EngineSnapshot`` (counters, queue lengths,
blocks in use) that ``/metrics`` reads without touching the engine.
"""

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from engine.kv import PrefixCacheStats
from engine.llm import LLM
from engine.outputs import TokenUpdate
from engine.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The engine takes no more requests: the server is shutting down, or its loop died."""


class StepFailed(RuntimeError):
    """A ``step`` raised: every request in flight was aborted (the engine serves on)."""


class PromptRefused(ValueError):
    """The engine refused prompt ``index`` of a submission (its ValueError, word for word)."""

    def __init__(self, index: int, error: ValueError) -> None:
        super().__init__(str(error))
        self.index = index


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """The engine's state after a step, as the engine thread last published it."""

    stats: PrefixCacheStats
    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_blocks: int
    num_steps: int
    max_step_batch: int  # the most requests that sampled a token in one step, since start


class Submission:
    """The requests of one client call (one prompt, or a batch), and their updates as they come.

    The engine thread puts each update (or the failure that ends them all) on the queue;
    the client iterates on its event loop until every request finished.
    """

    def __init__(self, engine: "EngineLoop", request_ids: list[str], prompts: list[list[int]],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.request_ids = request_ids
        self.prompts = prompts
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[TokenUpdate | BaseException] = asyncio.Queue()
        self._unfinished = set(request_ids)

    def deliver(self, item: TokenUpdate | BaseException) -> None:
        """Called on the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def updates(self) -> AsyncIterator[TokenUpdate]:
        """Every request's updates in the order they were sampled; raises the failure that ends them."""
        while self._unfinished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._unfinished.clear()
                raise item
            if item.finished:
                self._unfinished.discard(item.request_id)
            yield item

    def abort(self) -> None:
        """Abort the requests not finished yet (the client went away); nothing if all finished."""
        if self._unfinished:
            self._engine.abort(sorted(self._unfinished))
            self._unfinished.clear()


_STOP = object()


def _abort_when_added(future: Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().abort()


class EngineLoop:
    """The thread that owns an ``LLM``: start(), then submit from any event loop; stop(reason)."""

    def __init__(self, llm: LLM) -> None:
        self._llm = llm
        # Read once, before the thread starts: neither changes while the engine serves.
        self.config = llm.config
        self.model_name = llm.model_name
        # The server tokenizes and detokenizes on its event loop (the engine gets token ids):
        # one thread uses the tokenizer, as one uses the LLM.
        self.tokenizer = llm.tokenizer
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submissions against closing
        self._closed_reason: str | None = None
        self._submissions: dict[str, Submission] = {}  # engine thread only
        self._num_steps = 0
        self._max_step_batch = 0
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.snapshot = self._take_snapshot()

    # -- any thread ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._closed_reason is None

    def stop(self, reason: str) -> None:
        """Refuse new requests; at the next step boundary every request in flight fails with
        EngineUnavailable(reason), is aborted, and the thread ends."""
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = reason
                self._inbox.put(_STOP)

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def abort(self, request_ids: Sequence[str]) -> None:
        """Abort requests wherever they are (fire and forget: a finished one is ignored)."""
        self._submit(lambda: self._abort(request_ids))

    async def add(self, prompts: list[list[int]], params: list[SamplingParams],
                  cache_salt: str | None) -> Submission:
        """Queue the prompts as one submission: all of them, or none (PromptRefused)."""
        loop = asyncio.get_running_loop()
        future = self._submit(lambda: self._add(prompts, params, cache_salt, loop))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The client left while the command waited: abort the requests once they exist.
            future.add_done_callback(_abort_when_added)
            raise

    async def reset_prefix_cache(self) -> bool:
        return await asyncio.wrap_future(self._submit(self._reset_prefix_cache))

    def _submit(self, command: Callable[[], object]) -> Future:
        """Queue ``command`` for the engine thread; its future fails at once once the loop stopped."""
        future: Future = Future()
        with self._lock:
            if self._closed_reason is not None:
                future.set_exception(EngineUnavailable(self._closed_reason))
            else:
                self._inbox.put((command, future))
        return future

    # -- the engine thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._serve_once():
                pass
        except BaseException as error:  # a bug of this loop: say so to every client
            log.exception("the engine loop died")
            self.stop(f"the engine loop died: {error!r}")
            self._close()
            raise
        self._close()

    def _serve_once(self) -> bool:
        """Run the commands waiting (wait for one while idle), then one step. False: stop."""
        busy = self._llm.has_unfinished_requests()
        commands = [] if busy else [self._inbox.get()]
        while not self._inbox.empty():
            commands.append(self._inbox.get_nowait())
        for command in commands:
            if command is _STOP:
                return False
            run, future = command
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(run())
                except Exception as error:  # noqa: BLE001 (the caller's to handle, never the loop's)
                    future.set_exception(error)
        if not self._llm.has_unfinished_requests():
            self.snapshot = self._take_snapshot()
            return True
        try:
            updates = self._llm.step()
        except Exception as error:
            # LLM.step has aborted every request and freed their blocks; tell their clients.
            log.exception("engine step failed; every request in flight is aborted")
            self._fail_all(StepFailed(f"the engine step failed: {error!r}; every request in flight was aborted"))
            self.snapshot = self._take_snapshot()
            return True
        self._num_steps += 1
        self._max_step_batch = max(self._max_step_batch, len(updates))
        self.snapshot = self._take_snapshot()  # before any client hears of this step
        for update in updates:
            submission = self._submissions.get(update.request_id)
            if submission is not None:
                submission.deliver(update)
                if update.finished:
                    del self._submissions[update.request_id]
        return True

    def _close(self) -> None:
        """Fail everything still queued or running with the reason the loop stopped."""
        with self._lock:
            reason = self._closed_reason or "the engine loop stopped"
            self._closed_reason = reason
        while not self._inbox.empty():
            command = self._inbox.get_nowait()
            if command is not _STOP:
                command[1].set_exception(EngineUnavailable(reason))
        request_ids = list(self._submissions)
        self._fail_all(EngineUnavailable(reason))
        for request_id in request_ids:  # their blocks freed
            self._llm.abort(request_id)
        self.snapshot = self._take_snapshot()

    def _add(self, prompts: list[list[int]], params: list[SamplingParams], cache_salt: str | None,
             loop: asyncio.AbstractEventLoop) -> Submission:
        request_ids: list[str] = []
        for index, (prompt, sampling) in enumerate(zip(prompts, params, strict=True)):
            try:
                request_ids.append(self._llm.add_request(prompt, sampling, cache_salt))
            except ValueError as error:
                self._abort(request_ids)  # none of the batch runs
                raise PromptRefused(index, error) from error
        submission = Submission(self, request_ids, prompts, loop)
        for request_id in request_ids:
            self._submissions[request_id] = submission
        return submission

    def _abort(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self._llm.abort(request_id)
            self._submissions.pop(request_id, None)

    def _reset_prefix_cache(self) -> bool:
        done = self._llm.reset_prefix_cache()
        self.snapshot = self._take_snapshot()
        return done

    def _fail_all(self, error: BaseException) -> None:
        for submission in {id(s): s for s in self._submissions.values()}.values():  # each once
            submission.deliver(error)
        self._submissions.clear()

    def _take_snapshot(self) -> EngineSnapshot:
        scheduler, pool = self._llm.scheduler, self._llm.kv_manager.pool
        return EngineSnapshot(
            stats=self._llm.prefix_cache_stats(),
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_used_blocks=pool.num_used_blocks,
            num_blocks=pool.num_blocks,
            num_steps=self._num_steps,
            max_step_batch=self._max_step_batch,
        )
