"""Running the app: uvicorn in the foreground (``engine serve``) or on a thread of this process.

At shutdown (SIGINT, SIGTERM, or ``stop()``) the engine loop stops first: every request in
flight is answered with an error (HTTP 503, or an error event on a stream) before uvicorn
waits for the connections to close, so no client is left waiting on a server that is gone.
"""

import dataclasses
import threading
import time
from typing import Self

import uvicorn

from engine.llm import LLM
from engine.serve.app import build_app
from engine.serve.config import ServeConfig
from engine.serve.loop import EngineLoop

SHUTDOWN_REASON = "the server is shutting down"


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: EngineLoop) -> None:
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets=None) -> None:
        self.engine.stop(SHUTDOWN_REASON)  # the requests in flight get their error now
        await super().shutdown(sockets=sockets)


class Server:
    """One engine loop over ``llm`` and its HTTP server; ``port=0`` binds a free port.

    The caller keeps the ``LLM`` (and closes it); while the server runs, only its engine
    thread touches it.
    """

    def __init__(self, llm: LLM, config: ServeConfig, access_log: bool = True) -> None:
        self.config = config
        self.engine = EngineLoop(llm)
        app = build_app(self.engine, config.model_name)
        uvicorn_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                        access_log=access_log)
        self._uvicorn = _Uvicorn(uvicorn_config, self.engine)
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def port(self) -> int:
        """The bound port (the chosen one where ``port=0``), once started."""
        return self._uvicorn.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def run(self) -> None:
        """Serve until SIGINT or SIGTERM (from the main thread) or ``stop()``."""
        self.engine.start()
        try:
            self._uvicorn.run()
        finally:
            self.engine.stop(SHUTDOWN_REASON)
            self.engine.join()

    def start(self, timeout: float = 60.0) -> Self:
        """Serve on a thread of this process; returns once the port is bound."""
        self._thread = threading.Thread(target=self._run_in_thread, name="engine-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {self._failure!r}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down as a signal would, and wait for the server and the engine thread to end."""
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the server did not stop within {timeout} s")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run_in_thread(self) -> None:
        try:
            self.run()
        except SystemExit as error:  # uvicorn exits when it cannot bind the port
            self._failure = error


def serve(config: ServeConfig) -> None:
    """``engine serve``: load the model, serve until interrupted, free the model."""
    llm = LLM(config.model, device=config.device, **dataclasses.asdict(config.engine))
    try:
        Server(llm, config).run()
    finally:
        llm.close()

