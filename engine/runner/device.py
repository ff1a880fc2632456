"""Backend selection: a setting (ENGINE_DEVICE), never a fork of the code."""

import os

import mlx.core as mx

DEVICE_ENV = "ENGINE_DEVICE"


def gpu_backend() -> str | None:
    """'metal' or 'cuda' when MLX has that GPU backend here, else None."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def select_device(name: str | None = None) -> str:
    """Make MLX run on ``name`` ('cpu', 'gpu', 'metal', 'cuda'; default: $ENGINE_DEVICE or 'cpu').

    Returns a description such as 'cpu' or 'gpu (metal)'. Asking for a GPU that this
    machine lacks is an error, not a silent fall-back to the CPU.
    """
    name = (name or os.environ.get(DEVICE_ENV) or "cpu").lower()
    if name == "cpu":
        mx.set_default_device(mx.cpu)
        return "cpu"
    if name not in ("gpu", "metal", "cuda"):
        raise ValueError(f"unknown device {name!r}; use cpu, gpu, metal or cuda")
    backend = gpu_backend()
    if backend is None or (name != "gpu" and backend != name):
        raise RuntimeError(
            f"{DEVICE_ENV}={name} but MLX has no {name if name != 'gpu' else 'GPU'} backend here "
            f"(mx.metal.is_available() is {mx.metal.is_available()}); on Linux use ENGINE_DEVICE=cpu "
            "(tox -e cpu); on a Mac install plain `mlx` (tox -e metal)"
        )
    mx.set_default_device(mx.gpu)
    return f"gpu ({backend})"
