"""The GPT-J decoder (KoGPT-6B and any GPT-J checkpoint), inference only.

Module names follow HF's GPTJForCausalLM so that a checkpoint's state dict loads by name:
transformer.wte, transformer.h.N.{ln_1, attn.{q,k,v,out}_proj, mlp.{fc_in, fc_out}}, transformer.ln_f, lm_head.

One block, as HF computes it (attention and MLP in parallel on one LayerNorm):
    h = ln_1(x)
    a = attention(rope(h Wq), rope(h Wk), h Wv)                   # causal, paged KV cache
    x = (a Wo + fc_out(gelu(fc_in(h)))) + x
logits = lm_head(ln_f(x)) at each sequence's last token.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from . import backends
from .config import GPTJConfig
from .generation import GenerationMixin
from .kv_cache import PagedKVCache, StepMetadata


class Attention(nn.Module):
    def __init__(self, config: GPTJConfig):
        super().__init__()
        d = config.n_embd
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)


class MLP(nn.Module):
    def __init__(self, config: GPTJConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, config.n_inner)
        self.fc_out = nn.Linear(config.n_inner, config.n_embd)


class Block(nn.Module):
    def __init__(self, config: GPTJConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.mlp = MLP(config)


class Transformer(nn.Module):
    def __init__(self, config: GPTJConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class KoGPTForCausalLM(GenerationMixin, nn.Module):
    """A GPT-J causal LM with a paged KV cache and a HF-compatible `generate()`.

    Build it with `from_pretrained(path)`; `path=None` loads the embedded demo checkpoint.
    """

    def __init__(self, config: GPTJConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.backend_name = backend
        self.kv_cache: PagedKVCache | None = None
        self.kv_block_size = 16
        self.max_cache_tokens: int | None = None  # KV pool capacity; None: grows to what a request needs
        self._rope: torch.Tensor | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        backend: str = "auto",
        torch_dtype: torch.dtype | str | None = None,
        progress: bool | None = None,
        **overrides,
    ) -> "KoGPTForCausalLM":
        """Load a HF GPT-J checkpoint directory (safetensors, sharded safetensors or pytorch_model.bin).

        device: default cuda when available, else cpu. dtype (or HF's torch_dtype): default float16 on a GPU
        (bfloat16 for a bfloat16 checkpoint) and float32 on the CPU. backend: "auto", "torch", "triton" or
        "cuda" (also from the KOGPT_BACKEND environment variable when "auto"). Like HF, config fields may be
        overridden by keyword (e.g. `pad_token_id=tokenizer.eos_token_id`); HF's `low_cpu_mem_usage` is accepted
        (loading is always tensor by tensor).
        """
        from .loader import load_model

        return load_model(
            cls, path, device=device, dtype=dtype if dtype is not None else torch_dtype, backend=backend,
            progress=progress, overrides=overrides,
        )

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def ops(self):
        return backends.get_ops(self.backend_name, self.device)

    def rope(self) -> torch.Tensor:
        if self._rope is None or self._rope.device != self.device:
            self._rope = self.ops().rope_table(self.config.n_positions, self.config.rotary_dim, self.device)
        return self._rope

    def cache_for(self, total_tokens: list[int]) -> PagedKVCache:
        """The KV pool for sequences that will reach total_tokens[b] tokens.

        With `max_cache_tokens` unset the pool grows to what a request needs and is kept for the next one; with
        it set the pool has exactly that capacity and a request that needs more raises KVCacheExhausted.
        """
        c, bs = self.config, self.kv_block_size
        if self.max_cache_tokens is not None:
            blocks = -(-self.max_cache_tokens // bs)
        else:
            blocks = sum(-(-n // bs) for n in total_tokens)
        cache = self.kv_cache
        reusable = cache is not None and cache.k.device == self.device and cache.k.dtype == self.dtype and (
            cache.num_blocks >= blocks if self.max_cache_tokens is None else cache.num_blocks == blocks
        )
        if not reusable:
            self.kv_cache = None  # drop the old pool before allocating the new one
            cache = PagedKVCache(c.n_layer, max(blocks, 1), bs, c.n_head, c.head_dim, self.dtype, self.device)
            self.kv_cache = cache
        return cache

    @torch.inference_mode()
    def forward_step(self, input_ids: torch.Tensor, meta: StepMetadata, cache: PagedKVCache) -> torch.Tensor:
        """input_ids [N] packed new tokens -> fp32 logits [B, vocab] at each sequence's last new token."""
        ops, c = self.ops(), self.config
        attention = ops.prefill_attention if meta.is_prefill else ops.decode_attention
        rope = self.rope()
        x = self.transformer.wte(input_ids)  # [N, d]
        for layer, block in enumerate(self.transformer.h):
            h = ops.layer_norm(x, block.ln_1.weight, block.ln_1.bias, c.layer_norm_epsilon)
            q = ops.linear(h, block.attn.q_proj.weight).view(-1, c.n_head, c.head_dim)  # [N, H, D]
            k = ops.linear(h, block.attn.k_proj.weight).view(-1, c.n_head, c.head_dim)
            v = ops.linear(h, block.attn.v_proj.weight).view(-1, c.n_head, c.head_dim)
            a = attention(q, k, v, meta, cache.k[layer], cache.v[layer], rope, c.rotary_dim)  # [N, H, D]
            a = ops.linear(a.reshape(-1, c.n_embd), block.attn.out_proj.weight)
            m = ops.linear_gelu(h, block.mlp.fc_in.weight, block.mlp.fc_in.bias, c.activation_function)
            m = ops.linear(m, block.mlp.fc_out.weight, block.mlp.fc_out.bias)
            x = a + m + x
        x = x[meta.last_token]  # [B, d]
        x = ops.layer_norm(x, self.transformer.ln_f.weight, self.transformer.ln_f.bias, c.layer_norm_epsilon)
        return ops.linear(x, self.lm_head.weight, self.lm_head.bias).float()
