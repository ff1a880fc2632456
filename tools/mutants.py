"""Mutation testing of the conformance suites: does every catalogued fault get caught?

A conformance suite is worth the faults it catches. Each entry of ``CATALOGUE`` below is a
small, named, documented fault of the engine: one or more exact ``old -> new`` text
replacements, each asserted to apply exactly once, so an edit of the engine that moves the
text makes the tool refuse to run instead of silently testing nothing. Each mutant is applied
to its own temporary copy of the tree (never to the working tree) and the suites run against
it, fail-fast; the first failing test kills it. A mutant that survives means a missing test:
add the test to ``suites/``, never a special case here.

    tools/mutants                     # the whole catalogue against the suites (not -m real)
    tools/mutants --quick             # CI: a few cheap mutants against a fast test selection
    tools/mutants --jobs 1 --only hash-not-chained rope-not-offset
    tools/mutants --list              # the catalogue;  --show NAME: one mutant's diff
    tools/mutants --check-catalogue   # only check that every fault still applies, run nothing
    tools/mutants --json results/mutants.json

How a run works:
- the tree is copied once with ``git ls-files -co --exclude-standard`` (tracked and
  untracked, not ignored: what you are working on, uncommitted edits included), and every
  run starts from that one snapshot;
- every mutant is checked to apply before anything runs;
- a baseline run of the same test selection on the unmutated copy must pass, or no result
  means anything (a kill would only repeat an existing failure);
- pytest runs as ``python -m pytest`` from inside each copy, with the copy first on
  ``PYTHONPATH``, so the copy's ``engine`` is imported and not an editable install of the
  working tree; a small plugin written into the copy checks ``engine.__file__`` at start-up
  and stops the run otherwise;
- test files run fast ones first (the pure-Python block layer, then the model suites, the
  engine state machine last), so most mutants die within seconds;
- hypothesis does not shrink a failure (``--shrink`` to let it): a kill needs the failure,
  not its smallest example, and shrinking the engine state machine takes minutes;
- ``LD_PRELOAD`` is dropped and ``ENGINE_DEVICE`` defaults to ``cpu``, so the suites compare
  logits bit for bit, their sharpest check;
- a mutant that runs past ``--timeout`` counts as killed (status ``timeout``): a hanging suite
  does not pass.
Exit status: 0 when every mutant is killed, 1 when any survives, 2 when the run is invalid
(a mutant that does not apply, a failing baseline, a run that could not start).
"""

import argparse
import concurrent.futures
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent


# -- the catalogue ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Edit:
    """Replace ``old`` by ``new`` in ``path``; ``old`` must occur exactly once."""

    path: str
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class Mutant:
    name: str
    fault_class: str  # the fault class of issue 7 it belongs to, or "extra: ..." for more
    doc: str  # what the fault does, and what it breaks
    edits: tuple[Edit, ...]
    quick: bool = False  # part of the --quick subset


def mutant(name, fault_class, doc, *edits, quick=False) -> Mutant:
    return Mutant(name, fault_class, " ".join(doc.split()), tuple(Edit(*edit) for edit in edits), quick)


HASHING = "engine/kv/hashing.py"
POOL = "engine/kv/block_pool.py"
MANAGER = "engine/kv/manager.py"
SCHEDULER = "engine/scheduler.py"
ATTENTION = "engine/runner/paged_attention.py"
DECODE_CONTEXT = "engine/runner/decode_context.py"
RUNNER = "engine/runner/model_runner.py"
SAMPLING = "engine/sampling.py"
LLM_FACADE = "engine/llm.py"

