"""Paged KV cache bookkeeping: fixed-size blocks of token slots, and automatic prefix caching.

The cache is `num_blocks` blocks of `block_size` token slots each (PagedAttention, Kwon et al.
2023). A sequence owns a block table, the list of blocks its tokens live in, in order; its token
at position p sits in slot `block_table[p // block_size] * block_size + p % block_size`.

Prefix caching (as vLLM's "automatic prefix caching"): once a block is full, it is named by a hash
chained over everything before it, hash(parent's hash, tokens of this block), with the tenant's
salt folded into the first link. A new sequence whose leading blocks hash the same reuses those
blocks instead of computing them: the keys and values in a block depend only on the tokens up to
its end, which is exactly what the chain covers. The salt keeps one tenant's cache from answering
another's (a hit is visible as a faster first token, which would leak whether someone else sent a
prompt).

Blocks are reference counted. A full, hashed block nobody uses stays cached and joins an LRU list;
allocation takes never-hashed free blocks first, then evicts the least recently used cached one.
Only full blocks are ever shared, and a sequence writes only into its own last, partial block, so
shared blocks are never written.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np

from lmforge.engine.sequence import Sequence


def block_hash(parent: bytes | None, token_ids: list[int], salt: bytes = b"") -> bytes:
    """The chained name of a full block: sha256 over the parent's hash (or the salt, first block)
    and the block's tokens. A cryptographic hash, since a collision would serve one prompt's keys
    for another's tokens."""
    h = hashlib.sha256(parent if parent is not None else b"salt:" + salt)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))  # unused and holding nothing worth keeping
        self.cached: dict[bytes, int] = {}  # hash -> block holding those tokens' keys/values
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unused cached blocks, oldest first
        self.num_hits = self.num_queries = 0  # prefix-cache blocks found / looked up (metrics)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could take now (free or evictable)."""
        return len(self.free) + len(self.evictable)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks seq needs so that num_tokens more tokens have slots."""
        total = -(-(seq.num_computed + num_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> None:
        """Reuse cached blocks for the longest run of seq's leading full blocks (a sequence that has
        computed nothing yet). At least one token is always left to compute, since the last token's
        logits are needed to sample from."""
        assert seq.num_computed == 0 and not seq.block_table
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return  # prompt log-probabilities need every prompt position computed
        parent = None
        for start in range(0, len(seq) - 1 - self.block_size + 1, self.block_size):
            self.num_queries += 1
            parent = block_hash(parent, seq.token_ids[start:start + self.block_size], seq.salt)
            block = self.cached.get(parent)
            if block is None:
                break
            self.num_hits += 1
            self._take(block)
            seq.block_table.append(block)
            seq.num_computed += self.block_size
        if seq.num_cached_prompt_tokens is None:  # usage counts the first admission, not a recompute
            seq.num_cached_prompt_tokens = min(seq.num_computed, seq.num_prompt_tokens)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq slots for num_tokens more tokens; False (and nothing taken) if too few blocks."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take(self._pop_free()))
        return True

    def commit(self, seq: Sequence) -> None:
        """After a step computed seq's tokens up to num_computed: name its newly full blocks."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed // self.block_size
        for i in range(num_full):
            block = seq.block_table[i]
            if self.block_hashes[block] is not None:
                continue  # already named (a cache hit, or committed last step)
            parent = self.block_hashes[seq.block_table[i - 1]] if i else None
            h = block_hash(parent, seq.token_ids[i * self.block_size:(i + 1) * self.block_size], seq.salt)
            self.block_hashes[block] = h
            self.cached.setdefault(h, block)  # another block may hold the same tokens: keep the first

    def release(self, seq: Sequence) -> None:
        """Drop seq's hold on its blocks (finished, aborted or preempted)."""
        for block in reversed(seq.block_table):  # tail first: under LRU the prefix outlives its suffix
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                h = self.block_hashes[block]
                if h is not None and self.cached.get(h) == block:
                    self.evictable[block] = None
                else:
                    self._forget(block)
                    self.free.append(block)
        seq.block_table = []
        seq.num_computed = 0

    def _take(self, block: int) -> int:
        if self.ref_count[block] == 0:
            self.evictable.pop(block, None)
        self.ref_count[block] += 1
        return block

    def _pop_free(self) -> int:
        if self.free:
            return self.free.popleft()
        block, _ = self.evictable.popitem(last=False)  # evict the least recently used cached block
        self._forget(block)
        return block

    def _forget(self, block: int) -> None:
        h = self.block_hashes[block]
        if h is not None and self.cached.get(h) == block:
            del self.cached[h]
        self.block_hashes[block] = None
