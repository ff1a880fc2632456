"""The block layer against its plain-Python oracle, step by step (hypothesis stateful testing).

Prompts are built from a few shared token segments, so prefixes are shared, some prompts end
exactly on a block boundary and some carry a salt; requests decode one token at a time, are
freed, and the prefix cache is reset. The pool is small, so eviction starts early. After every
step the manager must agree with ``BlockLayerOracle`` on ref counts, the exact free-queue order,
what every cached block holds (its hash recomputed from the documented layout) and the counters.

``STEPS`` counts the steps run (each initialize or rule is one step); the module reports it at
the end, with the time taken, so the reach of a hypothesis profile can be measured.
"""

import time

import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from engine.kv import KVCacheManager
from suites.block_layer_oracle import REFERENCE_ROOT, BlockLayerOracle, reference_block_hash, snapshot
from suites.run_summary import print_past_capture

STEPS = {"steps": 0, "runs": 0}

SALTS = [None, None, "tenant-a", "tenant-b"]
NUM_SEGMENTS = 3
TOKENS = st.integers(min_value=0, max_value=5)  # a small alphabet, so equal blocks recur
# (segment ids, end exactly on a block boundary, salt): prompts share segments, so prefixes too.
PROMPTS = st.tuples(
    st.lists(st.integers(0, NUM_SEGMENTS - 1), min_size=1, max_size=3), st.booleans(), st.sampled_from(SALTS)
)


@pytest.fixture(scope="module", autouse=True)
def report_step_count(request):
    STEPS.update(steps=0, runs=0)
    start = time.perf_counter()
    yield
    line = f"block-layer state machine: {STEPS['steps']} steps in {STEPS['runs']} runs, "
    line += f"{time.perf_counter() - start:.1f} s"
    print_past_capture(request, line)


