"""The decode step over static buffers, replayed as a CUDA graph where the backend allows it.

Each step feeds one token per sequence. Everything a step needs lives in tensors that keep their addresses for
the whole request, and the per-step metadata (position, cache slot, context length) is computed on the device
from them, so a captured graph replays the step with no Python or host work besides writing the new tokens.
Blocks for the whole request are reserved before the first step, so the block table never changes while decoding.
"""
from __future__ import annotations

import logging
import os

import torch

from .kv_cache import PagedKVCache, StepMetadata, token_slots

logger = logging.getLogger(__name__)


class DecodeStep:
    """One token per sequence for B sequences.

    tokens        [B] int64   the tokens fed by the next step (written by __call__)
    seq_lens      [B] int32   tokens cached per sequence; a step caches one more and advances it
    block_tables  [B, W] int32 each sequence's blocks, W = the most any sequence of this model can need
    logits        [B, vocab] fp32, the output of the last step (a static buffer: copy it to keep it)
    """

    def __init__(self, model, cache: PagedKVCache, batch: int, use_graph: bool):
        device = cache.k.device
        self.model, self.cache = model, cache
        width = cache.blocks_for(model.config.n_positions)
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(batch, width, dtype=torch.int32, device=device)
        self.rows = torch.arange(batch, device=device)
        self.cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.use_graph = use_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.weights_key: tuple = ()  # the model's _weights_key() when this step was made

    def load(self, tables: list[list[int]], lengths: list[int]) -> None:
        """Point the step at the current request's sequences (their blocks must cover every step to come)."""
        rows = [t + [0] * (self.block_tables.shape[1] - len(t)) for t in tables]
        self.block_tables.copy_(torch.tensor(rows, dtype=torch.int32))
        self.seq_lens.copy_(torch.tensor(lengths, dtype=torch.int32))

    def _step(self) -> torch.Tensor:
        bs = self.cache.block_size
        positions = self.seq_lens.long()  # the new token's position is the number of tokens cached before it
        slots = token_slots(self.block_tables, self.rows, positions, bs)
        self.seq_lens += 1
        meta = StepMetadata(
            positions=positions, slot_mapping=slots, cu_seqlens=self.cu_seqlens, block_tables=self.block_tables,
            seq_lens=self.seq_lens, last_token=self.rows, max_seqlen=1, is_prefill=False,
        )
        return self.model.forward_step(self.tokens, meta, self.cache)

    def _warm_up(self) -> None:
        """Run the step eagerly with every row at position 0 of the scratch block, which no request reads.

        The request's own blocks cover only the positions it will feed: a warm-up at the next positions would
        write through the block table's zero padding into block 0, or index past the table's end. The kernels'
        shapes and constexprs do not depend on the positions, so these steps compile and allocate what the
        captured one needs.
        """
        saved_tables, saved_lens = self.block_tables.clone(), self.seq_lens.clone()
        try:
            for _ in range(2):
                self.block_tables.fill_(self.cache.scratch_block)
                self.seq_lens.zero_()
                self._step()
        finally:
            self.block_tables.copy_(saved_tables)
            self.seq_lens.copy_(saved_lens)

    def _capture(self) -> None:
        """Warm up on a side stream (kernels compile, libraries allocate), then record one step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._warm_up()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph = graph

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B]; returns fp32 logits [B, vocab] for the next token."""
        self.tokens.copy_(tokens)
        if self.use_graph and self.graph is None:
            try:
                self._capture()
            except Exception as e:  # a backend whose kernels cannot be captured still decodes, eagerly
                logger.warning("CUDA graph capture failed (%s: %s); decoding without a graph", type(e).__name__, e)
                self.use_graph, self.graph = False, None
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._step()


def graphs_enabled(backend: str, device: torch.device) -> bool:
    """CUDA graphs for the kernel backends on a GPU; the torch backend stays eager (it is the reference and its
    cache write synchronises). KOGPT_CUDA_GRAPH=0 turns them off."""
    if os.environ.get("KOGPT_CUDA_GRAPH", "1") == "0":
        return False
    return device.type == "cuda" and backend in ("triton", "cuda")
