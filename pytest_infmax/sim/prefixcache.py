"""Automatic prefix caching, as vLLM's: KV-cache blocks keyed by a hash of their tokens.

A prompt is cut into blocks of ``block_size`` tokens; block *i*'s hash covers its own
tokens and the hash of block *i - 1*, so two prompts share a cached block only when
they agree on every token up to its end. A request whose first blocks are cached
skips their prefill: the scheduler starts it with those tokens already computed.

What it models, as vLLM (V1) does:

* only full blocks are cached, and at most ``prompt - 1`` tokens hit (the last prompt
  token is always computed, to produce the first output token);
* a prompt's blocks enter the cache when its prefill completes, and stay while any
  running request uses them (a reference count); a block no request uses is
  *evictable*, still cached, and the least recently used one is dropped first when a
  new request needs room (LRU);
* evictable blocks count as free capacity in ``kv_cache_usage`` (vLLM's gauge counts
  the blocks requests hold), but a request is admitted only once the blocks it needs
  are free or evictable;
* ``queries`` and ``hits`` count prompt tokens looked up and found, at admission:
  vLLM's ``vllm:prefix_cache_queries`` and ``vllm:prefix_cache_hits`` counters.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Sequence

# Evictable blocks kept when the KV cache is unlimited (no --kv-cache-tokens): a bound on
# the simulator's own memory, about 1M tokens of 16-token blocks.
UNLIMITED_CACHE_BLOCKS = 65536


def block_hashes(tokens: Sequence[Hashable], block_size: int) -> tuple[int, ...]:
    """The chained hash of each full block of ``tokens`` (a partial last block has none)."""
    out: list[int] = []
    previous = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        previous = hash((previous, tuple(tokens[start : start + block_size])))
        out.append(previous)
    return tuple(out)


class PrefixCache:
    """Cached blocks by hash, with reference counts and an LRU order of the unused ones."""

    def __init__(self, block_size: int, max_unused_blocks: int | None = None) -> None:
        self.block_size = block_size
        self.max_unused_blocks = max_unused_blocks  # None: bounded by the scheduler's KV capacity
        self._refs: dict[int, int] = {}  # hash -> running requests using the block
        self._unused: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest first
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # prompt tokens found cached

    @property
    def unused_blocks(self) -> int:
        """Cached blocks no running request uses: evictable."""
        return len(self._unused)

    @property
    def cached_blocks(self) -> int:
        return len(self._refs)

    def match(self, hashes: Sequence[int], prompt_tokens: int) -> int:
        """How many leading blocks of a prompt are cached (never all of its tokens)."""
        limit = min(len(hashes), max(prompt_tokens - 1, 0) // self.block_size)
        n = 0
        while n < limit and hashes[n] in self._refs:
            n += 1
        return n

    def unused_among(self, hashes: Sequence[int]) -> int:
        return sum(1 for h in hashes if h in self._unused)

    def acquire(self, hashes: Sequence[int], prompt_tokens: int) -> None:
        """A request admitted with ``hashes`` (its hit blocks) in use; counts the lookup."""
        for h in hashes:
            self._refs[h] += 1
            self._unused.pop(h, None)
        self.queries += prompt_tokens
        self.hits += len(hashes) * self.block_size

    def insert(self, h: int) -> bool:
        """A block a request computed enters the cache, in use by it; False if already cached."""
        if h in self._refs:
            return False
        self._refs[h] = 1
        return True

    def release(self, hashes: Sequence[int]) -> int:
        """A request that used ``hashes`` ended; returns the blocks evicted to keep the bound."""
        for h in hashes:
            count = self._refs[h] - 1
            self._refs[h] = count
            if count == 0:
                self._unused[h] = None  # most recently used: evicted last
        if self.max_unused_blocks is not None and len(self._unused) > self.max_unused_blocks:
            return self.evict(len(self._unused) - self.max_unused_blocks)
        return 0

    def evict(self, n: int) -> int:
        """Drop up to ``n`` least recently used unused blocks; returns how many were dropped."""
        dropped = 0
        while dropped < n and self._unused:
            h, _ = self._unused.popitem(last=False)
            del self._refs[h]
            dropped += 1
        return dropped

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
