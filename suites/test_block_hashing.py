"""Chained block hashes: what enters a block's hash, and that it never depends on the process."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.kv import HASH_FUNCTIONS, ROOT_PARENT_HASH, KVCacheManager, hash_block_tokens
from engine.kv.hashing import hash_full_blocks
from suites.block_layer_oracle import ROOT_PARENT_STRING, reference_chain

SHA256 = HASH_FUNCTIONS["sha256"]
REPO_ROOT = Path(__file__).resolve().parent.parent

# sha256 chain of tokens 0..7 in blocks of 4, salt "golden": pinned so that golden files
# recording hashes stay valid; a change of byte layout must be deliberate.
PINNED_CHAIN_HEX = [
    "f2e6fa086507b251f644c444a42933c62484fd3e6dfdd22940374ebca571170a",
    "b0f25650f9004a3b2ea433bf01d86949b547b583c6d54eb14b98c4f9d2fcccca",
]


def test_same_block_tokens_after_a_different_parent_hash_differently():
    block = [5, 6, 7, 8]
    after_a = hash_full_blocks(SHA256, [1, 2, 3, 4] + block, 4, None)[1]
    after_b = hash_full_blocks(SHA256, [1, 2, 3, 9] + block, 4, None)[1]
    assert after_a != after_b
    assert hash_block_tokens(SHA256, ROOT_PARENT_HASH, block) != hash_block_tokens(SHA256, after_a, block)


def test_salt_enters_the_first_block_only_yet_changes_every_later_hash():
    tokens = list(range(12))
    salted = hash_full_blocks(SHA256, tokens, 4, "tenant-a")
    plain = hash_full_blocks(SHA256, tokens, 4, None)
    assert salted[0] == hash_block_tokens(SHA256, ROOT_PARENT_HASH, tokens[0:4], ("tenant-a",))
    # Later blocks carry no extra key of their own: the salt reaches them through the chain.
    assert salted[1] == hash_block_tokens(SHA256, salted[0], tokens[4:8])
    assert salted[2] == hash_block_tokens(SHA256, salted[1], tokens[8:12])
    assert all(s != p for s, p in zip(salted, plain, strict=True))


def test_extra_keys_are_length_prefixed_so_splits_never_collide():
    block = [1, 2, 3, 4]
    variants = [("ab",), ("a", "b"), ("ab", ""), ("", "ab"), ("a", "", "b"), ()]
    hashes = {hash_block_tokens(SHA256, ROOT_PARENT_HASH, block, keys) for keys in variants}
    assert len(hashes) == len(variants)


def test_root_parent_hash_is_sha256_of_its_documented_string():
    assert ROOT_PARENT_HASH == hashlib.sha256(ROOT_PARENT_STRING).digest()


@pytest.mark.parametrize("algorithm", ["sha256", "blake2b"])
@given(
    tokens=st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    salt=st.none() | st.text(max_size=6),
)
def test_block_hashes_follow_the_documented_byte_layout(algorithm, tokens, block_size, salt):
    engine_chain = hash_full_blocks(HASH_FUNCTIONS[algorithm], tokens, block_size, salt)
    assert engine_chain == reference_chain(algorithm, tokens, block_size, salt)


@given(
    tokens=st.lists(st.integers(0, 50), max_size=40),
    num_known_blocks=st.integers(0, 10),
    salt=st.none() | st.just("s"),
)
def test_extending_known_hashes_gives_the_chain_hashed_from_scratch(tokens, num_known_blocks, salt):
    from_scratch = hash_full_blocks(SHA256, tokens, 4, salt)
    known = from_scratch[:num_known_blocks]
    assert hash_full_blocks(SHA256, tokens, 4, salt, known) == from_scratch


def test_manager_hashes_with_sha256_by_default_and_blake2b_when_asked():
    tokens = list(range(9))
    for algorithm, digest_size in [(None, 32), ("sha256", 32), ("blake2b", 16)]:
        kwargs = {} if algorithm is None else {"hash_algorithm": algorithm}
        manager = KVCacheManager(num_blocks=4, block_size=4, **kwargs)
        manager.get_computed_blocks("r", tokens)
        manager.allocate_slots("r", tokens, len(tokens), 0)
        expected = reference_chain(algorithm or "sha256", tokens, 4, None)
        assert [block.block_hash for block in manager.blocks_of("r")[:2]] == expected
        assert {len(h) for h in manager.pool.cached_blocks} == {digest_size}


def test_block_hash_of_a_fixed_input_is_pinned():
    chain = hash_full_blocks(SHA256, list(range(8)), 4, "golden")
    assert [h.hex() for h in chain] == PINNED_CHAIN_HEX


def test_block_hashes_are_identical_in_a_fresh_process_with_another_hash_seed():
    script = (
        "from engine.kv import HASH_FUNCTIONS; from engine.kv.hashing import hash_full_blocks\n"
        "for algorithm in ('sha256', 'blake2b'):\n"
        "    chain = hash_full_blocks(HASH_FUNCTIONS[algorithm], list(range(8)), 4, 'golden')\n"
        "    print(*(h.hex() for h in chain))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    here = [
        h.hex()
        for algorithm in ("sha256", "blake2b")
        for h in hash_full_blocks(HASH_FUNCTIONS[algorithm], list(range(8)), 4, "golden")
    ]
    assert result.stdout.split() == here


def test_block_layer_imports_no_mlx():
    script = "import sys, engine.kv; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlx'))"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
