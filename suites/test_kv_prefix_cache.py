"""Prefix caching in the KV-cache manager: hits, ref counts, the free queue, eviction, counters.

Every test drives ``KVCacheManager`` the way the scheduler does (``get_computed_blocks``, then
``allocate_slots`` for the rest, ``free`` at the end) and checks exact block ids: the pool
starts with its free queue in id order, so each placement below is determined by the rules.
"""

import pytest

from engine.kv import KVCacheManager
from suites.block_layer_oracle import free_ids, reference_chain, snapshot


def allocate_prompt(manager, request_id, tokens, salt=None):
    """Look up and allocate a whole prompt; return (hit tokens, block table) or None if refused."""
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(request_id, tokens, salt)
    allocated = manager.allocate_slots(
        request_id, tokens, len(tokens) - num_hit_tokens, num_hit_tokens, hit_blocks, salt
    )
    if allocated is None:
        return None
    return num_hit_tokens, manager.block_table(request_id)


def decode(manager, request_id, tokens):
    """Allocate room for the last of ``tokens``, the way a decode step does."""
    return manager.allocate_slots(request_id, tokens, 1, len(tokens) - 1)


def ref_counts(manager, block_ids):
    return [manager.pool.blocks[i].ref_count for i in block_ids]


def block_hashes(manager, request_id):
    return [block.block_hash for block in manager.blocks_of(request_id)]


def cached_ids(manager):
    return sorted(i for blocks in manager.pool.cached_blocks.values() for i in blocks)


def run(start, length):
    return list(range(start, start + length))


def test_second_request_hits_shared_blocks_with_ref_count_two():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    prompt = run(100, 10)  # two full blocks and a partial one
    assert allocate_prompt(manager, "a", prompt) == (0, [0, 1, 2])
    assert allocate_prompt(manager, "b", prompt) == (8, [0, 1, 3])
    assert ref_counts(manager, [0, 1, 2, 3]) == [2, 2, 1, 1]


def test_a_request_is_freed_tail_first_cached_blocks_to_the_tail_uncached_to_the_head():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    allocate_prompt(manager, "a", run(100, 10))  # blocks 0 1 2; 0 and 1 cached
    allocate_prompt(manager, "b", run(200, 6))  # blocks 3 4; 3 cached
    assert free_ids(manager) == (5, 6, 7)
    manager.free("a")
    assert free_ids(manager) == (2, 5, 6, 7, 1, 0)
    manager.free("b")
    assert free_ids(manager) == (4, 2, 5, 6, 7, 1, 0, 3)


def test_eviction_takes_the_least_recently_freed_block_first():
    manager = KVCacheManager(num_blocks=6, block_size=4)
    allocate_prompt(manager, "old", run(100, 9))  # blocks 0 1 2; 0 and 1 cached
    allocate_prompt(manager, "new", run(200, 9))  # blocks 3 4 5; 3 and 4 cached
    manager.free("old")
    manager.free("new")
    assert free_ids(manager) == (5, 2, 1, 0, 4, 3)
    # The uncached blocks go first; then the older request, its chain tail (block 1)
    # before its start (block 0).
    assert allocate_prompt(manager, "x", run(300, 12)) == (0, [5, 2, 1])
    assert manager.get_computed_blocks("probe-old", run(100, 9))[1] == 4
    assert allocate_prompt(manager, "y", run(400, 1)) == (0, [0])
    assert manager.get_computed_blocks("probe-old-again", run(100, 9))[1] == 0
    assert manager.get_computed_blocks("probe-new", run(200, 9))[1] == 8
    assert manager.pool.num_evictions == 2


def test_a_cached_prefix_is_never_evicted_while_an_uncached_block_is_free():
    """Issue 12. Were every freed block put at the tail, c would take block 0 and evict the
    prefix, and d would hit nothing: (0, [1, 0])."""
    manager = KVCacheManager(num_blocks=2, block_size=4)
    assert allocate_prompt(manager, "a", [1, 2, 3, 4]) == (0, [0])  # block 0 cached
    manager.free("a")
    assert allocate_prompt(manager, "b", [7, 8, 9]) == (0, [1])  # a partial block: no hash
    manager.free("b")  # block 1 goes to the head, ahead of the cached block 0
    assert allocate_prompt(manager, "c", [5, 6])[0] == 0
    manager.free("c")
    assert allocate_prompt(manager, "d", [1, 2, 3, 4, 5]) == (4, [0, 1])
    assert (manager.stats.requests, manager.stats.queries, manager.stats.hits) == (4, 14, 4)
    assert manager.pool.num_evictions == 0