CATALOGUE: list[Mutant] = [
    # Hashing.
    mutant(
        "hash-not-chained",
        "hash not chained to the parent",
        """A block's hash covers its own tokens (and salt) but not its parent's hash: equal
        blocks after different prefixes share a hash, so a hit can serve KV computed after
        another prefix.""",
        (HASHING, "            parent_hash,\n            struct.pack(", "            ROOT_PARENT_HASH,\n            struct.pack("),
        quick=True,
    ),
    mutant(
        "hash-extension-restarts-chain",
        "hash not chained to the parent",
        """Extending a request's known hashes (blocks filled by a later chunk or by decode)
        starts again from the root instead of the last known hash.""",
        (HASHING, "    parent = hashes[-1] if hashes else ROOT_PARENT_HASH\n", "    parent = ROOT_PARENT_HASH\n"),
    ),
    mutant(
        "hash-ignores-salt",
        "hash ignoring the salt",
        """The cache salt never enters the first block's hash: requests with different salts
        share blocks.""",
        (HASHING, "        extra = (cache_salt,) if start == 0 and cache_salt is not None else ()", "        extra = ()"),
        quick=True,
    ),
    mutant(
        "salt-dropped-after-admission",
        "hash ignoring the salt",
        """The scheduler passes the cache salt when it admits a request but not when it
        allocates its later chunks and decode steps. Admission hashes every full block of
        the prompt, so only a first block that a decode step fills (a salted prompt
        shorter than a block) is hashed without the salt, and shared across tenants.""",
        (SCHEDULER, "            cache_salt=request.cache_salt,\n", ""),
    ),
    mutant(
        "salt-on-every-block",
        "extra: hash layout",
        """The salt is an extra key of every block instead of the first one only: the
        documented (and pinned) hash layout changes.""",
        (HASHING, "if start == 0 and cache_salt is not None", "if cache_salt is not None"),
    ),
    mutant(
        "partial-block-cached",
        "partial block cached",
        """The last, partly filled block of a request is hashed and cached like a full one.""",
        (HASHING, "len(token_ids) - block_size + 1, block_size)", "len(token_ids), block_size)"),
        (MANAGER, "        num_full = len(token_ids) // self.block_size\n", "        num_full = -(-len(token_ids) // self.block_size)\n"),
    ),
    # Hits.
    mutant(
        "full-hit-not-recomputed",
        "a full hit that does not recompute the last token",
        """A prompt of exactly k blocks hits all k of them: nothing is left to compute, so
        there are no logits to sample its first token from.""",
        (MANAGER, "        return (num_tokens - 1) // self.block_size\n", "        return num_tokens // self.block_size\n"),
        quick=True,
    ),
    mutant(
        "hit-cap-one-block-short",
        "hit cap off by one block",
        """The hit cap is floor((n - 1) / block_size) - 1 blocks: every hit is a block
        shorter than the rule allows.""",
        (MANAGER, "        return (num_tokens - 1) // self.block_size\n", "        return (num_tokens - 1) // self.block_size - 1\n"),
    ),
    mutant(
        "hit-run-not-contiguous",
        "extra: longest run from the start",
        """A lookup skips a missing block and goes on hitting the blocks after it, instead
        of stopping at the first miss.""",
        (MANAGER, "            if block is None:\n                break\n", "            if block is None:\n                continue\n"),
    ),
    mutant(
        "reused-hash-not-checked",
        "a reused block's hash not checked",
        """A cached block is served on its hash alone; the tokens it holds are not compared,
        so a hash collision serves another prompt's KV.""",
        (POOL, "        if block.token_ids != tuple(token_ids):\n            return None\n", ""),
    ),
    # The pool: references, the free queue, eviction.
    mutant(
        "ref-count-not-taken-on-hit",
        "ref count not taken on a hit",
        """A hit takes a free block out of the free queue but a block already in use gets no
        extra reference: when its first user finishes, it is freed under the second.""",
        (POOL, "            block.ref_count += 1\n", "            block.ref_count = max(block.ref_count, 1)\n"),
        quick=True,
    ),
    mutant(
        "hit-left-in-free-queue",
        "a block in use evicted",
        """A hit on a free cached block takes a reference but leaves the block in the free
        queue, where the next allocation evicts it while it is in use.""",
        (POOL, "            if block.ref_count == 0:\n                self.free_queue.remove(block)\n", ""),
    ),
    mutant(
        "hit-evicted-by-own-allocation",
        "a block in use evicted",
        """The request's new blocks are allocated before its hits are touched, so the
        allocation can evict (and reuse) the very block the request just hit.""",
        (
            MANAGER,
            "        self.pool.touch(new_computed_blocks)\n        new_blocks = self.pool.allocate(num_new_blocks)\n",
            "        new_blocks = self.pool.allocate(num_new_blocks)\n        self.pool.touch(new_computed_blocks)\n",
        ),
    ),
    mutant(
        "free-head-first",
        "head-first instead of tail-first freeing",
        """A request's blocks are freed in table order, so among cached blocks freed
        together the start of a chain is evicted before its tail.""",
        (MANAGER, "self.pool.free(reversed(table))", "self.pool.free(table)"),
        quick=True,
    ),
    mutant(
        "uncached-freed-to-tail",
        "extra: eviction order",
        """A freed block that holds no hash joins the tail of the free queue like a cached
        one (the order before issue 12), so an allocation can evict a cached prefix while
        an uncached block, which can never serve a hit, waits behind it.""",
        (POOL, "                if block.block_hash is None:\n", "                if False:\n"),
        quick=True,
    ),
    mutant(
        "evict-most-recent-first",
        "extra: eviction order",
        """Allocation takes the most recently freed block instead of the least recently
        used one.""",
        (POOL, "        block = self._head.next_free\n", "        block = self._tail.prev_free\n"),
    ),
    mutant(
        "hash-kept-after-eviction",
        "hash kept after eviction",
        """An evicted block stays in the hash -> block map: a lookup can find a block that no
        longer holds the prefix (only the token check stands in the way).""",
        (
            POOL,
            (
                "        same_hash = self.cached_blocks[block.block_hash]\n"
                "        del same_hash[block.block_id]\n"
                "        if not same_hash:\n"
                "            del self.cached_blocks[block.block_hash]\n"
            ),
            "",
        ),
    ),
    mutant(
        "free-hits-not-counted-against-capacity",
        "extra: allocation that does not fit",
        """Hit blocks that sit in the free queue are not counted against free capacity: an
        allocation that does not fit is not refused cleanly.""",
        (
            MANAGER,
            "num_hits_leaving_free_queue = sum(1 for block in new_computed_blocks if block.ref_count == 0)",
            "num_hits_leaving_free_queue = 0",
        ),
    ),
    mutant(
        "later-blocks-never-cached",
        "extra: blocks filled after admission",
        """Only admission caches full blocks: blocks completed by a later prefill chunk or by
        decode are never cached.""",
        (
            MANAGER,
            "        if self.enable_caching:\n            self._num_cached_blocks.setdefault",
            (
                "        if self.enable_caching and (new_computed_blocks or num_computed_tokens == 0):\n"
                "            self._num_cached_blocks.setdefault"
            ),
        ),
    ),
    mutant(
        "reset-while-in-use",
        "reset allowed while blocks are in use",
        """reset_prefix_cache forgets every hash even while requests hold blocks.""",
        (POOL, "        if self.num_used_blocks > 0:\n            return False\n", ""),
        quick=True,
    ),
    # Counters.
    mutant(
        "hits-counted-in-blocks",
        "counters counting blocks instead of tokens",
        """The hits counter adds hit blocks, not hit tokens.""",
        (MANAGER, "        self.stats.hits += num_hit_tokens\n", "        self.stats.hits += num_hit_tokens // self.block_size\n"),
        quick=True,
    ),
    mutant(
        "queries-counted-in-blocks",
        "counters counting blocks instead of tokens",
        """The queries counter adds the prompt's blocks (rounded up), not its tokens.""",
        (MANAGER, "        self.stats.queries += num_tokens\n", "        self.stats.queries += -(-num_tokens // self.block_size)\n"),
    ),
    mutant(
        "counters-move-with-caching-off",
        "counters moving with caching off",
        """An admission counts its lookup (requests, queries) even with caching off.""",
        (
            MANAGER,
            "        if self.enable_caching:\n            self._record_lookup(len(token_ids), num_hit_tokens)\n",
            "        self._record_lookup(len(token_ids), num_hit_tokens)\n",
        ),
    ),
    mutant(
        "refused-admission-counted",
        "extra: counters",
        """An admission that does not fit still counts its lookup, so the counters depend on
        how often a request had to wait.""",
        (
            MANAGER,
            (
                "        if allocated is None:\n            return None\n"
                "        if self.enable_caching:\n            self._record_lookup(len(token_ids), num_hit_tokens)\n"
            ),
            (
                "        if self.enable_caching:\n            self._record_lookup(len(token_ids), num_hit_tokens)\n"
                "        if allocated is None:\n            return None\n"
            ),
        ),
    ),
    mutant(
        "num-cached-tokens-overwritten-on-resume",
        "extra: counters",
        """A preempted request's num_cached_tokens is overwritten by the hit of its
        re-admission, instead of keeping the hit of its first admission (vLLM's meaning).""",
        (SCHEDULER, "            if request.num_cached_tokens is None:\n", "            if True:\n"),
    ),
    mutant(
        "cached-count-kept-across-preemption",
        "extra: preemption",
        """Freeing a request forgets its block table but not how many of its blocks were
        cached: recomputed after a preemption, it skips caching that many blocks again.""",
        (MANAGER, "        self._num_cached_blocks.pop(request_id, None)\n", ""),
    ),
    # Scheduler: preemption and chunked prefill.
    mutant(
        "preemption-keeps-blocks",
        "preemption that keeps its blocks",
        """A preempted request goes back to the waiting queue without freeing its blocks.""",
        (
            SCHEDULER,
            "    def _preempt(self, request: Request) -> None:\n        self.kv.free(request.request_id)\n",
            "    def _preempt(self, request: Request) -> None:\n",
        ),
    ),
    mutant(
        "preempt-oldest",
        "extra: preemption",
        """The victim of a preemption is the oldest running request, which may already be
        scheduled in this step, instead of the newest.""",
        (SCHEDULER, "victim = self.running.pop()", "victim = self.running.pop(0)"),
    ),
    mutant(
        "budget-ignored-by-running-chunks",
        "extra: token budget",
        """A running request's next prefill chunk takes all its remaining tokens, whatever
        is left of the step's token budget: long prefills are not chunked.""",
        (
            SCHEDULER,
            "            num_new = min(request.num_tokens - request.num_computed_tokens, budget)\n",
            "            num_new = request.num_tokens - request.num_computed_tokens\n",
        ),
    ),
    mutant(
        "admissions-not-charged-to-budget",
        "extra: token budget",
        """Admitted requests do not spend the step's token budget: every admission of a
        step may take the whole budget.""",
        (SCHEDULER, "            budget -= num_new\n        return scheduled\n", "        return scheduled\n"),
    ),
    mutant(
        "chunk-boundary-drops-token",
        "chunked prefill that drops or repeats a token at a chunk boundary",
        """After a prefill chunk that ends inside the prompt, the next chunk starts one
        token late: the boundary token's KV is never computed.""",
        (
            SCHEDULER,
            "            request.num_computed_tokens = chunk.start_pos + chunk.num_tokens\n",
            (
                "            end = chunk.start_pos + chunk.num_tokens\n"
                "            request.num_computed_tokens = end + (end < len(request.prompt_token_ids))\n"
            ),
        ),
    ),
    mutant(
        "chunk-boundary-repeats-token",
        "chunked prefill that drops or repeats a token at a chunk boundary",
        """A prefill chunk that continues an earlier chunk takes its tokens from one position
        early: the previous chunk's last token is fed again at the boundary (and every later
        token of the chunk shifted by one). Recomputing the boundary token at its own
        position would be an equivalent mutant: it rewrites identical K/V.""",
        (
            SCHEDULER,
            "        return self.request.token_ids[self.start_pos : self.start_pos + self.num_tokens]\n",
            (
                "        start = self.start_pos\n"
                "        if (self.request.num_cached_tokens or 0) < start < len(self.request.prompt_token_ids):\n"
                "            start -= 1\n"
                "        return self.request.token_ids[start : start + self.num_tokens]\n"
            ),
        ),
    ),
    # Runner: positions and slots.
    mutant(
        "rope-not-offset",
        "RoPE positions not offset by start_pos",
        """A prefill chunk at start_pos > 0 rotates its keys and queries as if it started at
        position 0.""",
        (ATTENTION, "        offsets=start_pos,\n", "        offsets=0,\n"),
        quick=True,
    ),
    mutant(
        "prefill-piece-rope-not-offset",
        "RoPE positions not offset by start_pos",
        """The runner splits a long chunk into forwards of max_prefill_tokens; every piece
        is rotated from the chunk's start_pos instead of its own.""",
        (RUNNER, "prefill_batch(self.pool, tables, start_pos + offset, stop - offset)", "prefill_batch(self.pool, tables, start_pos, stop - offset)"),
    ),
    mutant(
        "decode-rope-off-by-one",
        "extra: RoPE positions of one-token rows",
        """A one-token row (a decode, or a chunk's last token) is rotated one position
        further than it is.""",
        (DECODE_CONTEXT, "            offsets=mx.array((lens - 1).astype(np.int32)),\n",
         "            offsets=mx.array(lens.astype(np.int32)),\n"),
    ),
    mutant(
        "new-kv-over-cached-slots",
        "new K/V written over cached slots",
        """A prefill chunk at start_pos writes its new K/V into the first slots of its block
        table, over the cached prefix, instead of from start_pos on.""",
        (ATTENTION, "pool.rows(context[:, start_pos:])", "pool.rows(context[:, :num_tokens])"),
    ),
    mutant(
        "decode-slot-after-boundary",
        "slot of the first decode token after a block boundary off by one",
        """A one-token row at the first position of a block writes its K/V into the previous
        block (slot 0 of block p // bs - 1) instead of its own new block.""",
        (
            DECODE_CONTEXT,
            "blocks = np.array([table[position // block_size] for table, position",
            "blocks = np.array([table[(position - 1) // block_size] for table, position",
        ),
    ),
    mutant(
        "batched-prefill-ignores-start-pos",
        "RoPE positions not offset by start_pos",
        """Consecutive prefill chunks of one length share a forward even when they start at
        different positions: all rows run at the first chunk's start_pos.""",
        (
            RUNNER,
            "while stop < len(others) and (chunks[others[stop]].start_pos, chunks[others[stop]].num_tokens) == shape:",
            "while stop < len(others) and chunks[others[stop]].num_tokens == shape[1]:",
        ),
    ),
    mutant(
        "decode-rows-unmasked",
        "extra: padded keys",
        """One-token rows of different lengths in one forward attend over each other's
        padding: the key mask is dropped.""",
        (DECODE_CONTEXT, "        if (lens != context_len).any():\n", "        if False:\n"),
    ),
    mutant(
        "prefill-chunk-keeps-stale-row",
        "chunked prefill that drops or repeats a token at a chunk boundary",
        """A prefill chunk of a request that already has a decode-context row (its previous
        chunk's last token) adds a second row instead of replacing it: the old row lacks the
        positions the chunk wrote to the pool only.""",
        (DECODE_CONTEXT, "        self.drop(set(request_ids))\n        first = len(self.request_ids)\n",
         "        first = len(self.request_ids)\n"),
    ),
    mutant(
        "prefill-piece-drops-token",
        "chunked prefill that drops or repeats a token at a chunk boundary",
        """The runner splits a long chunk into forwards of max_prefill_tokens; the next
        piece starts one token late, so the token at each piece boundary is never
        written.""",
        (
            RUNNER,
            "        for offset in range(0, last, self.max_prefill_tokens):\n",
            "        for offset in range(0, last, self.max_prefill_tokens + 1):\n",
        ),
    ),
    # Sampling.
    mutant(
        "sampler-state-shared",
        "the seeded sampler's state shared across requests",
        """Seeded requests draw from one generator per seed, kept across requests: two
        requests with the same seed (or one request run twice) draw different numbers.""",
        (SAMPLING, "import numpy as np\n", "import numpy as np\n\n_GENERATORS: dict = {}\n"),
        (
            SAMPLING,
            "    draw = np.random.default_rng([seed, step]).random()\n",
            "    draw = _GENERATORS.setdefault(seed, np.random.default_rng(seed)).random()\n",
        ),
        quick=True,
    ),
    mutant(
        "unseeded-requests-share-seed",
        "the seeded sampler's state shared across requests",
        """A request without a seed gets seed 0 instead of a fresh random one: every
        unseeded request draws the same numbers.""",
        (LLM_FACADE, "else random.getrandbits(63)", "else 0"),
    ),
    mutant(
        "temperature-ignored",
        "extra: sampler",
        """Seeded sampling draws from softmax(logits) whatever the temperature.""",
        (SAMPLING, "    scaled = logits.astype(np.float64) / params.temperature\n", "    scaled = logits.astype(np.float64)\n"),
    ),
    mutant(
        "top-k-ignored",
        "extra: sampler",
        """top_k is accepted but never cuts the candidates.""",
        (SAMPLING, "    if params.top_k:\n        order = order[: params.top_k]\n", ""),
    ),
    mutant(
        "top-p-keeps-one-more",
        "extra: sampler",
        """top_p keeps one token more than the smallest head whose mass reaches top_p.""",
        (
            SAMPLING,
            "keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1",
            "keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 2",
        ),
    ),
    # The step launched ahead of its turn (before the host has the previous step's tokens).
    mutant(
        "step-ahead-evicts",
        "extra: step ahead",
        """A step launched ahead takes new blocks wherever they are free, cached ones too: a
        request that then samples a stop token never needed its block, but the cached
        prefix that the block held is gone.""",
        (SCHEDULER, "if not self.kv.can_allocate_without_eviction(new_blocks):",
         "if self.kv.pool.num_free_blocks < new_blocks:"),
    ),
    mutant(
        "step-ahead-never-caches",
        "extra: step ahead",
        """A block completed by a step launched ahead is never cached once its last token is
        known: a prompt that continues a finished request's output misses it.""",
        (SCHEDULER, "self.kv.cache_full_blocks(request.request_id, request.token_ids[:computed]",
         "(request.request_id, request.token_ids[:computed]"),
    ),
    mutant(
        "step-ahead-while-waiting",
        "extra: step ahead",
        """A step is launched ahead while requests wait: a seat freed by a stop token in the
        step before goes unused for a step, and the waiting request is admitted late.""",
        (SCHEDULER, "if self.waiting or any(", "if any("),
    ),
    mutant(
        "step-ahead-past-max-tokens",
        "extra: step ahead",
        """A request whose output count reaches max_tokens in this step is still scheduled
        in the step ahead: a wasted row every time a request finishes by length.""",
        (SCHEDULER, "len(r.output_token_ids) + 1 < r.sampling.max_tokens", "len(r.output_token_ids) < r.sampling.max_tokens"),
    ),
    mutant(
        "step-ahead-reports-aborted",
        "extra: step ahead",
        """A request aborted while its step ran ahead still gets that step's token (and, at
        its last token, is finished a second time).""",
        (LLM_FACADE, "            if request.request_id not in self._live:\n                continue  # aborted while its step ran\n", ""),
    ),
    mutant(
        "abort-keeps-stale-step-ahead",
        "extra: step ahead",
        """After every request of a step launched ahead is aborted, the engine still reads
        that step at its next call, instead of scheduling the requests that wait.""",
        (LLM_FACADE, "            self._ahead = None  # its rows, still computing, are never read\n", "            pass\n"),
    ),
    mutant(
        "decode-kv-never-flushed-before-prefill",
        "extra: decode K/V held in the context",
        """A decode row's new K/V, held in the decode context alone, is not copied to the pool
        before a step's prefill forwards: a request admitted while another decodes reads the
        blocks that decodes completed (cached, served) from pool slots never written.""",
        (RUNNER, "        if others:\n            # The prefill forwards read the pool", "        if False:\n            # The prefill forwards read the pool"),
    ),
    mutant(
        "decode-kv-lost-when-row-leaves",
        "extra: decode K/V held in the context",
        """A leaving decode row (finished, preempted, left out) is dropped with the positions it
        held alone: its request's cached blocks hold pool slots that were never written.""",
        (DECODE_CONTEXT, "        self.flush()  # a leaving row's", "        pass  # a leaving row's"),
    ),
    mutant(
        "fed-back-rows-misordered",
        "extra: step ahead",
        """Tokens fed back on the device go to the decode rows in schedule order instead of
        the decode context's row order: after a row moved, rows decode each other's tokens.""",
        (RUNNER, "mx.array([rows[index].fed_back_row for index in order])", "mx.array([row.fed_back_row for row in rows])"),
    ),
]

