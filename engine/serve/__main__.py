"""``python -m engine.serve``: the same as ``engine serve``."""

from engine.serve.config import parse_args
from engine.serve.server import serve

if __name__ == "__main__":
    serve(parse_args(prog="python -m engine.serve"))
