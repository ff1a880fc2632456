"""Whether this backend can give bit-identical logits: measured here, never guessed from a name.

The suites assert cache-on == cache-off and paged == dense bit for bit. That holds only
where a row's result does not depend on the other rows of the call: a hit recomputes few
rows (often one, the last prompt token) where the cold pass computed many, and a decode
step pads its keys where a prefill truncated them. Whether MLX's kernels on this device,
with the BLAS this process loaded, give that is a property of the machine (MLX's bundled
reference BLAS does; OpenBLAS, Accelerate, Metal and CUDA may not), so the suite measures it
at session start with MLX's own primitives on random data at the model's shapes:

- matrix products: a row alone (M = 1) against the same row among M = 2 .. 512 rows, and
  decode rows as a batch of one-token sequences, for every projection of the model;
- attention (``mx.fast.scaled_dot_product_attention``, as mlx-lm calls it): the last query
  alone against the same query inside a causal chunk; a chunk against the same queries in
  two chunks; a key range truncated against the same range padded and masked; decode rows
  of different lengths batched against each alone;
- RMS norm and RoPE (a row at position p alone, with an int or an array offset, against
  the same row inside a sequence).

Only MLX primitives are probed, never the engine's code: a bug in the engine must fail
the bit-exact tests, not switch them off. ``ENGINE_EXACTNESS=tokens`` forces the token
mode (a user's choice, reported as such); nothing forces the bit-exact mode.
"""

import hashlib
import os
from dataclasses import dataclass
from functools import cache

import mlx.core as mx
import numpy as np

from engine.models import EMBEDDED_MODELS

EXACTNESS_ENV = "ENGINE_EXACTNESS"

ROW_COUNTS = (2, 3, 8, 32, 128, 512)


@dataclass(frozen=True)
class Exactness:
    """The probe's verdict: the mode the suites apply, and the evidence for it."""

    bit_exact: bool
    evidence: str  # one line for the report: the first difference found, or what held
    differences: tuple[str, ...]  # every probe that differed, with its largest difference
    fingerprint: str  # digest of the probe's outputs: equal digests, same arithmetic

    @property
    def mode(self) -> str:
        return "bit-exact" if self.bit_exact else "tokens"


class _Probe:
    def __init__(self, dtype) -> None:
        self.dtype = dtype
        self.rng = np.random.default_rng(20261130)
        self.checks = 0
        self.differences: list[str] = []
        self.digest = hashlib.sha256()

    def array(self, *shape: int) -> mx.array:
        return mx.array(self.rng.standard_normal(shape, dtype=np.float32)).astype(self.dtype)

    def compare(self, what: str, alone: mx.array, inside: mx.array) -> None:
        """``alone`` and ``inside`` hold the same values computed two ways: are they the same bits?"""
        alone, inside = (np.array(a.astype(mx.float32)) for a in (alone, inside))
        self.checks += 1
        self.digest.update(alone.tobytes())
        if not np.array_equal(alone, inside):
            self.differences.append(f"{what}: differs by {float(np.abs(alone - inside).max()):.2g}")


def _probe_products(probe: _Probe, shapes: dict) -> None:
    hidden, q_dim, kv_dim = shapes["hidden"], shapes["heads"] * shapes["head_dim"], shapes["kv_heads"] * shapes["head_dim"]
    projections = {(hidden, q_dim), (hidden, kv_dim), (q_dim, hidden), (hidden, shapes["intermediate"]),
                   (shapes["intermediate"], hidden), (hidden, shapes["vocab"])}
    for d_in, d_out in sorted(projections):
        weight_t = probe.array(d_out, d_in).T
        rows = probe.array(max(ROW_COUNTS), d_in)
        first, last = rows[:1] @ weight_t, rows[max(ROW_COUNTS) - 1 :] @ weight_t
        for m in ROW_COUNTS:
            together = rows[:m] @ weight_t
            probe.compare(f"product {d_in}->{d_out}, row 0 at M=1 vs M={m}", first, together[:1])
        probe.compare(f"product {d_in}->{d_out}, last row at M=1 vs M={max(ROW_COUNTS)}", last, together[-1:])
        decode_rows = rows[:8].reshape(8, 1, d_in) @ weight_t
        probe.compare(f"product {d_in}->{d_out}, 8 rows as [1, 8] vs [8, 1]", rows[:8] @ weight_t, decode_rows.reshape(8, d_out))


def _sdpa(q, k, v, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)