def test_a_hit_takes_a_free_block_out_of_the_queue_and_refreeing_puts_it_at_the_tail():
    manager = KVCacheManager(num_blocks=6, block_size=4)
    allocate_prompt(manager, "a", run(100, 9))  # blocks 0 1 2
    manager.free("a")
    assert free_ids(manager) == (2, 3, 4, 5, 1, 0)
    assert allocate_prompt(manager, "b", run(100, 9)) == (8, [0, 1, 2])
    assert free_ids(manager) == (3, 4, 5)
    assert ref_counts(manager, [0, 1]) == [1, 1]
    manager.free("b")
    assert free_ids(manager) == (2, 3, 4, 5, 1, 0)


def test_a_shared_block_stays_in_use_until_its_last_user_frees_it():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    prompt = run(100, 5)
    allocate_prompt(manager, "a", prompt)  # blocks 0 1
    allocate_prompt(manager, "b", prompt)  # hits block 0, computes into block 2
    manager.free("a")
    assert free_ids(manager) == (1, 3)
    assert ref_counts(manager, [0, 1, 2]) == [1, 0, 1]
    # Taking every free block evicts only free ones: block 0 still serves b's prefix.
    assert allocate_prompt(manager, "c", run(900, 8)) == (0, [1, 3])
    assert manager.get_computed_blocks("probe", prompt) == ([manager.pool.blocks[0]], 4)


def test_hit_blocks_are_never_evicted_when_the_hit_request_needs_new_blocks():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    allocate_prompt(manager, "a", run(100, 5))  # blocks 0 1; block 0 cached
    manager.free("a")  # free queue 1 2 3 0
    allocate_prompt(manager, "b", run(200, 12))  # takes 1 2 3, caches all three
    manager.free("b")
    # Block 0, the only one holding the shared prefix, is now the least recently used.
    assert free_ids(manager) == (0, 3, 2, 1)
    # Exactly full: one hit plus three new blocks. Evicting the head would evict the hit.
    assert allocate_prompt(manager, "c", run(100, 4) + run(900, 9)) == (4, [0, 3, 2, 1])
    assert manager.pool.blocks[0].block_hash is not None
    assert ref_counts(manager, [0, 1, 2, 3]) == [1, 1, 1, 1]
    assert manager.get_computed_blocks("probe", run(100, 5)) == ([manager.pool.blocks[0]], 4)


def test_a_partial_block_is_never_cached():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    allocate_prompt(manager, "a", run(100, 7))  # block 0 full, block 1 holds 3 tokens
    assert cached_ids(manager) == [0]
    assert manager.pool.blocks[1].block_hash is None
    assert manager.pool.blocks[1].token_ids is None
    assert allocate_prompt(manager, "b", run(100, 7) + [5, 6]) == (4, [0, 2, 3])


def test_decode_fills_a_block_and_caches_it_once_full():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    tokens = run(100, 6)
    allocate_prompt(manager, "a", tokens)  # blocks 0 1
    tokens.append(106)
    assert decode(manager, "a", tokens) == []
    assert cached_ids(manager) == [0]
    assert manager.get_computed_blocks("probe-7", tokens + [0])[1] == 4
    tokens.append(107)
    assert decode(manager, "a", tokens) == []
    assert cached_ids(manager) == [0, 1]
    assert manager.get_computed_blocks("probe-8", tokens + [0])[1] == 8
    tokens.append(108)
    assert [block.block_id for block in decode(manager, "a", tokens)] == [2]
    assert cached_ids(manager) == [0, 1]


