"""The server's settings: every ``EngineConfig`` field as a dashed flag, and the server's own.

The engine's flags are derived from the dataclass, so its defaults stay written in one place
(``--block-size``, ``--num-kv-blocks``, ..., ``--enable-prefix-caching`` and
``--no-enable-prefix-caching``). A setting the engine refuses ends the command with its message.
"""

import argparse
from dataclasses import dataclass, field, fields

from engine.kv import HASH_FUNCTIONS
from engine.llm import DEFAULT_MODEL, EngineConfig

CHOICES = {"hash_algorithm": sorted(HASH_FUNCTIONS)}


@dataclass(frozen=True, slots=True)
class ServeConfig:
    model: str = DEFAULT_MODEL
    engine: EngineConfig = field(default_factory=EngineConfig)
    device: str | None = None  # None: $ENGINE_DEVICE, else the CPU
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None: the model's name
    log_level: str = "info"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServeConfig()
    parser.add_argument("--model", default=defaults.model,
                        help="an embedded model name or a Hugging Face folder (default: %(default)s)")
    engine = parser.add_argument_group("engine", "EngineConfig settings (engine/llm.py)")
    for setting in fields(EngineConfig):
        flag = "--" + setting.name.replace("_", "-")
        if isinstance(setting.default, bool):
            engine.add_argument(flag, action=argparse.BooleanOptionalAction, default=setting.default,
                                help="(default: %(default)s)")
        else:
            engine.add_argument(flag, type=type(setting.default), default=setting.default,
                                choices=CHOICES.get(setting.name), help="(default: %(default)s)")
    parser.add_argument("--device", default=defaults.device,
                        help="cpu, gpu, metal or cuda (default: $ENGINE_DEVICE, else cpu)")
    parser.add_argument("--host", default=defaults.host, help="(default: %(default)s)")
    parser.add_argument("--port", type=int, default=defaults.port, help="(default: %(default)s)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients send as \"model\" (default: the --model value)")
    parser.add_argument("--log-level", default=defaults.log_level,
                        choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="uvicorn's log level (default: %(default)s)")


def from_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServeConfig:
    try:
        engine = EngineConfig(**{setting.name: getattr(args, setting.name) for setting in fields(EngineConfig)})
    except ValueError as error:
        parser.error(str(error))
    return ServeConfig(args.model, engine, args.device, args.host, args.port, args.served_model_name, args.log_level)


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> ServeConfig:
    parser = argparse.ArgumentParser(prog=prog, description="Serve the engine over an OpenAI-compatible HTTP API.")
    add_arguments(parser)
    return from_arguments(parser, parser.parse_args(argv))