# The quick subset's tests: fast, and enough to kill every mutant marked quick.
QUICK_TESTS = [
    "suites/test_block_hashing.py",
    "suites/test_kv_prefix_cache.py",
    "suites/test_paged_attention.py::test_prefill_from_start_pos_uses_rope_positions_from_start_pos",
    "suites/test_cache_on_equals_cache_off.py::test_full_hit_still_computes_the_last_prompt_token",
    "suites/test_sampling.py::test_two_requests_with_one_seed_do_not_share_sampler_state",
]

# Test files, fast first: a kill usually comes from one of the first files. Files not named
# here run in between, in name order.
FIRST_FILES = ["test_block_hashing.py", "test_kv_prefix_cache.py", "test_block_layer_stateful.py"]
LAST_FILES = ["test_golden.py", "test_engine_stateful.py", "test_real_model.py"]
# Never run against a mutant: it checks this catalogue against the sources, which a mutated
# copy fails by construction, so it would kill every mutant that reached it.
NOT_RUN = ["test_mutant_catalogue.py"]


# -- applying a mutant -------------------------------------------------------------------


class CatalogueError(Exception):
    pass


def mutated_sources(m: Mutant, root: Path) -> dict[str, tuple[str, str]]:
    """path -> (original, mutated) text; raises CatalogueError unless every edit applies once."""
    texts: dict[str, tuple[str, str]] = {}
    for edit in m.edits:
        original, text = texts.get(edit.path) or ((root / edit.path).read_text(),) * 2
        count = text.count(edit.old)
        if count != 1:
            raise CatalogueError(f"{m.name}: {edit.path}: the text to replace occurs {count} times, not once: {edit.old!r}")
        texts[edit.path] = (original, text.replace(edit.old, edit.new))
    return texts


