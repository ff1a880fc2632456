"""Which BLAS MLX's CPU backend runs, and how tools/bench chooses it.

On Linux the mlx[cpu] wheel bundles reference (netlib) BLAS: float32 products run near
6 GFLOP/s on the machine these tools were written on, about 30x slower than OpenBLAS.
Preloading OpenBLAS (``LD_PRELOAD``) makes MLX's ``cblas_sgemm`` calls bind to it. It also
moves logits in their last bits (OpenBLAS sends one-row products to another kernel), so the
conformance suites keep the bundled BLAS; benchmarks say which one ran.
"""

import ctypes
import ctypes.util
import glob
import os
import sys

REEXEC_MARKER = "ENGINE_BENCH_BLAS_REEXEC"


def find_openblas() -> str | None:
    patterns = [
        "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
        "/usr/lib/*-linux-gnu/libopenblas*.so.0",
        "/usr/lib64/libopenblas*.so.0",
    ]
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    name = ctypes.util.find_library("openblas")
    return name if name and os.path.isabs(name) else None


def ensure_blas(choice: str) -> None:
    """Re-execute the running script with OpenBLAS preloaded (or without), as ``choice`` asks."""
    if sys.platform != "linux" or os.environ.get(REEXEC_MARKER):
        if choice == "openblas" and sys.platform != "linux":
            sys.exit("--blas openblas is for Linux (LD_PRELOAD); macOS runs Accelerate")
        return
    preloaded = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    has_openblas = any("openblas" in p for p in preloaded)
    library = find_openblas()
    if choice == "openblas" and library is None and not has_openblas:
        sys.exit(
            "--blas openblas: no libopenblas found (Debian/Ubuntu: apt-get install libopenblas0-pthread)"
        )
    if choice in ("openblas", "auto") and library is not None and not has_openblas:
        preloaded = [library, *preloaded]
    elif choice == "reference" and has_openblas:
        preloaded = [p for p in preloaded if "openblas" not in p]
    else:
        return
    env = dict(os.environ, LD_PRELOAD=":".join(preloaded), **{REEXEC_MARKER: "1"})
    # sys.orig_argv repeats the command as typed: a script path, `-m tools.bench` or a console script.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def blas_in_use() -> str:
    """Which library MLX's ``cblas_sgemm`` resolves to in this process.

    The wheel's bundled BLAS is loaded privately (RTLD_LOCAL), so a ``cblas_sgemm`` visible
    in the global scope is a preloaded one, and that is the one MLX's calls bind to.
    (numpy's own OpenBLAS is mapped too, under a prefixed symbol name: it does not count.)
    """
    if sys.platform == "darwin":
        return "accelerate"

    class DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    try:
        symbol = ctypes.CDLL(None).cblas_sgemm
    except AttributeError:
        return "reference (netlib BLAS bundled with the mlx wheel)"
    info = DlInfo()
    ctypes.CDLL(None).dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info))
    library = (info.dli_fname or b"?").decode()
    return f"{'openblas' if 'openblas' in library else 'preloaded'} ({library})"
