"""The block layer: hashing, the block pool and the KV-cache manager.

Pure Python on purpose: nothing here imports MLX, so the rules of prefix caching are
tested at full speed without a model.
"""

from engine.kv.block_pool import BlockPool, FreeBlockQueue, KVBlock
from engine.kv.hashing import HASH_FUNCTIONS, ROOT_PARENT_HASH, BlockHash, hash_block_tokens
from engine.kv.manager import KVCacheManager, PrefixCacheStats

__all__ = [
    "HASH_FUNCTIONS",
    "ROOT_PARENT_HASH",
    "BlockHash",
    "BlockPool",
    "FreeBlockQueue",
    "KVBlock",
    "KVCacheManager",
    "PrefixCacheStats",
    "hash_block_tokens",
]