def check_catalogue(mutants: list[Mutant], root: Path) -> list[str]:
    problems = []
    names = [m.name for m in mutants]
    problems += [f"duplicate mutant name {name!r}" for name in sorted({n for n in names if names.count(n) > 1})]
    for m in mutants:
        try:
            mutated_sources(m, root)
        except CatalogueError as error:
            problems.append(str(error))
        except OSError as error:
            problems.append(f"{m.name}: {error}")
    return problems


def diff_of(m: Mutant, root: Path) -> str:
    lines = []
    for path, (original, mutated) in mutated_sources(m, root).items():
        lines += difflib.unified_diff(
            original.splitlines(keepends=True), mutated.splitlines(keepends=True), f"a/{path}", f"b/{path}", n=2
        )
    return "".join(lines)


# -- copies of the tree and pytest runs --------------------------------------------------

PLUGIN = '''"""Written by tools/mutants into a temporary copy of the tree; not part of the project."""

import os
from pathlib import Path

import pytest


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    import engine

    root = Path(os.environ["MUTANTS_COPY_ROOT"]).resolve()
    where = Path(engine.__file__).resolve()
    if root not in where.parents:
        raise pytest.UsageError(f"tools/mutants: engine imported from {where}, not from the copy {root}")
    if os.environ.get("MUTANTS_NO_SHRINK") == "1":
        from hypothesis import Phase, settings

        # conftest.py has loaded its profile by now; keep it, minus shrinking.
        settings.register_profile("mutants", settings(phases=[Phase.explicit, Phase.reuse, Phase.generate]))
        settings.load_profile("mutants")
'''