def test_a_second_chunk_extends_the_block_table_and_caches_the_blocks_it_fills():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    tokens = run(100, 14)
    expected = reference_chain("sha256", tokens, 4, "s")  # blocks 0 1 2 of the whole prompt
    first = manager.allocate_slots("a", tokens, 6, 0, cache_salt="s")
    assert [block.block_id for block in first] == [0, 1]
    assert block_hashes(manager, "a") == [expected[0], None]
    second = manager.allocate_slots("a", tokens, 8, 6, cache_salt="s")
    assert [block.block_id for block in second] == [2, 3]
    assert manager.block_table("a") == [0, 1, 2, 3]
    assert block_hashes(manager, "a") == [*expected, None]
    assert [block.token_ids for block in manager.blocks_of("a")[:3]] == [
        tuple(tokens[start : start + 4]) for start in (0, 4, 8)
    ]
    assert manager.get_computed_blocks("probe", tokens + [0], "s")[1] == 12


def test_a_request_recomputed_after_preemption_caches_its_blocks_again():
    """Kills ``cached-count-kept-across-preemption``: the scheduler re-admits a preempted
    request under the same id; blocks it fills afterwards must be cached as usual (outputs
    stay right either way; only later hits silently drop)."""
    manager = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 106))
    assert manager.admit("r", tokens, token_budget=64) == 0  # blocks 0 1; block 0 cached
    manager.free("r")  # preempted
    assert manager.admit("r", tokens, token_budget=64) == 4  # hits its own block 0
    for token in (106, 107):  # two decode steps fill block 1
        tokens.append(token)
        manager.allocate_slots("r", tokens, 1, len(tokens) - 1)
    assert manager.get_computed_blocks("probe", tokens + [0])[1] == 8


@pytest.mark.parametrize("num_tokens", range(1, 14))
def test_a_prompt_of_n_tokens_hits_at_most_floor_n_minus_one_over_block_size_blocks(num_tokens):
    manager = KVCacheManager(num_blocks=16, block_size=4)
    allocate_prompt(manager, "warm", run(100, 16))  # every full block of the longest prompt cached
    _, num_hit_tokens = manager.get_computed_blocks("probe", run(100, num_tokens))
    assert num_hit_tokens == (num_tokens - 1) // 4 * 4


def test_a_prompt_that_is_an_exact_multiple_of_block_size_hits_one_block_fewer_than_it_has():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    allocate_prompt(manager, "a", run(100, 8))
    assert allocate_prompt(manager, "b", run(100, 8)) == (4, [0, 2])
    assert ref_counts(manager, [0, 1, 2]) == [2, 1, 1]


def test_disabled_caching_never_hits_counts_nothing_and_hashes_nothing():
    manager = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)

    def refuse_to_hash(data):
        raise AssertionError("hashed with caching disabled")

    manager.hash_function = refuse_to_hash
    prompt = run(100, 9)
    assert allocate_prompt(manager, "a", prompt) == (0, [0, 1, 2])
    assert decode(manager, "a", prompt + [1, 2, 3]) == []
    assert allocate_prompt(manager, "b", prompt) == (0, [3, 4, 5])
    assert (manager.stats.requests, manager.stats.queries, manager.stats.hits) == (0, 0, 0)
    assert manager.pool.cached_blocks == {}
    assert all(block.block_hash is None for block in manager.pool.blocks)


def test_different_salts_never_share_blocks():
    manager = KVCacheManager(num_blocks=16, block_size=4)
    prompt = run(100, 9)
    allocate_prompt(manager, "unsalted", prompt)
    for salt in ["a", "b"]:
        assert allocate_prompt(manager, f"salt {salt!r}", prompt, salt)[0] == 0
    assert manager.get_computed_blocks("probe", prompt, "c")[1] == 0
    assert len(manager.pool.cached_blocks) == 6  # two blocks for each of three salts


def test_the_same_salt_shares_blocks():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    prompt = run(100, 9)
    allocate_prompt(manager, "a", prompt, "tenant")
    assert allocate_prompt(manager, "b", prompt, "tenant") == (8, [0, 1, 3])


