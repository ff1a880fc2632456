"""The ``engine`` command: ``engine serve`` (see engine/serve)."""

import argparse


def main(argv: list[str] | None = None) -> None:
    from engine.serve import config, server

    parser = argparse.ArgumentParser(prog="engine", description="The MLX paged-KV engine.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve the engine over an OpenAI-compatible HTTP API",
                                description="Serve the engine over an OpenAI-compatible HTTP API.")
    config.add_arguments(serve)
    args = parser.parse_args(argv)
    server.serve(config.from_arguments(serve, args))


if __name__ == "__main__":
    main()
