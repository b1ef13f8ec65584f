"""The paged KV cache: a block pool per layer, a free-list allocator, and the per-step metadata.

Each sequence owns a list of blocks (its block table); token t of a sequence lives in block
table[t // block_size] at offset t % block_size, i.e. in slot block * block_size + offset of the pool.
The metadata of a step (positions, slots, block tables, lengths) is built once and used by every layer.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


def token_slots(block_tables: torch.Tensor, seq: torch.Tensor, t: torch.Tensor, block_size: int) -> torch.Tensor:
    """Pool slots [N] of tokens t [N] (counted from their sequence's start) of sequences seq [N]:
    block_tables[seq, t // block_size] * block_size + t % block_size."""
    return block_tables[seq, t // block_size].long() * block_size + t % block_size


class KVCacheExhausted(RuntimeError):
    """The block pool has too few free blocks for the request."""


class BlockAllocator:
    """The free block ids of [0, num_blocks), handed out lowest first. Plain Python: it runs once per step, not per
    layer. Lowest first means a request that starts on an empty pool gets each sequence's blocks as one run of
    consecutive ids (the torch backend then reads a sequence's context in place)."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # a heap (sorted is one)
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVCacheExhausted(
                f"KV cache exhausted: {n} more blocks needed, {len(self._free)} free of a capacity of "
                f"{self.num_blocks} blocks"
            )
        blocks = [heapq.heappop(self._free) for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        seen = set()
        for block in blocks:
            if block not in self._used or block in seen:
                raise ValueError(f"block {block} is not allocated (double free?)")
            seen.add(block)
        for block in blocks:
            self._used.remove(block)
            heapq.heappush(self._free, block)


@dataclass
class StepMetadata:
    """What the attention ops need for one forward step over B sequences and N new tokens.

    positions     [N] int64   rotary position of each new token
    slot_mapping  [N] int64   pool slot each new token's K/V is written to
    cu_seqlens    [B+1] int32 prefix sums of the new tokens per sequence (packed layout)
    block_tables  [B, max_blocks] int32  each sequence's blocks, padded with 0
    seq_lens      [B] int32   context length of each sequence including the new tokens
    last_token    [B] int64   index in N of each sequence's last new token (where logits are taken)
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    cu_seqlens: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    last_token: torch.Tensor
    max_seqlen: int
    is_prefill: bool


class PagedKVCache:
    """K and V pools [n_layer, num_blocks + 1, block_size, n_head, head_dim], and the sequences that use them.

    A sequence is a slot in `self.tables` (list of block ids) and `self.lengths` (tokens cached so far).
    Block `scratch_block` (= num_blocks, the pool's last) is never allocated: steps whose K/V nobody will read
    (CUDA-graph warm-ups, padded rows of a batch) point their block tables there.
    """

    def __init__(self, n_layer, num_blocks, block_size, n_head, head_dim, dtype, device):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        shape = (n_layer, num_blocks + 1, block_size, n_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.tables: list[list[int]] = []
        self.lengths: list[int] = []

    @property
    def num_blocks(self) -> int:
        """Blocks the allocator hands out (the scratch block is not one of them)."""
        return self.allocator.num_blocks

    @property
    def scratch_block(self) -> int:
        return self.allocator.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def start(self, lengths: list[int], capacity: list[int] | None = None) -> None:
        """Begin B fresh sequences whose first step adds lengths[b] tokens; their blocks, for max(lengths[b],
        capacity[b]) tokens, are allocated here, each sequence's as one run of consecutive ids when the pool allows
        (the torch backend then reads a sequence's context in place)."""
        self.release()
        needed = [self.blocks_for(max(n, c)) for n, c in zip(lengths, capacity or lengths)]
        if sum(needed) > self.allocator.num_free:
            raise KVCacheExhausted(
                f"KV cache exhausted: the prompts need {sum(needed)} blocks of {self.block_size} tokens, "
                f"{self.allocator.num_free} free of a capacity of {self.num_blocks} blocks "
                f"({self.capacity_tokens} tokens)"
            )
        self.tables = [self.allocator.allocate(n) for n in needed]
        self.lengths = [0] * len(lengths)

    def reserve(self, b: int, n_tokens: int) -> None:
        """Make sure sequence b has blocks for n_tokens tokens in all (before decoding, so tables stay fixed)."""
        missing = self.blocks_for(n_tokens) - len(self.tables[b])
        if missing > 0:
            self.tables[b].extend(self.allocator.allocate(missing))

    def release(self) -> None:
        """Free every sequence's blocks (the pool is reused by the next request)."""
        for table in self.tables:
            self.allocator.free(table)
        self.tables, self.lengths = [], []

    def plan(self, new_tokens: list[int], positions: torch.Tensor, is_prefill: bool) -> StepMetadata:
        """Reserve room for new_tokens[b] more tokens of each sequence and describe the step.

        positions [N] are the rotary positions of the packed new tokens (they need not equal the cache offsets:
        a left-padded prompt starts at position 0 whatever its padding).
        """
        device, bs = self.k.device, self.block_size
        for b, n in enumerate(new_tokens):
            self.reserve(b, self.lengths[b] + n)
        max_blocks = max(len(t) for t in self.tables)
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in self.tables], dtype=torch.int64)
        counts = torch.tensor(new_tokens)
        cu = torch.zeros(len(new_tokens) + 1, dtype=torch.int64)
        cu[1:] = counts.cumsum(0)
        seq = torch.repeat_interleave(torch.arange(len(new_tokens)), counts)  # [N] the sequence of each new token
        t = torch.arange(int(cu[-1])) - cu[seq] + torch.tensor(self.lengths)[seq]
        slots = token_slots(tables, seq, t, bs)
        for b, n in enumerate(new_tokens):
            self.lengths[b] += n
        return StepMetadata(
            positions=positions.to(device=device, dtype=torch.int64),
            slot_mapping=slots.to(device),
            cu_seqlens=cu.to(device=device, dtype=torch.int32),
            block_tables=tables.to(device=device, dtype=torch.int32),
            seq_lens=torch.tensor(self.lengths, dtype=torch.int32, device=device),
            last_token=(cu[1:] - 1).to(device),
            max_seqlen=max(new_tokens),
            is_prefill=is_prefill,
        )