def test_a_failed_allocation_changes_no_ref_count_free_queue_cache_or_eviction():
    manager = KVCacheManager(num_blocks=6, block_size=4)
    allocate_prompt(manager, "a", run(100, 9))  # blocks 0 1 2 in use
    allocate_prompt(manager, "b", run(200, 5))  # blocks 3 4
    manager.free("b")  # block 3 cached and free
    before = snapshot(manager)
    # Hits blocks 0 and 1 (in use), then would need 4 new blocks: only 3 are free.
    tokens = run(100, 8) + run(500, 13)
    hit_blocks, num_hit_tokens = manager.get_computed_blocks("c", tokens)
    assert num_hit_tokens == 8
    after_lookup = snapshot(manager)
    assert manager.allocate_slots("c", tokens, 13, 8, hit_blocks) is None
    assert snapshot(manager) == after_lookup
    assert manager.block_table("c") == []
    # Hits block 3 (free: taking it costs a free block) plus 3 new ones: one too many.
    tokens = run(200, 4) + run(600, 9)
    hit_blocks, num_hit_tokens = manager.get_computed_blocks("d", tokens)
    assert [block.block_id for block in hit_blocks] == [3]
    after_lookup = snapshot(manager)
    assert manager.allocate_slots("d", tokens, 9, 4, hit_blocks) is None
    assert snapshot(manager) == after_lookup
    assert (after_lookup.ref_counts, after_lookup.free_queue) == (before.ref_counts, before.free_queue)


def test_two_requests_computing_the_same_block_both_cache_it_and_either_serves_a_hit():
    manager = KVCacheManager(num_blocks=6, block_size=4)
    prompt = run(100, 5)
    # Both look up before either allocates, so both miss and both compute block 0's tokens.
    lookups = {rid: manager.get_computed_blocks(rid, prompt) for rid in ("a", "b")}
    assert all(hits == ([], 0) for hits in lookups.values())
    manager.allocate_slots("a", prompt, 5, 0)  # blocks 0 1
    manager.allocate_slots("b", prompt, 5, 0)  # blocks 2 3
    (block_hash,) = manager.pool.cached_blocks
    assert sorted(manager.pool.cached_blocks[block_hash]) == [0, 2]
    manager.free("a")
    manager.free("b")
    assert free_ids(manager) == (3, 1, 4, 5, 0, 2)
    allocate_prompt(manager, "x", run(900, 16))  # takes the uncached 3 1 4 5
    allocate_prompt(manager, "y", run(800, 1))  # takes 0: a's copy of the block is evicted
    assert list(manager.pool.cached_blocks[block_hash]) == [2]
    assert manager.get_computed_blocks("probe", prompt) == ([manager.pool.blocks[2]], 4)


def test_of_several_cached_blocks_with_one_hash_the_first_cached_serves_a_hit():
    """Not the lowest id, not the most recent copy, not the one already in use: the first."""
    manager = KVCacheManager(num_blocks=8, block_size=4)
    prompt = run(100, 5)
    allocate_prompt(manager, "x", run(900, 5))  # blocks 0 1, so the first copy gets id 2
    manager.allocate_slots("a", prompt, 5, 0)  # blocks 2 3: block 2 caches the prompt's block
    manager.free("x")  # free queue 1 4 5 6 7 0
    manager.allocate_slots("b", prompt, 5, 0)  # blocks 1 4: block 1 caches it again
    (block_hash,) = {manager.pool.blocks[i].block_hash for i in (1, 2)}
    assert list(manager.pool.cached_blocks[block_hash]) == [2, 1]
    assert manager.get_computed_blocks("probe", prompt)[0] == [manager.pool.blocks[2]]
    manager.free("a")  # block 2 is free now, block 1 still in use by b
    assert allocate_prompt(manager, "c", prompt) == (4, [2, 3])
    assert ref_counts(manager, [1, 2]) == [1, 1]


def test_a_hash_collision_with_different_tokens_is_a_miss():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    manager.hash_function = lambda data: b"\x00" * 32  # every block hashes alike
    allocate_prompt(manager, "a", run(100, 5))
    assert allocate_prompt(manager, "b", run(200, 5)) == (0, [2, 3])
    assert allocate_prompt(manager, "c", run(100, 5))[0] == 4  # equal tokens still hit


