"""Golden files: syrupy JSON snapshots of cache-off outputs, all in ``golden/``.

One file per model (``golden/<model>.json``), written by ``tools/regen`` after both
references agreed, read by the suites. A hand-edited or corrupted file fails with an error
naming the file and the case.
"""

import json
import math
import platform
from pathlib import Path

import mlx.core as mx
import numpy as np
from syrupy.extensions.json import JSONSnapshotExtension

from engine import SamplingParams
from suites.exactness import NOISE_BOUND, exactness, model_shapes
from suites.golden_cases import Case, batches, golden_cases

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden"

# Every golden step must separate its top-1 from its top-2 logit by at least this much,
# so that a backend whose logits move in the last bits still picks the golden token.
# Why 1e-3: tools/regen measures the largest logit difference between two independent
# implementations of the same weights (transformers on PyTorch vs this engine on MLX) and
# records it in each golden file; on the tiny models it is about 1e-5, so 1e-3 leaves two
# orders of magnitude of headroom for other kernels (Metal, CUDA, optimised BLAS), while
# the CPU backend is held to bit-identical logits anyway. A larger threshold would refuse
# one case in 60 on these random-weight models, whose logits often nearly tie.
MARGIN_THRESHOLD = 1e-3

# Where this machine's arithmetic differs from the producer's, a step's margin (top-1 minus
# top-2) moves by at most twice the backend's logit noise: each of the two logits moves by
# up to NOISE_BOUND.
MARGIN_NOISE_BOUND = 2 * NOISE_BOUND

# The transformers-vs-engine difference is a diagnostic of the machine (PyTorch's CPU kernels
# differ between CPUs: 1.14e-5 on one x86-64, 1.34e-5 on another). It is never compared byte
# for byte, only against a bound: on a bit-exact backend, a tenth of the margin threshold
# (the threshold's justification needs that headroom); elsewhere the backend's noise.
REFERENCE_BOUND_EXACT = MARGIN_THRESHOLD / 10


class GoldenError(ValueError):
    pass


def golden_name(model: str) -> str:
    """A model's name in its golden file: an embedded name as is, a folder by its last part
    (so the golden of ``~/models/Qwen3-0.6B`` is ``<golden dir>/Qwen3-0.6B.json`` on every machine)."""
    return Path(model).name


def golden_path(model: str) -> Path:
    return GOLDEN_DIR / f"{golden_name(model)}.json"


def serialize_golden(golden: dict) -> str:
    """The golden's text, in syrupy's JSON snapshot format: sorted keys, two-space indent, final newline."""
    return JSONSnapshotExtension().serialize(golden)


def producer() -> dict:
    """What wrote a golden file. Informational, never compared, except ``arithmetic``: the
    exactness probe's fingerprint of this device's arithmetic (suites/exactness.py)."""
    return {
        "arithmetic": exactness().fingerprint,
        "mlx_version": mx.__version__,
        "device": str(mx.default_device()),
        "machine": platform.machine(),
    }


def model_exactness(llm):
    """The exactness probe at the shapes of the model ``llm`` has loaded."""
    return exactness(model_shapes(json.loads((Path(llm.model_path) / "config.json").read_text())))


def same_arithmetic(golden: dict, llm) -> bool:
    """Whether this run must reproduce the golden's bytes: the backend is measured bit-exact at
    the model's shapes, and its arithmetic fingerprint equals the producer's (same kernels,
    same bits; another CPU with the same kernels qualifies, another BLAS or a GPU does not)."""
    made_by = golden.get("producer", {})
    return model_exactness(llm).bit_exact and made_by.get("arithmetic") == exactness().fingerprint


def golden_differences(committed: dict, fresh: dict, *, same_bytes: bool) -> list[str]:
    """Where ``fresh`` (this machine's cache-off run) departs from the ``committed`` golden.

    Compared exactly everywhere: the case set, prompts, tokens, model, weight checksum, block
    size and batch. ``min_margin``: byte for byte where ``same_bytes``, else within
    MARGIN_NOISE_BOUND. Never compared: the producer's description. The reference difference,
    where ``fresh`` has one (tools/regen), against its bound. An empty list: the golden holds here.
    """
    problems = []
    for key in ("model", "margin_threshold"):
        if committed.get(key) != fresh.get(key):
            problems.append(f"{key}: {committed.get(key)!r} -> {fresh.get(key)!r}")
    old, new = committed["cases"], fresh["cases"]
    problems += [f"{name}: only in the committed golden" for name in sorted(set(old) - set(new))]
    problems += [f"{name}: not in the committed golden" for name in sorted(set(new) - set(old))]
    for name in sorted(set(old) & set(new)):
        before, after = old[name], new[name]
        for key in sorted((set(before) | set(after)) - {"min_margin"}):
            if before.get(key) != after.get(key):
                problems.append(f"{name}: {key} {before.get(key)!r} -> {after.get(key)!r}")
        margin_before, margin_after = before.get("min_margin"), after.get("min_margin")
        if same_bytes and margin_before != margin_after:
            problems.append(f"{name}: min_margin {margin_before!r} -> {margin_after!r} (same arithmetic: must be identical)")
        elif not same_bytes and not abs(margin_before - margin_after) <= MARGIN_NOISE_BOUND:
            problems.append(f"{name}: min_margin {margin_before!r} -> {margin_after!r}, beyond {MARGIN_NOISE_BOUND}")
    if "reference_max_logit_difference" in fresh:
        bound = REFERENCE_BOUND_EXACT if same_bytes else NOISE_BOUND
        for reference, difference in fresh["reference_max_logit_difference"].items():
            if not (math.isfinite(difference) and difference <= bound):
                problems.append(f"reference difference {reference}: {difference:.3g} exceeds its bound {bound:.3g}")
    return problems


