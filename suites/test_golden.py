"""The engine against the golden snapshots: cache off equals golden, and cache on equals
golden on the cold and the warm pass, with the exact hit of every request asserted."""

import json

import pytest

from engine import SamplingParams
from suites import golden
from suites.engine_helpers import counters, token_prompts
from suites.golden_cases import BLOCK_SIZES, GOLDEN_MODELS, batches, golden_cases
from suites.prefix_oracle import kv_sequence, predicted_batch_hits

pytestmark = pytest.mark.model


@pytest.mark.parametrize("model", GOLDEN_MODELS)
def test_cache_off_equals_golden(llm, model, conformance):
    fresh = golden.cache_off_golden(llm, model)
    committed = golden.load_golden(model, llm.weight_checksum)
    conformance.measured.golden_cases += len(fresh["cases"])
    # Same measured arithmetic as tools/regen's run: every byte, margins included (so the
    # top-2 logits of every step are bit-identical to the golden run). Elsewhere (another
    # BLAS, Metal, CUDA) tokens exactly and margins within the backend's noise.
    same_bytes = golden.same_arithmetic(committed, llm)
    assert golden.golden_differences(committed, fresh, same_bytes=same_bytes) == []


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("model", GOLDEN_MODELS)
def test_cache_on_cold_and_warm_passes_equal_golden_with_exact_hits(llm, model, block_size, conformance):
    llm.reconfigure(model=model, block_size=block_size)
    records = golden.load_golden(model, llm.weight_checksum)["cases"]
    groups = batches([case for case in golden_cases() if case.block_size == block_size])
    cached: list[list[int]] = []
    for label in ("cold", "warm"):
        queries_before, hits_before = counters(llm)
        pass_hits = pass_queries = 0
        for batch in groups:
            prompts = [records[case.name]["prompt_token_ids"] for case in batch]
            expected_hits = predicted_batch_hits(prompts, cached, block_size)
            params = [SamplingParams(max_tokens=case.max_tokens, ignore_eos=True) for case in batch]
            outputs = llm.generate(prompts, params)
            for case, output, hit in zip(batch, outputs, expected_hits, strict=True):
                assert output.token_ids == records[case.name]["token_ids"], f"{label} pass: {case.name}"
                assert output.num_cached_tokens == hit, f"{label} pass: {case.name}"
            pass_queries += sum(len(p) for p in prompts)
            pass_hits += sum(expected_hits)
            assert counters(llm) == (queries_before + pass_queries, hits_before + pass_hits), f"{label}: {batch[0].batch}"
            cached += [kv_sequence(p, o.token_ids) for p, o in zip(prompts, outputs)]
        assert pass_hits > 0, f"the {label} pass never took the hit path"
        conformance.record_hit_rate(f"golden cases, {label}", pass_hits, pass_queries)


def test_seed_benchmark_workload_hits_25088_cold_and_31200_warm(llm, conformance):
    """One 512-token prefix, 50 prompts with their own 128-token suffixes, block size 16."""
    prefix = token_prompts(61, [512])[0]
    prompts = [prefix + token_prompts(62 + index, [128])[0] for index in range(50)]
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    cold = llm.generate(prompts, params)
    assert counters(llm) == (32000, 25088)
    assert [o.num_cached_tokens for o in cold] == [0] + [512] * 49
    conformance.record_hit_rate("seed workload cold", 25088, 32000)
    for warm_pass in range(1, 3):
        warm = llm.generate(prompts, params)
        assert counters(llm) == (32000 * (warm_pass + 1), 25088 + 31200 * warm_pass)
        assert [o.token_ids for o in warm] == [o.token_ids for o in cold]
    conformance.record_hit_rate("seed workload warm", 31200, 32000)
    llm.reconfigure(enable_prefix_caching=False)
    off = llm.generate(prompts, params)
    assert counters(llm) == (0, 0)
    assert [o.token_ids for o in off] == [o.token_ids for o in cold]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text, data: "{not json", "not valid JSON"),
        (lambda text, data: data["cases"]["bs16/family/suffix013"]["token_ids"].__setitem__(2, -1), "case 'bs16/family/suffix013': token_ids"),
        (lambda text, data: data["cases"]["bs8/boundaries/len009"]["prompt_token_ids"].append(5), "case 'bs8/boundaries/len009': prompt_token_ids"),
        (lambda text, data: data["cases"].pop("bs32/identical/copy1"), "case 'bs32/identical/copy1': missing"),
        (lambda text, data: data["cases"]["bs8/chunked/long"].__setitem__("weight_checksum", "0" * 64), "case 'bs8/chunked/long': weight checksum"),
        (lambda text, data: data["cases"]["bs16/identical/copy0"].__setitem__("min_margin", 1e-6), "case 'bs16/identical/copy0': min_margin"),
    ],
    ids=["corrupt", "token", "prompt", "missing-case", "checksum", "thin-margin"],
)
def test_a_damaged_golden_file_is_refused_naming_the_file_and_the_case(tmp_path, monkeypatch, edit, message):
    source = golden.golden_path("tiny-qwen3")
    data = json.loads(source.read_text())
    checksum = data["cases"]["bs8/boundaries/len001"]["weight_checksum"]
    replaced = edit(source.read_text(), data)
    monkeypatch.setattr(golden, "GOLDEN_DIR", tmp_path)
    target = golden.golden_path("tiny-qwen3")
    target.write_text(replaced if isinstance(replaced, str) else json.dumps(data))
    with pytest.raises(golden.GoldenError, match=message) as error:
        golden.load_golden("tiny-qwen3", checksum)
    assert str(target) in str(error.value)