class BlockLayerMachine(RuleBasedStateMachine):
    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        STEPS["runs"] += 1
        self.manager: KVCacheManager | None = None
        self.oracle: BlockLayerOracle | None = None
        self.segments: list[list[int]] = []
        self.hash_algorithm = "sha256"
        self.num_requests = 0
        self.known_hashes: dict = {}

    @initialize(
        target=requests,
        block_size=st.sampled_from([1, 2, 4, 8]),
        num_blocks=st.integers(min_value=1, max_value=12),
        enable_caching=st.sampled_from([True, True, True, False]),
        hash_algorithm=st.sampled_from(["sha256", "blake2b"]),
        data=st.data(),
    )
    def create_manager_and_admit_first_requests(
        self, block_size, num_blocks, enable_caching, hash_algorithm, data
    ):
        """Small sizes, so eviction starts early; a few requests, so every rule has work at once."""
        STEPS["steps"] += 1
        self.manager = KVCacheManager(num_blocks, block_size, enable_caching, hash_algorithm)
        self.oracle = BlockLayerOracle(num_blocks, block_size, enable_caching)
        self.hash_algorithm = hash_algorithm
        segment = st.lists(TOKENS, min_size=1, max_size=2 * block_size)
        self.segments = data.draw(st.lists(segment, min_size=NUM_SEGMENTS, max_size=NUM_SEGMENTS), "segments")
        first_prompts = data.draw(st.lists(PROMPTS, max_size=3), "first prompts")
        admitted = [self._admit(self._prompt(*prompt), prompt[2]) for prompt in first_prompts]
        return multiple(*(request_id for request_id in admitted if request_id is not None))

    @rule(target=requests, prompt=PROMPTS)
    def admit_request(self, prompt):
        STEPS["steps"] += 1
        request_id = self._admit(self._prompt(*prompt), prompt[2])
        return multiple() if request_id is None else request_id

    @rule(target=requests, request_id=requests, segment_id=st.integers(0, NUM_SEGMENTS - 1))
    def admit_continuation_of_a_live_request(self, request_id, segment_id):
        """A follow-up turn: a live request's tokens so far (decoded ones included), then more."""
        STEPS["steps"] += 1
        earlier = self.oracle.requests[request_id]
        new_request_id = self._admit(earlier.tokens + self.segments[segment_id], earlier.salt)
        return multiple() if new_request_id is None else new_request_id

    def _prompt(self, segment_ids, end_on_block_boundary, salt):
        tokens = [token for i in segment_ids for token in self.segments[i]]
        block_size = self.oracle.block_size
        if end_on_block_boundary and len(tokens) >= block_size:
            tokens = tokens[: len(tokens) // block_size * block_size]
        return tokens

    def _admit(self, tokens, salt) -> str | None:
        """Look up and allocate a prompt on both sides; the request id, or None if refused."""
        block_size = self.oracle.block_size
        self.num_requests += 1
        request_id = f"r{self.num_requests}"

        candidates = self.oracle.lookup(tokens, salt)
        hit_blocks, num_hit_tokens = self.manager.get_computed_blocks(request_id, tokens, salt)
        assert num_hit_tokens == len(candidates) * block_size, (tokens, salt, candidates)
        hit_ids = [block.block_id for block in hit_blocks]
        for block_id, allowed in zip(hit_ids, candidates, strict=True):
            assert block_id in allowed, f"hit block {block_id} does not hold this prefix ({allowed})"
        event(f"hit blocks: {len(hit_ids)}")

        fits = self.oracle.can_admit(tokens, hit_ids)
        before = snapshot(self.manager)
        allocated = self.manager.allocate_slots(
            request_id, tokens, len(tokens) - num_hit_tokens, num_hit_tokens, hit_blocks, salt
        )
        if not fits:
            event("admission refused")
            assert allocated is None, f"{request_id} was admitted beyond the pool's capacity"
            assert snapshot(self.manager) == before, "a failed allocation changed the pool"
            assert self.manager.block_table(request_id) == []
            return None
        assert allocated is not None, f"{request_id} was refused though it fits"
        num_evictions = self.manager.pool.num_evictions - before.num_evictions
        if num_evictions:
            event("admission evicted")
        expected_new = self.oracle.admit(request_id, tokens, salt, hit_ids)
        assert [block.block_id for block in allocated] == expected_new
        return request_id

    @rule(request_id=requests, token=TOKENS)
    def decode_one_token(self, request_id, token):
        STEPS["steps"] += 1
        tokens = self.oracle.requests[request_id].tokens + [token]
        salt = self.oracle.requests[request_id].salt
        fits = self.oracle.can_append(request_id)
        before = snapshot(self.manager)
        allocated = self.manager.allocate_slots(request_id, tokens, 1, len(tokens) - 1, cache_salt=salt)
        if not fits:
            assert allocated is None, f"{request_id} decoded beyond the pool's capacity"
            assert snapshot(self.manager) == before, "a failed decode allocation changed the pool"
            return
        assert allocated is not None, f"decode of {request_id} was refused though a block is free"
        expected_new = self.oracle.append(request_id, token)
        assert [block.block_id for block in allocated] == expected_new

    @rule(request_id=consumes(requests))
    def free_request(self, request_id):
        STEPS["steps"] += 1
        self.manager.free(request_id)
        self.oracle.free(request_id)

    @rule()
    def reset_prefix_cache(self):
        STEPS["steps"] += 1
        before = snapshot(self.manager)
        expected = self.oracle.reset()
        assert self.manager.reset_prefix_cache() is expected
        if not expected:
            assert snapshot(self.manager) == before, "a refused reset changed the pool"

    # Invariants, checked after every step.

    @precondition(lambda self: self.oracle is not None)
    @invariant()
    def ref_counts_equal_live_users(self):
        pool_refs = [block.ref_count for block in self.manager.pool.blocks]
        assert pool_refs == self.oracle.ref_counts
        assert pool_refs == [self.oracle.users_of(i) for i in range(self.oracle.num_blocks)]
        for request_id, request in self.oracle.requests.items():
            assert self.manager.block_table(request_id) == request.blocks

    @precondition(lambda self: self.oracle is not None)
    @invariant()
    def free_queue_holds_exactly_the_unused_blocks_in_the_oracles_order(self):
        free = [block.block_id for block in self.manager.pool.free_queue]
        assert all(self.manager.pool.blocks[i].ref_count == 0 for i in free), "a block in use is free"
        assert free == self.oracle.free_queue
        pool = self.manager.pool
        assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks == self.oracle.num_blocks
        assert pool.num_free_blocks == len(self.oracle.free_queue)

    @precondition(lambda self: self.oracle is not None)
    @invariant()
    def no_uncached_free_block_waits_behind_a_cached_one(self):
        """So a cached prefix is evicted only when no uncached block is free."""
        cached = [block.block_hash is not None for block in self.manager.pool.free_queue]
        assert cached == sorted(cached), f"free queue {self.oracle.free_queue}, cached: {cached}"

    @precondition(lambda self: self.oracle is not None)
    @invariant()
    def every_cached_hash_maps_to_blocks_holding_its_prefix(self):
        expected: dict[bytes, set[int]] = {}
        for key, block_ids in self.oracle.cached.items():
            expected.setdefault(self._hash_of(key), set()).update(block_ids)
        actual = {h: set(blocks) for h, blocks in self.manager.pool.cached_blocks.items()}
        assert actual == expected
        block_size = self.oracle.block_size
        for block, key in zip(self.manager.pool.blocks, self.oracle.holds, strict=True):
            if key is None:
                assert block.block_hash is None and block.token_ids is None, f"{block} holds nothing"
            else:
                assert block.block_hash == self._hash_of(key)
                assert block.token_ids == key[1][-block_size:]

    @precondition(lambda self: self.oracle is not None)
    @invariant()
    def counters_equal_the_oracles(self):
        stats = self.manager.stats
        assert [stats.requests, stats.queries, stats.hits] == self.oracle.stats

    def _hash_of(self, key) -> bytes:
        """The chained hash of a cached (salt, prefix), recomputed from the documented layout."""
        salt, prefix = key
        block_size = self.oracle.block_size
        parent = REFERENCE_ROOT
        for end in range(block_size, len(prefix) + 1, block_size):
            if (salt, prefix[:end]) not in self.known_hashes:
                extra = (salt,) if end == block_size and salt is not None else ()
                block = prefix[end - block_size : end]
                self.known_hashes[salt, prefix[:end]] = reference_block_hash(
                    self.hash_algorithm, parent, block, extra
                )
            parent = self.known_hashes[salt, prefix[:end]]
        return parent


TestBlockLayer = BlockLayerMachine.TestCase
