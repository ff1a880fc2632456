"""Per-request block tables on top of the block pool: cache hits, allocation, freeing."""

from collections.abc import Sequence
from dataclasses import dataclass

from engine.kv.block_pool import BlockPool, KVBlock
from engine.kv.hashing import HASH_FUNCTIONS, BlockHash, hash_full_blocks


@dataclass(slots=True)
class PrefixCacheStats:
    """Cumulative counters, in tokens: ``queries`` looked up, ``hits`` served from the cache."""

    requests: int = 0
    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    """Decides which blocks each request uses.

    A request's KV lives in its block table: first the blocks its prefix hit in the cache,
    then blocks it computes itself. Every block that becomes full is cached at once (also
    during decode), at the step that schedules its last token; the scheduler runs that
    step's forwards in schedule order, so a later request of the same step may hit it.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        hash_algorithm: str = "sha256",
    ) -> None:
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if hash_algorithm not in HASH_FUNCTIONS:
            raise ValueError(f"unknown hash_algorithm {hash_algorithm!r}; choose from {sorted(HASH_FUNCTIONS)}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.hash_function = HASH_FUNCTIONS[hash_algorithm]
        self.pool = BlockPool(num_blocks)
        self.stats = PrefixCacheStats()
        self._block_tables: dict[str, list[KVBlock]] = {}
        self._block_hashes: dict[str, list[BlockHash]] = {}
        self._num_cached_blocks: dict[str, int] = {}

    def max_hit_blocks(self, num_tokens: int) -> int:
        """At least the last token is always computed, so its logits exist to sample from."""
        return (num_tokens - 1) // self.block_size

    def get_computed_blocks(
        self,
        request_id: str,
        token_ids: Sequence[int],
        cache_salt: str | None = None,
        *,
        record_stats: bool = True,
    ) -> tuple[list[KVBlock], int]:
        """The longest cached run of full blocks from the start, and its length in tokens.

        Counts one lookup in the stats unless told not to. Takes no reference:
        ``allocate_slots`` does.
        """
        if not self.enable_caching:
            return [], 0
        hashes = self._hashes_for(request_id, token_ids, cache_salt)
        hit_blocks: list[KVBlock] = []
        for index in range(min(len(hashes), self.max_hit_blocks(len(token_ids)))):
            start = index * self.block_size
            block = self.pool.get_cached_block(hashes[index], token_ids[start : start + self.block_size])
            if block is None:
                break
            hit_blocks.append(block)
        num_hit_tokens = len(hit_blocks) * self.block_size
        if record_stats:
            self._record_lookup(len(token_ids), num_hit_tokens)
        return hit_blocks, num_hit_tokens

    def admit(
        self, request_id: str, token_ids: Sequence[int], token_budget: int, cache_salt: str | None = None
    ) -> int | None:
        """Look up a waiting request's prefix and allocate room for its next chunk.

        Returns the number of tokens served from the cache, or None (and changes nothing,
        counters included) when the pool cannot hold the chunk. A lookup is counted once
        per admission, so the counters do not depend on how often a request had to wait.
        """
        hit_blocks, num_hit_tokens = self.get_computed_blocks(request_id, token_ids, cache_salt, record_stats=False)
        num_new_tokens = min(len(token_ids) - num_hit_tokens, token_budget)
        allocated = self.allocate_slots(
            request_id, token_ids, num_new_tokens, num_hit_tokens, hit_blocks, cache_salt
        )
        if allocated is None:
            return None
        if self.enable_caching:
            self._record_lookup(len(token_ids), num_hit_tokens)
        return num_hit_tokens

    def can_fit(self, num_tokens: int) -> bool:
        """Whether a request of ``num_tokens`` could ever fit, alone, in an empty pool."""
        return -(-num_tokens // self.block_size) <= self.pool.num_blocks

    def _record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.stats.requests += 1
        self.stats.queries += num_tokens
        self.stats.hits += num_hit_tokens

    def allocate_slots(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_new_tokens: int,
        num_computed_tokens: int,
        new_computed_blocks: Sequence[KVBlock] = (),
        cache_salt: str | None = None,
        cache_full_blocks: bool = True,
    ) -> list[KVBlock] | None:
        """Give the request room for ``num_new_tokens`` more tokens; None if the pool is short.

        ``new_computed_blocks`` are the hit blocks of a request being admitted;
        ``num_computed_tokens`` already includes them. On failure nothing changes: no
        reference is taken and nothing is evicted. Without ``cache_full_blocks`` (a step
        scheduled before the host knows its last token) the caller caches them later.
        """
        num_total_tokens = num_computed_tokens + num_new_tokens
        # Hits come only with an admission (an empty table), and never outnumber the blocks needed.
        num_new_blocks = self.num_new_blocks(request_id, num_total_tokens) - len(new_computed_blocks)
        # A hit block with no user sits in the free queue: taking it costs free capacity.
        num_hits_leaving_free_queue = sum(1 for block in new_computed_blocks if block.ref_count == 0)
        if num_new_blocks + num_hits_leaving_free_queue > self.pool.num_free_blocks:
            return None
        # Touch the hits before allocating, so the allocation can never evict them.
        self.pool.touch(new_computed_blocks)
        new_blocks = self.pool.allocate(num_new_blocks)
        table = self._block_tables.setdefault(request_id, [])
        table.extend(new_computed_blocks)
        table.extend(new_blocks)
        if self.enable_caching:
            self._num_cached_blocks.setdefault(request_id, 0)
            self._num_cached_blocks[request_id] += len(new_computed_blocks)
            if cache_full_blocks:
                self._cache_full_blocks(request_id, token_ids[:num_total_tokens], cache_salt)
        return new_blocks

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], cache_salt: str | None = None) -> None:
        """Cache the request's blocks that ``token_ids`` (its first tokens) fill."""
        if self.enable_caching:
            self._cache_full_blocks(request_id, token_ids, cache_salt)

    def num_new_blocks(self, request_id: str, num_total_tokens: int) -> int:
        """Blocks the request lacks to hold ``num_total_tokens`` tokens."""
        return max(0, -(-num_total_tokens // self.block_size) - len(self._block_tables.get(request_id, ())))

    def can_allocate_without_eviction(self, num_blocks: int) -> bool:
        return self.pool.num_uncached_at_head(num_blocks) == num_blocks

    def free(self, request_id: str) -> None:
        """Release a finished or preempted request's blocks."""
        table = self._block_tables.pop(request_id, [])
        self._block_hashes.pop(request_id, None)
        self._num_cached_blocks.pop(request_id, None)
        # Free in reverse so that, among equally old blocks, a chain's tail is evicted first.
        self.pool.free(reversed(table))

    def block_table(self, request_id: str) -> list[int]:
        return [block.block_id for block in self._block_tables.get(request_id, [])]

    def blocks_of(self, request_id: str) -> list[KVBlock]:
        return list(self._block_tables.get(request_id, []))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def _hashes_for(self, request_id: str, token_ids: Sequence[int], cache_salt: str | None) -> list[BlockHash]:
        known = self._block_hashes.get(request_id, ())
        hashes = hash_full_blocks(self.hash_function, token_ids, self.block_size, cache_salt, known)
        self._block_hashes[request_id] = hashes
        return hashes

    def _cache_full_blocks(self, request_id: str, token_ids: Sequence[int], cache_salt: str | None) -> None:
        table = self._block_tables[request_id]
        num_full = len(token_ids) // self.block_size
        num_cached = self._num_cached_blocks[request_id]
        if num_full <= num_cached:
            return
        hashes = self._hashes_for(request_id, token_ids, cache_salt)
        for index in range(num_cached, num_full):
            start = index * self.block_size
            self.pool.cache_block(table[index], hashes[index], token_ids[start : start + self.block_size])
        self._num_cached_blocks[request_id] = num_full
