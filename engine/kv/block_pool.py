"""Blocks, the LRU free queue, the hash -> block map, eviction and ref counts."""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from engine.kv.hashing import BlockHash


@dataclass(slots=True, eq=False)
class KVBlock:
    """One block of KV slots. A block with a hash holds exactly ``token_ids``."""

    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    # Kept so that a hit is confirmed by the tokens themselves, not by the hash alone.
    token_ids: tuple[int, ...] | None = None
    prev_free: "KVBlock | None" = None
    next_free: "KVBlock | None" = None

    def __repr__(self) -> str:
        cached = "cached" if self.block_hash is not None else "uncached"
        return f"KVBlock(id={self.block_id}, ref={self.ref_count}, {cached})"


class FreeBlockQueue:
    """Free blocks as a doubly linked list with sentinels, so a hit removes one in O(1).

    Order (kept by ``BlockPool.free``): the block to reuse next is at the head. Every free
    block that holds no hash comes before every cached one, so a cached prefix is evicted
    only when no uncached block is free; the cached ones run from least to most recently
    used. A request's blocks are freed tail first, so among cached blocks freed together the
    end of a chain is evicted before its start.
    """

    def __init__(self, blocks: Sequence[KVBlock]) -> None:
        self._head = KVBlock(block_id=-1)
        self._tail = KVBlock(block_id=-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._length = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not self._tail:
            yield node
            node = node.next_free

    def popleft(self) -> KVBlock:
        if self._length == 0:
            raise IndexError("no free block left")
        block = self._head.next_free
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        assert block.prev_free is not None and block.next_free is not None, f"{block} is not free"
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self._length -= 1

    def append(self, block: KVBlock) -> None:
        self._insert_after(self._tail.prev_free, block)

    def appendleft(self, block: KVBlock) -> None:
        self._insert_after(self._head, block)

    def _insert_after(self, node: KVBlock, block: KVBlock) -> None:
        assert block.prev_free is None and block.next_free is None, f"{block} is already free"
        following = node.next_free
        node.next_free = block
        block.prev_free = node
        block.next_free = following
        following.prev_free = block
        self._length += 1


class BlockPool:
    """Owns every block: hands out free ones, keeps cached ones findable until evicted.

    A cached block stays cached while free; it is evicted (its hash forgotten) only when
    the free queue hands it out again. Blocks in use are never in the free queue, so they
    are never evicted.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.blocks = [KVBlock(block_id=i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        # Two requests may compute the same block before either is cached, so one hash
        # can map to several blocks, kept in the order they were cached.
        self.cached_blocks: dict[BlockHash, dict[int, KVBlock]] = {}
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def get_cached_block(self, block_hash: BlockHash, token_ids: Sequence[int]) -> KVBlock | None:
        """The first cached block with this hash, if it holds exactly ``token_ids``; else None."""
        candidates = self.cached_blocks.get(block_hash)
        if not candidates:
            return None
        block = next(iter(candidates.values()))
        # A hash collision must never serve another prompt's KV: treat it as a miss.
        if block.token_ids != tuple(token_ids):
            return None
        return block

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on hit blocks; a free one leaves the free queue (no eviction)."""
        for block in blocks:
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Pop ``num_blocks`` from the head of the free queue, evicting their hashes."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot allocate {num_blocks} blocks, only {self.num_free_blocks} free")
        allocated = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_count = 1
            allocated.append(block)
        return allocated

    def num_uncached_at_head(self, at_most: int) -> int:
        """How many of the next ``at_most`` blocks ``allocate`` hands out hold no hash: taking
        that many evicts nothing."""
        count = 0
        for block in self.free_queue:
            if count == at_most or block.block_hash is not None:
                break
            count += 1
        return count

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; unused ones become free.

        ``blocks`` come in eviction order, first to evict first. A cached block joins the
        tail of the free queue; one that holds no hash can never serve a hit, so it joins
        the head and is reused before any cached block (vLLM's order since its PR #42656).
        """
        uncached = []
        for block in blocks:
            assert block.ref_count > 0, f"double free of {block}"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    uncached.append(block)
                else:
                    self.free_queue.append(block)
        # Inserted at the head last one first, so the first given is the first reused.
        for block in reversed(uncached):
            self.free_queue.appendleft(block)

    def cache_block(self, block: KVBlock, block_hash: BlockHash, token_ids: Sequence[int]) -> None:
        """Make a full block findable by its hash."""
        assert block.block_hash is None, f"{block} is already cached"
        assert block.ref_count > 0, f"only a block in use can be filled, not {block}"
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.cached_blocks.setdefault(block_hash, {})[block.block_id] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every hash. Refused (False) while any block is in use."""
        if self.num_used_blocks > 0:
            return False
        for block in self.blocks:
            block.block_hash = None
            block.token_ids = None
        self.cached_blocks.clear()
        return True

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        same_hash = self.cached_blocks[block.block_hash]
        del same_hash[block.block_id]
        if not same_hash:
            del self.cached_blocks[block.block_hash]
        block.block_hash = None
        block.token_ids = None
        self.num_evictions += 1
