"""tools/bench --serve mlx-lm-server: the HTTP bench against a real mlx_lm.server subprocess.

A small run on tiny-qwen3 (4 prompts of 32 + 8 tokens, 4 output tokens, 2 passes; about
10 s on two cores). The table has a cold and a warm column of every metric, and the warm
pass's hit rate is the one mlx-lm's source implies: its prompt cache is a token trie of
finished sequences (prompt + output), so a prompt sent again walks into its own earlier
sequence, which is trimmed to serve all of the prompt but its last token. No timing is
asserted; the cold pass's hit rate is not either (a request of 4 tokens can finish before
the last one of its pass arrives, and then the others find its prefix).
"""

import contextlib
import io
import json

import pytest

from engine.models import resolve_model
from tools import bench
from tools.bench_text import load_tokenizer, prompt_texts, server_token_ids, whole_word_ids, word_prompts
from tools.bench_workload import METRICS, Workload

pytestmark = pytest.mark.model

WORKLOAD = Workload(prefix_len=32, suffix_len=8, num_prefixes=1, num_prompts=4, output_len=4, seed=0)
MODEL = "tiny-qwen3"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The table tools/bench prints, and its --json (--blas reference: the bench never
    re-executes itself, here the test process, to preload OpenBLAS)."""
    path = tmp_path_factory.mktemp("bench") / "http.json"
    argv = [
        "--model", MODEL, "--serve", "mlx-lm-server", "--repeats", "2", "--no-progress",
        "--blas", "reference", "--json", str(path),
        "--prefix-len", str(WORKLOAD.prefix_len), "--suffix-len", str(WORKLOAD.suffix_len),
        "--num-prompts", str(WORKLOAD.num_prompts), "--output-len", str(WORKLOAD.output_len),
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench.main(argv) == 0
    return printed.getvalue(), json.loads(path.read_text())


def server_prompt_lengths() -> list[int]:
    """The prompts' lengths as mlx_lm.server tokenizes their text."""
    tokenizer = load_tokenizer(resolve_model(MODEL))
    texts = prompt_texts(tokenizer, word_prompts(WORKLOAD, whole_word_ids(tokenizer)))
    return [len(server_token_ids(tokenizer, text)) for text in texts]


def test_the_table_has_every_metric_for_the_cold_and_the_warm_pass(run):
    table, _ = run
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split("  ")[0] == "metric"
    assert "mlx_lm.server cold" in header and "mlx_lm.server warm" in header
    labels = [f"{label} ({unit})" for _, label, unit, _ in METRICS] + ["Hit rate", "Output tokens"]
    for label in labels:
        assert any(line.startswith(label) for line in lines), f"no row {label!r} in\n{table}"


def test_the_prompts_reach_the_server_as_the_workload_lengths(run):
    _, result = run
    server = result["servers"]["mlx-lm-server"]
    assert server["prompt_as"] == "text"  # mlx_lm.server takes no token ids
    assert server_prompt_lengths() == [WORKLOAD.prompt_len] * WORKLOAD.num_prompts


def test_every_request_gets_all_its_output_tokens(run):
    _, result = run
    server = result["servers"]["mlx-lm-server"]
    expected = WORKLOAD.num_prompts * WORKLOAD.output_len
    assert server["output_tokens"] == [expected, expected]  # EOS suppressed: no early stop


def test_the_warm_pass_hits_all_of_every_prompt_but_its_last_token(run):
    table, result = run
    lengths = server_prompt_lengths()
    server = result["servers"]["mlx-lm-server"]
    assert server["hit_source"] == "usage.prompt_tokens_details.cached_tokens"
    warm_hits, warm_queries = server["hit_tokens"][1]
    assert (warm_hits, warm_queries) == (sum(n - 1 for n in lengths), sum(lengths))
    hit_row = next(line for line in table.splitlines() if line.startswith("Hit rate")).split()
    assert hit_row[-2:] == [f"{100 * warm_hits / warm_queries:.1f}", "%"]
    assert server["expected_hit_rate"]["warm"] == warm_hits / warm_queries
