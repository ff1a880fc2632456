"""Chained block hashes.

A full block's hash covers its parent's hash, its token ids and its extra keys, so equal
hashes mean equal prefixes, not merely equal blocks. The cache salt is an extra key of the
first block only: every later block inherits it through the chain.

The first block's parent is ``ROOT_PARENT_HASH``, a fixed constant (the sha256 of a
documented string), so hashes are the same in every process and on every machine; vLLM
seeds it from ``PYTHONHASHSEED`` instead, which we avoid so golden files can record hashes.
"""

import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)

ROOT_PARENT_HASH = BlockHash(hashlib.sha256(b"mlx-prefix-conformance/root-block").digest())

# sha256 is the default (collision resistant, hardware accelerated on most CPUs);
# blake2b with a 16-byte digest is faster in pure software and still collision resistant.
HASH_FUNCTIONS: dict[str, Callable[[bytes], bytes]] = {
    "sha256": lambda data: hashlib.sha256(data).digest(),
    "blake2b": lambda data: hashlib.blake2b(data, digest_size=16).digest(),
}


def _encode_extra_keys(extra_keys: tuple[str, ...]) -> bytes:
    # Length-prefixed so ("ab",) and ("a", "b") never encode alike.
    parts = []
    for key in extra_keys:
        raw = key.encode("utf-8")
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def hash_block_tokens(
    hash_function: Callable[[bytes], bytes],
    parent_hash: BlockHash,
    token_ids: Sequence[int],
    extra_keys: tuple[str, ...] = (),
) -> BlockHash:
    """Hash one full block: parent hash, then the token ids, then the extra keys."""
    payload = b"".join(
        (
            parent_hash,
            struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids),
            _encode_extra_keys(extra_keys),
        )
    )
    return BlockHash(hash_function(payload))


def hash_full_blocks(
    hash_function: Callable[[bytes], bytes],
    token_ids: Sequence[int],
    block_size: int,
    cache_salt: str | None,
    known: Sequence[BlockHash] = (),
) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids``, extending the already ``known`` ones."""
    hashes = list(known)
    parent = hashes[-1] if hashes else ROOT_PARENT_HASH
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        extra = (cache_salt,) if start == 0 and cache_salt is not None else ()
        parent = hash_block_tokens(hash_function, parent, token_ids[start : start + block_size], extra)
        hashes.append(parent)
    return hashes
