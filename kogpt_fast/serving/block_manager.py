"""KV blocks owned by reference count, and the prefix cache over them.

Every block of the pool is in one of three states:
- in use: held by ref_count >= 1 running sequences (a block shared by several is full and never written again);
- cached: held by nobody, but full of the K/V of a known prefix, so a later prompt that starts with it reuses it;
  evicted least-recently-used when the pool needs room;
- free: holds nothing of value.

A full block is named by its key (the content id of the block before it, its tokens): a prompt's first block has
parent id 0, and each registered content gets a fresh id, so a key names the block's tokens and everything before
them. Lookups are exact dict lookups on that key (Python hashes it, equality decides), so no hash collision can hand
one prompt another's K/V. Plain Python: it runs once per step, not per layer.
"""
from __future__ import annotations

import itertools
import re
from collections import OrderedDict

from ..kv_cache import KVCacheExhausted

ROOT = 0  # the parent content id of a sequence's first block


class BlockManager:
    """Reference-counted blocks [0, num_blocks) of block_size tokens with an LRU prefix cache."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self._free = bytearray(b"\x01" * num_blocks)  # 1: free. Runs of free blocks are found with bytes.find
        self._num_free = num_blocks
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks with a key, oldest first
        self._by_key: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}  # key -> (block, content id)
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> its key
        self._ids = itertools.count(ROOT + 1)

    # ---- counts ----
    @property
    def num_free(self) -> int:
        """Blocks that allocate() can hand out: free ones and cached ones (evicted on the way)."""
        return self._num_free + len(self._cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free - len(self._cached)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # ---- allocation ----
    def allocate(self, n: int, after: int | None = None, room: int = 0) -> list[int]:
        """n blocks for one sequence's new tokens (ref_count 1).

        Where the pool allows, a sequence's blocks are consecutive (the CPU reference attention then reads them in
        place, without a gather): they continue its last block `after`, or, for a new sequence, sit in the largest
        free run, centred but with `room` free blocks behind them to grow into (the free blocks before them are the
        room of the sequence before). Otherwise any free blocks, lowest first, then the least recently used cached
        ones (evicted).
        """
        if n > self.num_free:
            raise KVCacheExhausted(
                f"KV cache exhausted: {n} more blocks needed, {self.num_free} free of a capacity of "
                f"{self.num_blocks} blocks"
            )
        if n == 0:
            return []
        start = -1
        if after is not None and self._free[after + 1:after + 1 + n] == b"\x01" * n:
            start = after + 1
        elif after is None:
            run = max(re.finditer(b"\x01+", self._free), key=lambda m: m.end() - m.start(), default=None)
            if run is not None and run.end() - run.start() >= n:
                centred = run.start() + (run.end() - run.start() - n) // 2
                start = max(run.start(), min(centred, run.end() - n - room))
        if start < 0:
            start = self._free.find(b"\x01" * n)
        if start >= 0:
            blocks = list(range(start, start + n))
        else:
            blocks, pos = [], -1
            while len(blocks) < n and (pos := self._free.find(1, pos + 1)) >= 0:
                blocks.append(pos)
        for block in blocks:
            self._free[block] = 0
        self._num_free -= len(blocks)
        while len(blocks) < n:
            block, _ = self._cached.popitem(last=False)
            del self._by_key[self._key_of.pop(block)]
            blocks.append(block)
        for block in blocks:
            self.ref_counts[block] = 1
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each of a sequence's blocks. Last blocks first: the end of a prefix is evicted
        before its beginning, which other prompts are likelier to share."""
        for block in reversed(blocks):
            if self.ref_counts[block] <= 0:
                raise ValueError(f"block {block} is not in use (double free?)")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None
                else:
                    self._free[block] = 1
                    self._num_free += 1

    # ---- the prefix cache ----
    def match_prefix(self, tokens: list[int], max_blocks: int) -> tuple[list[int], list[int]]:
        """The cached blocks holding tokens' longest prefix of full blocks (at most max_blocks), each acquired
        (ref_count + 1), and their content ids."""
        blocks, ids, parent = [], [], ROOT
        bs = self.block_size
        for i in range(min(max_blocks, len(tokens) // bs)):
            found = self._by_key.get((parent, tuple(tokens[i * bs:(i + 1) * bs])))
            if found is None:
                break
            block, parent = found
            blocks.append(block)
            ids.append(parent)
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._cached[block]
            self.ref_counts[block] += 1
        return blocks, ids

    def register(self, block: int, parent_id: int, tokens: list[int]) -> int:
        """Record that in-use `block` is full with `tokens` after the content `parent_id`; returns the content id.

        If that content is cached already (another sequence computed the same prefix at the same time), the existing
        block keeps the name and this one stays private (freed, not cached, when released).
        """
        if len(tokens) != self.block_size or self.ref_counts[block] <= 0:
            raise ValueError(f"only a full block in use can be registered (block {block}, {len(tokens)} tokens)")
        key = (parent_id, tuple(tokens))
        found = self._by_key.get(key)
        if found is not None:
            return found[1]
        content_id = next(self._ids)
        self._by_key[key] = (block, content_id)
        self._key_of[block] = key
        return content_id

    def is_cached_content(self, block: int) -> bool:
        """Whether the block is named in the prefix cache (and so must never be written)."""
        return block in self._key_of

    def check(self) -> None:
        """AssertionError unless every block is in exactly one state and the prefix cache is consistent (tests)."""
        free, cached = {b for b, f in enumerate(self._free) if f}, set(self._cached)
        assert len(free) == self._num_free, "the free count is off"
        assert not free & cached, "a block is both free and cached"
        for block, count in enumerate(self.ref_counts):
            assert count >= 0, f"block {block} has ref_count {count}"
            assert (count > 0) + (block in free) + (block in cached) == 1, f"block {block} is in no or two states"
            assert block not in free or block not in self._key_of, f"free block {block} still has a key"
        assert cached <= set(self._key_of), "a cached block has no key"
        assert {b for b, _ in self._by_key.values()} == set(self._key_of), "key maps disagree"
