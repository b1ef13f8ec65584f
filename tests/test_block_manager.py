"""The serving layer's block manager: reference counts, the prefix cache (exact, LRU), and a hypothesis state machine
that simulates sequences writing tokens into their blocks and checks that a prefix hit always hands back blocks
holding exactly the requested tokens, that no shared or cached block is ever written, and that every block is in
exactly one state."""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kogpt_fast import KVCacheExhausted
from kogpt_fast.serving.block_manager import ROOT, BlockManager


def fill(bm: BlockManager, tokens: list[int]) -> tuple[list[int], list[int]]:
    """A sequence's blocks for `tokens`, every full one registered: (blocks, content ids)."""
    blocks = bm.allocate(bm.blocks_for(len(tokens)))
    ids, parent = [], ROOT
    for i in range(len(tokens) // bm.block_size):
        parent = bm.register(blocks[i], parent, tokens[i * bm.block_size:(i + 1) * bm.block_size])
        ids.append(parent)
    return blocks, ids


def test_refcounts_share_and_free():
    bm = BlockManager(6, 4)
    a, _ = fill(bm, list(range(10)))  # 2 full blocks + 1 partial
    assert bm.num_used == 3 and bm.num_free == 3
    hit, ids = bm.match_prefix(list(range(8)) + [99, 98], max_blocks=4)
    assert hit == a[:2] and bm.ref_counts[a[0]] == 2 and bm.ref_counts[a[2]] == 1
    bm.release(a)
    assert bm.num_used == 2 and bm.num_cached == 0 and bm.num_free == 4  # the shared two are still held
    bm.release(hit)
    assert bm.num_used == 0 and bm.num_cached == 2 and bm.num_free == 6
    with pytest.raises(ValueError, match="double free"):
        bm.release(hit[:1])
    bm.check()


def test_match_respects_max_blocks_and_stops_at_the_first_miss():
    bm = BlockManager(8, 2)
    blocks, _ = fill(bm, [1, 2, 3, 4, 5, 6])
    assert bm.match_prefix([1, 2, 3, 4, 5, 6], max_blocks=2)[0] == blocks[:2]
    assert bm.match_prefix([1, 2, 9, 4, 5, 6], max_blocks=9)[0] == blocks[:1]
    assert bm.match_prefix([3, 4, 5, 6], max_blocks=9)[0] == []  # same tokens, other prefix: another key
    bm.check()


def test_eviction_is_least_recently_used_and_drops_the_key():
    bm = BlockManager(3, 2)
    first, _ = fill(bm, [1, 2])
    second, _ = fill(bm, [3, 4])
    bm.release(first)
    bm.release(second)
    assert bm.num_cached == 2
    bm.match_prefix([1, 2], 1)  # [1, 2] is used again: now the most recent
    bm.release(first)
    taken = bm.allocate(2)  # the free block, then the LRU cached one: [3, 4]'s
    assert second[0] in taken and first[0] not in taken
    assert bm.match_prefix([3, 4], 1)[0] == []  # evicted: no longer found
    assert bm.match_prefix([1, 2], 1)[0] == first
    with pytest.raises(KVCacheExhausted, match="1 more blocks needed, 0 free of a capacity of 3 blocks"):
        bm.allocate(1)
    bm.check()


def test_a_duplicate_content_stays_private():
    bm = BlockManager(4, 2)
    a, ids_a = fill(bm, [5, 6, 7])
    b, ids_b = fill(bm, [5, 6, 8])  # computed at the same time: not found by match_prefix when allocated
    assert ids_a == ids_b  # the same content has one id, so the next blocks of both chain to the same key
    assert bm.is_cached_content(a[0]) and not bm.is_cached_content(b[0])
    bm.release(b)
    assert bm.num_cached == 0  # b's first block was private: freed, not cached
    bm.release(a)
    assert bm.num_cached == 1
    bm.check()


def test_sequences_are_spread_out_and_grow_into_consecutive_blocks():
    bm = BlockManager(32, 2)
    a = bm.allocate(2, room=3)  # centred in the empty pool
    b = bm.allocate(2, room=3)  # centred in the largest run left: [0, 15)
    assert a == [15, 16] and b == [6, 7]
    a += bm.allocate(1, after=a[-1])
    b += bm.allocate(2, after=b[-1])
    assert a == [15, 16, 17] and b == [6, 7, 8, 9]
    c = bm.allocate(3, room=20)  # the largest run is [18, 32): room for 11, the run's end
    assert c == [18, 19, 20]
    bm.release(a)
    assert bm.allocate(2, after=9)[0] == 10  # 10 and 11 are free: b goes on
    bm.check()


def test_register_refuses_partial_or_unused_blocks():
    bm = BlockManager(2, 4)
    (block,) = bm.allocate(1)
    with pytest.raises(ValueError, match="full block in use"):
        bm.register(block, ROOT, [1, 2])
    bm.release([block])
    with pytest.raises(ValueError, match="full block in use"):
        bm.register(block, ROOT, [1, 2, 3, 4])


TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=14)  # a tiny alphabet: prefixes collide often


