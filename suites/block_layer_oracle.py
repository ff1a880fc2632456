"""A plain-Python model of the block layer, written from the rules, not from the engine.

The block-layer suites compare ``engine.kv`` against this module:

- ``reference_chain`` hashes blocks from the documented byte layout (parent hash, token
  count and int64 token ids, length-prefixed extra keys; the salt on the first block only),
  with ``hashlib`` directly, so a change to the engine's hashing shows up as a mismatch;
- ``BlockLayerOracle`` keeps ref counts, the free queue in its exact order, and which
  (salt, prefix) each cached block holds, and predicts hits, allocations and evictions;
- ``snapshot`` reads everything observable from a ``KVCacheManager`` so a test can assert
  that an operation changed nothing.

Nothing here imports MLX.
"""

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

ROOT_PARENT_STRING = b"mlx-prefix-conformance/root-block"
REFERENCE_ROOT = hashlib.sha256(ROOT_PARENT_STRING).digest()

REFERENCE_DIGESTS = {
    "sha256": lambda data: hashlib.sha256(data).digest(),
    "blake2b": lambda data: hashlib.blake2b(data, digest_size=16).digest(),
}

# A cached block is identified by what it holds: the request's salt and the whole prefix up
# to the end of the block (chained hashing makes the hash a function of exactly this).
PrefixKey = tuple[str | None, tuple[int, ...]]


def reference_block_hash(algorithm: str, parent: bytes, tokens: Sequence[int], extra_keys=()) -> bytes:
    payload = parent + struct.pack("<I", len(tokens)) + b"".join(struct.pack("<q", t) for t in tokens)
    for key in extra_keys:
        raw = key.encode("utf-8")
        payload += struct.pack("<I", len(raw)) + raw
    return REFERENCE_DIGESTS[algorithm](payload)


def reference_chain(algorithm: str, tokens: Sequence[int], block_size: int, salt: str | None) -> list[bytes]:
    """The hash of every full block of ``tokens``."""
    hashes = []
    parent = REFERENCE_ROOT
    for start in range(0, len(tokens) - block_size + 1, block_size):
        extra = (salt,) if start == 0 and salt is not None else ()
        parent = reference_block_hash(algorithm, parent, tokens[start : start + block_size], extra)
        hashes.append(parent)
    return hashes


@dataclass
class Snapshot:
    """Everything a caller can observe of a manager, for "this changed nothing" checks."""

    ref_counts: tuple[int, ...]
    free_queue: tuple[int, ...]
    block_hashes: tuple[bytes | None, ...]
    cached: dict[bytes, frozenset[int]]
    stats: tuple[int, int, int]
    num_evictions: int


def snapshot(manager) -> Snapshot:
    pool = manager.pool
    return Snapshot(
        ref_counts=tuple(block.ref_count for block in pool.blocks),
        free_queue=free_ids(manager),
        block_hashes=tuple(block.block_hash for block in pool.blocks),
        cached={h: frozenset(blocks) for h, blocks in pool.cached_blocks.items() if blocks},
        stats=(manager.stats.requests, manager.stats.queries, manager.stats.hits),
        num_evictions=pool.num_evictions,
    )


def free_ids(manager) -> tuple[int, ...]:
    """The free queue's block ids, next to evict first."""
    return tuple(block.block_id for block in manager.pool.free_queue)


@dataclass
class OracleRequest:
    tokens: list[int]
    salt: str | None
    blocks: list[int]
    num_cached_blocks: int