def min_margin(logits: np.ndarray) -> float:
    """The smallest top-1 minus top-2 logit over a request's steps."""
    top_two = np.sort(logits, axis=-1)[:, -2:]
    return float((top_two[:, 1] - top_two[:, 0]).min())


def case_prompt(case: Case, outputs: dict[str, dict]) -> list[int]:
    if case.continues is None:
        return list(case.prompt_token_ids)
    base = outputs[case.continues]
    return [*base["prompt_token_ids"], *base["token_ids"]]


def cache_off_golden(llm, model: str, cases: list[Case] | None = None, progress=None, logits: dict | None = None) -> dict:
    """Generate every case with the cache off, batch by batch, as the golden file records it.

    ``logits``, when given, receives each case's per-step logits.
    """
    llm.reconfigure(model=model, enable_prefix_caching=False)
    records: dict[str, dict] = {}
    for batch in batches(cases or golden_cases()):
        prompts = [case_prompt(case, records) for case in batch]
        params = [SamplingParams(max_tokens=c.max_tokens, ignore_eos=True, return_logits=True) for c in batch]
        for case, prompt, output in zip(batch, prompts, llm.generate(prompts, params), strict=True):
            records[case.name] = {
                "model": golden_name(model),
                "weight_checksum": llm.weight_checksum,
                "block_size": case.block_size,
                "batch": case.batch,
                "prompt_token_ids": prompt,
                "token_ids": output.token_ids,
                "min_margin": min_margin(output.logits),
            }
            if logits is not None:
                logits[case.name] = output.logits
        if progress is not None:
            progress(len(batch))
    return {"model": golden_name(model), "margin_threshold": MARGIN_THRESHOLD, "producer": producer(), "cases": records}


def load_golden(model: str, weight_checksum: str | None = None, cases: list[Case] | None = None) -> dict:
    """Read and check ``golden/<model>.json`` against the case catalogue (default: the tiny
    models' catalogue; ``suites/real_cases.py`` builds the one for real checkpoints)."""
    cases = cases or golden_cases()
    path = golden_path(model)
    try:
        golden = json.loads(path.read_text())
    except FileNotFoundError:
        raise GoldenError(f"{path}: missing; run tools/regen") from None
    except json.JSONDecodeError as error:
        raise GoldenError(f"{path}: not valid JSON ({error}); run tools/regen") from None
    if not isinstance(golden, dict) or not isinstance(golden.get("cases"), dict):
        raise GoldenError(f"{path}: no 'cases' mapping")
    records = golden["cases"]
    for case in cases:
        record = records.get(case.name)
        where = f"{path}: case {case.name!r}"
        if not isinstance(record, dict):
            raise GoldenError(f"{where}: missing")
        _check_record(where, case, record, records, model, weight_checksum)
    extra = set(records) - {case.name for case in cases}
    if extra:
        raise GoldenError(f"{path}: cases not in the catalogue: {sorted(extra)}")
    return golden


def _check_record(where: str, case: Case, record: dict, records: dict, model: str, checksum: str | None) -> None:
    if record.get("model") != golden_name(model):
        raise GoldenError(f"{where}: model is {record.get('model')!r}, expected {golden_name(model)!r}")
    if checksum is not None and record.get("weight_checksum") != checksum:
        raise GoldenError(
            f"{where}: weight checksum {record.get('weight_checksum')!r} differs from the model's {checksum!r}; "
            "the model recipe changed: run tools/regen"
        )
    expected_prompt = case_prompt(case, records) if case.continues is None or case.continues in records else None
    if record.get("prompt_token_ids") != expected_prompt:
        raise GoldenError(f"{where}: prompt_token_ids differ from the catalogue's prompt (hand-edited?)")
    tokens = record.get("token_ids")
    if not isinstance(tokens, list) or len(tokens) != case.max_tokens or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t for t in tokens
    ):
        raise GoldenError(f"{where}: token_ids must be {case.max_tokens} non-negative integers, got {tokens!r}")
    margin = record.get("min_margin")
    if not isinstance(margin, float) or margin < MARGIN_THRESHOLD:
        raise GoldenError(f"{where}: min_margin {margin!r} is below the threshold {MARGIN_THRESHOLD}")
