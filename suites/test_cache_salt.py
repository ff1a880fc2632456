"""A cache salt keeps a tenant's blocks its own: every block a salted request caches carries
the salt, the blocks its decode steps fill included (the salt enters the first block's hash
and every later hash through the chain). The other suites' salted prompts all hold a full
block at admission, where the whole prompt is hashed with its salt."""

import pytest

from suites.engine_helpers import greedy, token_prompts

pytestmark = pytest.mark.model


def test_a_block_filled_by_decode_keeps_its_requests_salt(llm):
    """Kills ``salt-dropped-after-admission``: a 10-token salted prompt fills its first block
    (16 tokens) while decoding; only the same salt may hit that block."""
    prompt = token_prompts(81, [10])[0]
    (first,) = llm.generate([prompt], greedy(max_tokens=12), cache_salt="tenant-a")
    continuation = prompt + first.token_ids  # the KV of its first 21 tokens is cached
    salts = [None, "tenant-b", "tenant-a"]
    outputs = llm.generate([continuation] * 3, greedy(max_tokens=2), cache_salt=salts)
    assert [o.num_cached_tokens for o in outputs] == [0, 0, 16]