class Sequences(RuleBasedStateMachine):
    """Sequences start (prefix hit + new blocks), grow token by token, and finish; blocks hold simulated contents."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 4))
    def setup(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size)
        self.content: dict[int, list[int]] = {}  # what each block holds (written token by token)
        self.history: dict[int, list[int]] = {}  # the sequence's tokens up to each block's last one, when written
        self.seqs: list[dict] = []

    def write(self, seq, token):
        bs = self.bm.block_size
        block = seq["blocks"][len(seq["tokens"]) // bs]
        assert self.bm.ref_counts[block] == 1 and not self.bm.is_cached_content(block), "wrote a shared block"
        offset = len(seq["tokens"]) % bs
        self.content[block] = self.content.get(block, [])[:offset] + [token]
        seq["tokens"].append(token)
        self.history[block] = list(seq["tokens"])
        if offset == bs - 1:  # the block is full: name it
            parent = seq["ids"][-1] if seq["ids"] else ROOT
            seq["ids"].append(self.bm.register(block, parent, self.content[block]))

    @rule(prompt=TOKENS, room=st.integers(0, 4))
    def start(self, prompt, room):
        bs = self.bm.block_size
        hit, ids = self.bm.match_prefix(prompt, max_blocks=(len(prompt) - 1) // bs)
        for i, block in enumerate(hit):  # its tokens and everything before them are the prompt's
            assert self.history[block] == prompt[:(i + 1) * bs], "a prefix hit holds another prefix's K/V"
        try:
            fresh = self.bm.allocate(self.bm.blocks_for(len(prompt)) - len(hit), after=hit[-1] if hit else None,
                                     room=0 if hit else room)
        except KVCacheExhausted:
            self.bm.release(hit)
            return
        seq = {"blocks": hit + fresh, "tokens": prompt[: len(hit) * bs], "ids": ids}
        for token in prompt[len(hit) * bs:]:
            self.write(seq, token)
        self.seqs.append(seq)

    @precondition(lambda self: self.seqs)
    @rule(which=st.integers(0, 100), token=st.integers(0, 2))
    def grow(self, which, token):
        seq = self.seqs[which % len(self.seqs)]
        if len(seq["tokens"]) == len(seq["blocks"]) * self.bm.block_size:
            try:
                seq["blocks"] += self.bm.allocate(1, after=seq["blocks"][-1] if seq["blocks"] else None)
            except KVCacheExhausted:
                return
        self.write(seq, token)

    @precondition(lambda self: self.seqs)
    @rule(which=st.integers(0, 100))
    def finish(self, which):
        seq = self.seqs.pop(which % len(self.seqs))
        self.bm.release(seq["blocks"])

    @invariant()
    def consistent(self):
        if not hasattr(self, "bm"):
            return
        self.bm.check()
        holders = [0] * self.bm.num_blocks
        for seq in self.seqs:
            for block in seq["blocks"]:
                holders[block] += 1
        assert holders == self.bm.ref_counts
        if not self.seqs:
            assert self.bm.num_used == 0 and self.bm.num_free == self.bm.num_blocks


TestSequences = Sequences.TestCase
TestSequences.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
