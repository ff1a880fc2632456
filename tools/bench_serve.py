"""The servers tools/bench --serve starts itself: ``engine serve`` and ``mlx_lm.server``.

Each runs in a subprocess on a free local port, on the bench's model folder and with the
bench's settings, so that the side-by-side table compares like with like:

* ``engine``: ``python -m engine.serve --model FOLDER`` with every engine setting of the
  offline sides as a dashed flag (``--block-size``, ``--num-kv-blocks``, ``--max-num-seqs``,
  ``--max-num-batched-tokens``, ``--max-model-len``); prefix caching on, its default;
* ``mlx-lm-server``: ``python -m mlx_lm server --model FOLDER`` with the offline mlx-lm side's
  batch settings (``--decode-concurrency`` = max_num_seqs, ``--prompt-concurrency 8``,
  ``--prefill-step-size 2048``) and a prompt cache that holds every request of the run
  (``--prompt-cache-size``; its default of 10 sequences would evict most of a 50-prompt pass).

A server inherits the bench's environment, so it runs the BLAS the bench chose (LD_PRELOAD)
and the device of ``ENGINE_DEVICE``. Its output goes to a log file, kept for the error message
if it fails to start or dies (suites/targets/server_process.py).
"""

import importlib.util
import sys
from pathlib import Path

from suites.targets.server_process import ServerProcess, free_port

SERVERS = ("engine", "mlx-lm-server")
LABELS = {"engine": "engine serve", "mlx-lm-server": "mlx_lm.server"}
START_TIMEOUT_S = 300.0


def available(name: str) -> str | None:
    """None where the server ``name`` can be started here, else why not."""
    if name == "engine" and importlib.util.find_spec("engine.serve") is None:
        return "engine serve is not in this checkout (no module engine.serve)"
    return None


def server_command(name: str, model_folder: Path, port: int, engine_settings: dict,
                   mlx_lm_settings: dict) -> list[str]:
    """The command line that starts ``name`` on ``port``."""
    common = ["--model", str(model_folder), "--host", "127.0.0.1", "--port", str(port)]
    if name == "engine":
        flags = [item for key, value in engine_settings.items() for item in (f"--{key.replace('_', '-')}", str(value))]
        return [sys.executable, "-m", "engine.serve", *common, *flags]
    if name == "mlx-lm-server":
        return [
            sys.executable, "-m", "mlx_lm", "server", *common,
            "--decode-concurrency", str(mlx_lm_settings["completion_batch_size"]),
            "--prompt-concurrency", str(mlx_lm_settings["prefill_batch_size"]),
            "--prefill-step-size", str(mlx_lm_settings["prefill_step_size"]),
            "--prompt-cache-size", str(mlx_lm_settings["prompt_cache_size"]),
            "--log-level", "WARNING",
        ]
    raise ValueError(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")


def start(name: str, model_folder: Path, engine_settings: dict, mlx_lm_settings: dict) -> ServerProcess:
    """Start ``name`` on a free port and wait until it answers."""
    port = free_port()
    server = ServerProcess(server_command(name, model_folder, port, engine_settings, mlx_lm_settings), port)
    try:
        server.wait_ready(START_TIMEOUT_S)
    except BaseException:
        server.stop()
        raise
    return server