def _probe_attention(probe: _Probe, shapes: dict) -> None:
    heads, kv_heads, dim = shapes["heads"], shapes["kv_heads"], shapes["head_dim"]
    for length in (7, 64, 300):
        k, v = probe.array(1, kv_heads, length, dim), probe.array(1, kv_heads, length, dim)
        q = probe.array(1, heads, length, dim)
        full = _sdpa(q, k, v, "causal")
        last_alone = _sdpa(q[:, :, -1:], k, v, None)
        probe.compare(f"attention over {length} keys, last query alone vs in a causal chunk", last_alone, full[:, :, -1:])
        split = length // 2
        tail = _sdpa(q[:, :, split:], k, v, "causal")  # the second chunk, keys up to its end
        probe.compare(f"attention over {length} keys, one chunk vs two", tail, full[:, :, split:])
        pad = 37
        padded_k = mx.concatenate([k, probe.array(1, kv_heads, pad, dim)], axis=2)
        padded_v = mx.concatenate([v, probe.array(1, kv_heads, pad, dim)], axis=2)
        keep = mx.array(np.arange(length + pad) < length)[None, None, None, :]
        probe.compare(f"attention over {length} keys, truncated vs padded and masked",
                      last_alone, _sdpa(q[:, :, -1:], padded_k, padded_v, keep))
    lengths = [5, 64, 130, 17]
    width = max(lengths)
    q = probe.array(len(lengths), heads, 1, dim)
    k, v = probe.array(len(lengths), kv_heads, width, dim), probe.array(len(lengths), kv_heads, width, dim)
    mask = mx.array(np.arange(width)[None, :] < np.array(lengths)[:, None])[:, None, None, :]
    batched = _sdpa(q, k, v, mask)
    for row, n in enumerate(lengths):
        alone = _sdpa(q[row : row + 1], k[row : row + 1, :, :n], v[row : row + 1, :, :n], None)
        probe.compare(f"attention, decode row of {n} keys alone vs batched with others", alone, batched[row : row + 1])


def _probe_norm_and_rope(probe: _Probe, shapes: dict) -> None:
    rows, weight = probe.array(64, shapes["hidden"]), probe.array(shapes["hidden"])
    together = mx.fast.rms_norm(rows, weight, 1e-6)
    probe.compare("RMS norm, row alone vs among 64", mx.fast.rms_norm(rows[-1:], weight, 1e-6), together[-1:])
    dim, length = shapes["head_dim"], 40
    x = probe.array(1, shapes["heads"], length, dim)
    sequence = mx.fast.rope(x, dim, traditional=False, base=1_000_000.0, scale=1.0, offset=0)
    last = x[:, :, -1:]
    probe.compare("RoPE, last row at offset p vs in a sequence",
                  mx.fast.rope(last, dim, traditional=False, base=1_000_000.0, scale=1.0, offset=length - 1), sequence[:, :, -1:])
    per_row = mx.fast.rope(last, dim, traditional=False, base=1_000_000.0, scale=1.0, offset=mx.array([length - 1]))
    probe.compare("RoPE, array offset vs int offset", per_row, sequence[:, :, -1:])


def model_shapes(config: dict) -> tuple[tuple[str, int], ...]:
    """The probe's shapes for a model's config.json."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return tuple(dict(hidden=config["hidden_size"], heads=config["num_attention_heads"],
                      kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]), head_dim=head_dim,
                      intermediate=config["intermediate_size"], vocab=config["vocab_size"]).items())


# The embedded tiny models' shapes (both share engine/models.py's TINY), float32: the default probe.
DEFAULT_SHAPES = model_shapes(EMBEDDED_MODELS["tiny-qwen3"].config)


@cache
def measure_exactness(shapes: tuple[tuple[str, int], ...] = DEFAULT_SHAPES, dtype: str = "float32") -> Exactness:
    """Probe this device and dtype at ``shapes`` (hidden, heads, kv_heads, head_dim, intermediate, vocab)."""
    probe = _Probe(getattr(mx, dtype))
    shape_map = dict(shapes)
    _probe_products(probe, shape_map)
    _probe_attention(probe, shape_map)
    _probe_norm_and_rope(probe, shape_map)
    where = f"{mx.default_device()}, {dtype}"
    if probe.differences:
        evidence = f"probe ({where}): {len(probe.differences)} of {probe.checks} checks differ, e.g. {probe.differences[0]}"
    else:
        evidence = f"probe ({where}): all {probe.checks} row, chunk and padding checks identical bit for bit"
    return Exactness(not probe.differences, evidence, tuple(probe.differences), probe.digest.hexdigest()[:16])


def exactness(shapes: tuple[tuple[str, int], ...] = DEFAULT_SHAPES) -> Exactness:
    """The mode of this run: the probe's verdict, unless ENGINE_EXACTNESS=tokens asks for the token mode."""
    measured = measure_exactness(shapes)
    forced = os.environ.get(EXACTNESS_ENV, "auto").lower()
    if forced == "auto":
        return measured
    if forced == "tokens":
        return Exactness(False, f"{EXACTNESS_ENV}=tokens (forced); {measured.evidence}", measured.differences, measured.fingerprint)
    raise ValueError(f"{EXACTNESS_ENV}={forced!r}: use auto (measure, the default) or tokens")


def logits_are_bit_exact_here() -> bool:
    """Whether the suites compare logits bit for bit in this run (the probe's verdict)."""
    return exactness().bit_exact


# Off a bit-exact backend, logits move by up to this much (measured on MLX's CUDA backend on
# an H200: 0.0119 between cache-on and cache-off on the tiny models, see docs/CONFORMANCE.md;
# 4x headroom). A near-tie closer than this may resolve either way there.
NOISE_BOUND = 0.05