@dataclass
class BlockLayerOracle:
    """The rules of the block layer as a plain-Python model.

    - Free queue: a list, next to evict first. A request's blocks are freed in reverse table
      order (tail first): the cached ones join the end, those caching nothing go to the
      front (in that order, ahead of the blocks already there); a hit on a free block takes
      it out.
    - Allocation pops from the front; a popped block forgets what it cached (eviction).
    - Every full block is cached as soon as it is allocated for its last token.
    - A hit is the longest run of cached full blocks from the start, capped at
      ``(n - 1) // block_size`` blocks.
    """

    num_blocks: int
    block_size: int
    enable_caching: bool = True
    ref_counts: list[int] = field(init=False)
    free_queue: list[int] = field(init=False)
    holds: list[PrefixKey | None] = field(init=False)  # block id -> what it caches
    cached: dict[PrefixKey, list[int]] = field(default_factory=dict)  # insertion order kept
    requests: dict[str, OracleRequest] = field(default_factory=dict)
    stats: list[int] = field(default_factory=lambda: [0, 0, 0])  # requests, queries, hits

    def __post_init__(self) -> None:
        self.ref_counts = [0] * self.num_blocks
        self.free_queue = list(range(self.num_blocks))
        self.holds = [None] * self.num_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def prefix_key(self, salt: str | None, tokens: Sequence[int], num_blocks: int) -> PrefixKey:
        return (salt, tuple(tokens[: num_blocks * self.block_size]))

    def lookup(self, tokens: Sequence[int], salt: str | None) -> list[list[int]]:
        """Count one lookup; return, per hit block, the blocks that may serve it."""
        if not self.enable_caching:
            return []
        cap = min(len(tokens) // self.block_size, (len(tokens) - 1) // self.block_size)
        candidates = []
        for index in range(cap):
            blocks = self.cached.get(self.prefix_key(salt, tokens, index + 1))
            if not blocks:
                break
            candidates.append(list(blocks))
        self.stats[0] += 1
        self.stats[1] += len(tokens)
        self.stats[2] += len(candidates) * self.block_size
        return candidates

    def can_admit(self, tokens: Sequence[int], hit_blocks: Sequence[int]) -> bool:
        num_new = -(-len(tokens) // self.block_size) - len(hit_blocks)
        leaving_free_queue = sum(1 for block in hit_blocks if self.ref_counts[block] == 0)
        return num_new + leaving_free_queue <= len(self.free_queue)

    def admit(
        self, request_id: str, tokens: Sequence[int], salt: str | None, hit_blocks: Sequence[int]
    ) -> list[int]:
        """Touch the hits, allocate the rest, cache the full blocks; return the new block ids."""
        for block in hit_blocks:
            if self.ref_counts[block] == 0:
                self.free_queue.remove(block)
            self.ref_counts[block] += 1
        num_new = -(-len(tokens) // self.block_size) - len(hit_blocks)
        new_blocks = self._allocate(num_new)
        request = OracleRequest(list(tokens), salt, list(hit_blocks) + new_blocks, len(hit_blocks))
        self.requests[request_id] = request
        self._cache_full_blocks(request)
        return new_blocks

    def can_append(self, request_id: str) -> bool:
        request = self.requests[request_id]
        return len(request.tokens) + 1 <= len(request.blocks) * self.block_size or len(self.free_queue) >= 1

    def append(self, request_id: str, token: int) -> list[int]:
        request = self.requests[request_id]
        request.tokens.append(token)
        new_blocks = []
        if len(request.tokens) > len(request.blocks) * self.block_size:
            new_blocks = self._allocate(1)
            request.blocks.extend(new_blocks)
        self._cache_full_blocks(request)
        return new_blocks

    def free(self, request_id: str) -> None:
        request = self.requests.pop(request_id)
        uncached = []
        for block in reversed(request.blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.holds[block] is None:
                    uncached.append(block)
                else:
                    self.free_queue.append(block)
        self.free_queue[:0] = uncached

    def reset(self) -> bool:
        if self.num_used_blocks:
            return False
        self.cached.clear()
        self.holds = [None] * self.num_blocks
        return True

    def users_of(self, block: int) -> int:
        return sum(request.blocks.count(block) for request in self.requests.values())

    def _allocate(self, num_blocks: int) -> list[int]:
        new_blocks = [self.free_queue.pop(0) for _ in range(num_blocks)]
        for block in new_blocks:
            key = self.holds[block]
            if key is not None:
                self.cached[key].remove(block)
                if not self.cached[key]:
                    del self.cached[key]
                self.holds[block] = None
            self.ref_counts[block] = 1
        return new_blocks

    def _cache_full_blocks(self, request: OracleRequest) -> None:
        if not self.enable_caching:
            return
        num_full = len(request.tokens) // self.block_size
        for index in range(request.num_cached_blocks, num_full):
            key = self.prefix_key(request.salt, request.tokens, index + 1)
            block = request.blocks[index]
            self.holds[block] = key
            self.cached.setdefault(key, []).append(block)
        request.num_cached_blocks = max(request.num_cached_blocks, num_full)