PLUGIN_MODULE = "_mutants_plugin"


def tree_files(root: Path) -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, check=True,
        ).stdout
        return sorted({p for p in out.decode().split("\0") if p and (root / p).is_file()})
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but caches
        skip = {".git", ".tox", ".venv", "venv", ".ci-venv", "__pycache__", ".hypothesis", ".pytest_cache"}
        return sorted(
            str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(root).parts)
        )


def snapshot_tree(root: Path, target: Path) -> Path:
    """One copy of the tree that every run starts from: edits made to the working tree
    while the tool runs (others work in it too) reach no run, so all runs see one tree."""
    for rel in tree_files(root):
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target / rel)
    return target


def make_copy(tree: Path, m: Mutant | None, parent: Path) -> Path:
    copy = Path(tempfile.mkdtemp(prefix=f"{m.name if m else 'baseline'}-", dir=parent))
    shutil.copytree(tree, copy, dirs_exist_ok=True)
    if m is not None:
        for path, (_, mutated) in mutated_sources(m, copy).items():
            (copy / path).write_text(mutated)
    (copy / f"{PLUGIN_MODULE}.py").write_text(PLUGIN)
    return copy


def ordered_test_files(copy: Path) -> list[str]:
    names = sorted(p.name for p in (copy / "suites").glob("test_*.py") if p.name not in NOT_RUN)
    first = [n for n in FIRST_FILES if n in names]
    last = [n for n in LAST_FILES if n in names]
    middle = [n for n in names if n not in first and n not in last]
    return [f"suites/{n}" for n in first + middle + last]