def test_a_lookup_stops_at_the_first_block_that_misses():
    """Kills ``hit-run-not-contiguous``. With chained hashes and tail-first eviction a miss is
    never followed by a cached block, except where a hash collision turns a cached block into
    a miss. Every block hashes alike here, so the lookup of [W, X, ...] finds block 0
    (holding X) as a candidate for both of its blocks: W's is a miss (tokens differ), X's a
    token match, but at the wrong position after a miss."""
    manager = KVCacheManager(num_blocks=8, block_size=4)
    manager.hash_function = lambda data: b"\x00" * 32
    x, y, w = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    manager.get_computed_blocks("a", x + y + [0])
    manager.allocate_slots("a", x + y + [0], 9, 0)  # blocks 0 (x) and 1 (y) cached
    assert manager.get_computed_blocks("probe", w + x + [0]) == ([], 0)


def test_reset_is_refused_while_any_block_is_in_use():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    allocate_prompt(manager, "a", run(100, 9))
    allocate_prompt(manager, "b", run(200, 9))
    manager.free("a")
    before = snapshot(manager)
    assert manager.reset_prefix_cache() is False
    assert snapshot(manager) == before
    assert manager.get_computed_blocks("probe", run(100, 9))[1] == 8


def test_reset_forgets_every_cached_block_once_nothing_is_in_use():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    allocate_prompt(manager, "a", run(100, 9))
    allocate_prompt(manager, "b", run(200, 9), "s")
    manager.free("a")
    manager.free("b")
    order = free_ids(manager)
    assert manager.reset_prefix_cache() is True
    assert manager.pool.cached_blocks == {}
    assert all(block.block_hash is None and block.token_ids is None for block in manager.pool.blocks)
    assert free_ids(manager) == order
    assert allocate_prompt(manager, "a again", run(100, 9))[0] == 0
    assert allocate_prompt(manager, "b again", run(200, 9), "s")[0] == 0


def test_counters_count_requests_and_prompt_tokens_looked_up_and_served():
    manager = KVCacheManager(num_blocks=16, block_size=4)
    allocate_prompt(manager, "a", run(100, 10))  # miss: 10 queried
    allocate_prompt(manager, "b", run(100, 10))  # hits 8 of 10
    allocate_prompt(manager, "c", run(100, 5) + [1, 2, 3])  # hits 4 of 8
    manager.get_computed_blocks("d", run(100, 9))  # lookup only: hits 8 of 9
    stats = manager.stats
    assert (stats.requests, stats.queries, stats.hits) == (4, 37, 20)
    assert stats.hit_rate == 20 / 37


def test_seed_workload_hits_25088_of_32000_cold_and_31200_of_32000_warm():
    manager = KVCacheManager(num_blocks=512, block_size=16)
    prefix = run(10_000, 512)
    prompts = [prefix + run(20_000 + 128 * i, 128) for i in range(50)]
    totals = []
    for cache_pass in ("cold", "warm"):
        before = (manager.stats.queries, manager.stats.hits)
        for i, prompt in enumerate(prompts):
            assert allocate_prompt(manager, f"{cache_pass}-{i}", prompt) is not None
        totals.append((manager.stats.hits - before[1], manager.stats.queries - before[0]))
        for i in range(len(prompts)):
            manager.free(f"{cache_pass}-{i}")
    assert totals == [(25088, 32000), (31200, 32000)]


@pytest.mark.parametrize("block_size", [0, 3, 6, 12, -4])
def test_a_block_size_that_is_not_a_power_of_two_is_refused_by_name(block_size):
    with pytest.raises(ValueError, match=f"block_size.*{block_size}"):
        KVCacheManager(num_blocks=8, block_size=block_size)


def test_an_unknown_hash_algorithm_is_refused_by_name():
    with pytest.raises(ValueError, match="'md5'"):
        KVCacheManager(num_blocks=8, block_size=4, hash_algorithm="md5")


def test_an_admission_counts_one_lookup_and_a_refused_one_counts_none():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    assert manager.admit("a", run(100, 9), token_budget=64) == 0  # blocks 0 1 2
    # Hits blocks 0 and 1, then needs 2 new blocks with only 1 free: refused, not counted.
    prompt = run(100, 8) + run(500, 5)
    assert manager.admit("b", prompt, token_budget=64) is None
    assert (manager.stats.requests, manager.stats.queries, manager.stats.hits) == (1, 9, 0)
    manager.free("a")
    assert manager.admit("b", prompt, token_budget=64) == 8
    assert (manager.stats.requests, manager.stats.queries, manager.stats.hits) == (2, 22, 8)