@dataclass(slots=True)
class Result:
    name: str
    fault_class: str
    status: str  # killed, survived, timeout, error
    killed_by: str | None
    reason: str | None
    seconds: float
    description: str = ""
    files: list[str] = field(default_factory=list)

    @property
    def killed(self) -> bool:
        return self.status in ("killed", "timeout")


SUMMARY_LINE = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$")


def run_pytest(copy: Path, selection: list[str] | None, args: argparse.Namespace) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, output, seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["MUTANTS_COPY_ROOT"] = str(copy)
    env["MUTANTS_NO_SHRINK"] = "0" if args.shrink else "1"
    env.setdefault("ENGINE_DEVICE", "cpu")
    env["COLUMNS"] = "240"  # room for the failure message in pytest's summary line
    command = [
        sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider",
        "-p", PLUGIN_MODULE, "-m", args.marker, *args.pytest_args, *(selection or ordered_test_files(copy)),
    ]
    start = time.perf_counter()
    with open(copy / "pytest.log", "w") as log:
        process = subprocess.Popen(command, cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the whole session this run started, and nothing else
            process.wait()
            code = None
    return code, (copy / "pytest.log").read_text(errors="replace"), time.perf_counter() - start


def first_failure(output: str) -> tuple[str | None, str | None]:
    for line in output.splitlines():
        match = SUMMARY_LINE.match(line.strip())
        if match:
            return match.group(2), (match.group(3) or match.group(1)).strip()[:200]
    return None, None


def evaluate(m: Mutant, code: int | None, output: str, seconds: float) -> Result:
    files = sorted({edit.path for edit in m.edits})
    killed_by, reason = first_failure(output)
    if code is None:
        status, reason = "timeout", "ran past --timeout"
    elif code == 0:
        status = "survived"
    elif code in (1, 2) and killed_by:
        status = "killed"
    else:
        status, reason = "error", f"pytest exit status {code}: " + " | ".join(output.strip().splitlines()[-3:])
    return Result(m.name, m.fault_class, status, killed_by, reason, round(seconds, 1), m.doc, files)


# -- the command line --------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the mutants marked quick, against QUICK_TESTS (CI)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run in parallel (default 2)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write score, killed, total and per-mutant rows here")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run before it counts as killed (default 900)")
    parser.add_argument("--marker", default="not real", help="pytest -m expression (default: 'not real', the slow real-model suite)")
    parser.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[], help="passed to pytest (last option)")
    parser.add_argument("--shrink", action="store_true", help="let hypothesis shrink failures (slower kills)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (results may mean nothing)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (paths printed)")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.add_argument("--show", metavar="NAME", help="print one mutant's diff and exit")
    parser.add_argument(
        "--check-catalogue", action="store_true",
        help="only check that every mutant's edits apply exactly once to the sources (no test run), and exit",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return args


def select(args: argparse.Namespace) -> list[Mutant]:
    mutants = [m for m in CATALOGUE if m.quick] if args.quick else list(CATALOGUE)
    if args.only:
        known = {m.name for m in CATALOGUE}
        unknown = [name for name in args.only if name not in known]
        if unknown:
            sys.exit(f"tools/mutants: unknown mutant(s) {', '.join(unknown)}; see --list")
        mutants = [m for m in CATALOGUE if m.name in args.only]
    return mutants


def table(results: list[Result]) -> list[str]:
    rows = [("mutant", "fault class", "status", "killed by", "time")]
    rows += [(r.name, r.fault_class, r.status, r.killed_by or "-", f"{r.seconds:.1f} s") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
        if index == 0:
            lines.append("  ".join("-" * width for width in widths) + "  " + "-" * 6)
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for m in CATALOGUE:
            print(f"{m.name}{'  [quick]' if m.quick else ''}\n    class: {m.fault_class}\n    {m.doc}\n")
        return 0
    if args.show:
        matches = [m for m in CATALOGUE if m.name == args.show]
        if not matches:
            sys.exit(f"tools/mutants: unknown mutant {args.show!r}; see --list")
        m = matches[0]
        print(f"# {m.name}: {m.doc}\n{diff_of(m, REPO_ROOT)}", end="")
        return 0
    mutants = select(args)
    problems = check_catalogue(mutants, REPO_ROOT)
    if problems:
        print("tools/mutants: the catalogue does not apply to this tree:", *problems, sep="\n  ", file=sys.stderr)
        return 2
    if args.check_catalogue:
        print(f"all {len(mutants)} mutants apply exactly once")
        return 0

    selection = QUICK_TESTS if args.quick else None
    workdir = Path(tempfile.mkdtemp(prefix="mutants-"))
    tree = snapshot_tree(REPO_ROOT, workdir / "tree")
    problems = check_catalogue(mutants, tree)
    if problems:  # the working tree changed since the check above
        print("tools/mutants: the catalogue does not apply to this tree:", *problems, sep="\n  ", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        return 2
    if "LD_PRELOAD" in os.environ:
        print("tools/mutants: LD_PRELOAD dropped for the pytest runs (bit-exact checks need the reference BLAS)")
    print(f"{len(mutants)} mutants, {args.jobs} at a time, copies under {workdir}")
    wall_start = time.perf_counter()
    baseline_seconds = None
    results: dict[str, Result] = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures: dict[concurrent.futures.Future, Mutant | None] = {}
            if not args.no_baseline:  # first, so that --jobs 1 runs it before any mutant
                futures[pool.submit(run_pytest, make_copy(tree, None, workdir), selection, args)] = None

            def run_one(m: Mutant) -> Result:
                copy = make_copy(tree, m, workdir)
                code, output, seconds = run_pytest(copy, selection, args)
                if not args.keep:
                    shutil.rmtree(copy, ignore_errors=True)
                return evaluate(m, code, output, seconds)

            futures.update({pool.submit(run_one, m): m for m in mutants})
            # disable=None: a bar on a terminal, plain per-mutant lines in a CI log.
            with tqdm(total=len(mutants), unit="mutant", dynamic_ncols=True, file=sys.stderr, disable=None) as bar:
                for future in concurrent.futures.as_completed(futures):
                    if futures[future] is None:
                        code, output, baseline_seconds = future.result()
                        if code != 0:
                            for pending in futures:
                                pending.cancel()
                            bar.close()
                            print(f"tools/mutants: the unmutated tree fails its own tests (exit {code}); no result counts:", file=sys.stderr)
                            print("\n".join(output.splitlines()[-25:]), file=sys.stderr)
                            return 2
                        bar.write(f"baseline  passes ({baseline_seconds:.1f} s)")
                        continue
                    result = future.result()
                    results[result.name] = result
                    killed = sum(r.killed for r in results.values())
                    bar.set_postfix_str(f"killed {killed}/{len(results)}")
                    bar.update()
                    where = f" by {result.killed_by}" if result.killed_by else ""
                    bar.write(f"{result.status:>8}  {result.name}{where}  ({result.seconds:.1f} s)")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    ordered = [results[m.name] for m in mutants]
    wall = time.perf_counter() - wall_start
    killed = sum(r.killed for r in ordered)
    score = killed / len(ordered) if ordered else 1.0
    print()
    print("\n".join(table(ordered)))
    print()
    for r in ordered:
        if not r.killed:
            print(f"{r.status.upper()}: {r.name} ({r.fault_class}): {r.description}" + (f" [{r.reason}]" if r.reason else ""))
    baseline_note = f"; baseline {baseline_seconds:.1f} s" if baseline_seconds is not None else ""
    print(f"mutation score: {killed}/{len(ordered)} = {score:.1%} in {wall:.0f} s with --jobs {args.jobs}{baseline_note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "score": score,
            "killed": killed,
            "total": len(ordered),
            "quick": args.quick,
            "jobs": args.jobs,
            "wall_seconds": round(wall, 1),
            "baseline_seconds": None if baseline_seconds is None else round(baseline_seconds, 1),
            "mutants": [
                {
                    "name": r.name,
                    "fault_class": r.fault_class,
                    "files": r.files,
                    "status": r.status,
                    "killed": r.killed,
                    "killed_by": r.killed_by,
                    "reason": r.reason,
                    "seconds": r.seconds,
                    "description": r.description,
                }
                for r in ordered
            ],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if any(r.status == "error" for r in ordered):
        return 2
    return 0 if killed == len(ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
