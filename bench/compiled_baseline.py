"""GPT-J in plain PyTorch with a static KV cache, compiled: the strongest baseline that needs no custom kernel.

Written here from scratch after pytorch-labs/gpt-fast: q, k and v come from one fused GEMM, K and V go into a
static cache [B, H, S, D] updated in place, attention is SDPA, and the decode step runs under
torch.compile(mode="reduce-overhead"), i.e. as a CUDA graph. Prefill runs eagerly: it starts at position 0, so
causal SDPA over the fresh tokens is the whole attention (flash on a GPU).

Scope: greedy decoding of equal-length prompts (no padding), which is all the benchmark asks of it; the eos token
can be suppressed, as HF's `min_new_tokens=max_new_tokens` does, so that every run makes the same number of
tokens (generation never stops early: the benchmark times fixed work). The block is
HF's (GPT-J: attention and MLP in parallel on one LayerNorm, interleaved RoPE on the first rotary_dim dims, the
sum (attn + mlp) + residual), so in fp32 without compile it gives HF eager's greedy tokens (tests/test_bench.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Geometry:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    rotary_dim: int
    n_inner: int
    layer_norm_epsilon: float
    activation_function: str

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def of(cls, config) -> "Geometry":
        """From kogpt_fast's GPTJConfig or HF's (same field names; HF's n_inner may be None)."""
        n_inner = getattr(config, "n_inner", None) or 4 * config.n_embd
        return cls(config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_head,
                   config.rotary_dim, n_inner, config.layer_norm_epsilon, config.activation_function)


def gelu(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu_new":  # written as HF writes it, so that fp32 results match bit for bit
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    return F.gelu(x, approximate="tanh")


def rope_table(n_positions: int, rotary_dim: int) -> torch.Tensor:
    """[n_positions, rotary_dim] fp32: sin in the first half, cos in the second (HF's create_sinusoidal_positions)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    angles = torch.einsum("i , j -> i j", torch.arange(n_positions, dtype=torch.int64).float(), inv_freq).float()
    return torch.cat((torch.sin(angles), torch.cos(angles)), dim=1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """x [B, T, H, D]; sin, cos [T, rotary_dim / 2] in x's dtype. Interleaved pairs (x, y) -> (x cos - y sin, ...)."""
    sin = torch.repeat_interleave(sin[None, :, None, :], 2, 3)
    cos = torch.repeat_interleave(cos[None, :, None, :], 2, 3)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class KVCache(nn.Module):
    def __init__(self, batch: int, length: int, n_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, H, T, D] at positions input_pos [T]; return the whole cache [B, H, S, D]."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Block(nn.Module):
    def __init__(self, g: Geometry):
        super().__init__()
        self.g = g
        self.ln_1 = nn.LayerNorm(g.n_embd, eps=g.layer_norm_epsilon)
        self.qkv = nn.Linear(g.n_embd, 3 * g.n_embd, bias=False)  # [q; k; v] rows: one GEMM
        self.out_proj = nn.Linear(g.n_embd, g.n_embd, bias=False)
        self.fc_in = nn.Linear(g.n_embd, g.n_inner)
        self.fc_out = nn.Linear(g.n_inner, g.n_embd)
        self.cache: KVCache | None = None

    def forward(self, x, sin, cos, input_pos, mask):
        """x [B, T, d]; mask [1, 1, T, S] bool, or None for a prefill from position 0."""
        g = self.g
        b, t, _ = x.shape
        h = self.ln_1(x)
        q, k, v = self.qkv(h).view(b, t, 3, g.n_head, g.head_dim).unbind(2)  # each [B, T, H, D]
        q = apply_rope(q, sin, cos, g.rotary_dim).transpose(1, 2)  # [B, H, T, D]
        k = apply_rope(k, sin, cos, g.rotary_dim).transpose(1, 2)
        v = v.transpose(1, 2)
        k_all, v_all = self.cache.update(input_pos, k, v)
        if mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        a = self.out_proj(a.transpose(1, 2).reshape(b, t, g.n_embd))
        m = self.fc_out(gelu(self.fc_in(h), g.activation_function))
        return (a + m) + x  # HF's order of the sums


class GPTJ(nn.Module):
    def __init__(self, g: Geometry):
        super().__init__()
        self.g = g
        self.wte = nn.Embedding(g.vocab_size, g.n_embd)
        self.blocks = nn.ModuleList(Block(g) for _ in range(g.n_layer))
        self.ln_f = nn.LayerNorm(g.n_embd, eps=g.layer_norm_epsilon)
        self.lm_head = nn.Linear(g.n_embd, g.vocab_size)
        self.register_buffer("rope", rope_table(g.n_positions, g.rotary_dim), persistent=False)
        causal = torch.ones(g.n_positions, g.n_positions, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def setup_caches(self, batch: int, length: int) -> None:
        w = self.lm_head.weight
        for block in self.blocks:
            block.cache = None  # free the old cache before allocating the new one
        for block in self.blocks:
            block.cache = KVCache(batch, length, self.g.n_head, self.g.head_dim, w.dtype, w.device)

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """ids [B, T] at positions input_pos [T] -> fp32 logits [B, vocab] of the last position."""
        x = self.wte(ids)
        sin, cos = self.rope[input_pos].to(x.dtype).split(self.g.rotary_dim // 2, dim=-1)
        for block in self.blocks:
            x = block(x, sin, cos, input_pos, mask)
        return self.lm_head(self.ln_f(x[:, -1])).float()

    @classmethod
    def from_state_dict(cls, config, state: dict[str, torch.Tensor]) -> "GPTJ":
        """Built around HF-named weights (shared, not copied; q, k, v are concatenated into one matrix)."""
        g = Geometry.of(config)
        with torch.device("meta"):
            model = cls(g)
        mapped = {
            "wte.weight": state["transformer.wte.weight"],
            "ln_f.weight": state["transformer.ln_f.weight"],
            "ln_f.bias": state["transformer.ln_f.bias"],
            "lm_head.weight": state.get("lm_head.weight", state["transformer.wte.weight"]),
            "lm_head.bias": state["lm_head.bias"],
        }
        for i in range(g.n_layer):
            p = f"transformer.h.{i}."
            mapped[f"blocks.{i}.qkv.weight"] = torch.cat(
                [state[p + f"attn.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0)
            mapped[f"blocks.{i}.out_proj.weight"] = state[p + "attn.out_proj.weight"]
            for name in ("ln_1.weight", "ln_1.bias", "mlp.fc_in.weight", "mlp.fc_in.bias",
                         "mlp.fc_out.weight", "mlp.fc_out.bias"):
                mapped[f"blocks.{i}." + name.removeprefix("mlp.")] = state[p + name]
        model.load_state_dict(mapped, assign=True)
        device = mapped["wte.weight"].device
        model.rope = rope_table(g.n_positions, g.rotary_dim).to(device)
        model.causal = torch.ones(g.n_positions, g.n_positions, dtype=torch.bool, device=device).tril()
        return model.eval().requires_grad_(False)


class StaticCacheGenerator:
    """Greedy generation with the static cache; the decode step compiled when `compile` is set."""

    def __init__(self, model: GPTJ, compile: bool, suppress_token_id: int | None = None):
        self.model = model
        self.compiled = compile
        self.suppress_token_id = suppress_token_id  # never generated (the eos id, as min_new_tokens does)
        self._shape: tuple[int, int] | None = None
        self._decode = torch.compile(self._decode_step, mode="reduce-overhead", fullgraph=True) if compile \
            else self._decode_step

    def _decode_step(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """token [B, 1] at position input_pos [1] -> next token [B]."""
        length = self.model.blocks[0].cache.k.shape[2]
        mask = self.model.causal[input_pos, :length][None, None]  # [1, 1, 1, S]
        return self.next_token(self.model(token, input_pos, mask))

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, vocab] fp32 -> [B]: argmax, with the suppressed token masked out."""
        if self.suppress_token_id is not None:
            logits[:, self.suppress_token_id] = float("-inf")
        return logits.argmax(dim=-1)

    def cache_length(self, needed: int) -> int:
        """Cache lengths come in steps of 256 so that few shapes are compiled."""
        return min(self.model.g.n_positions, -(-needed // 256) * 256)

    def release(self) -> None:
        for block in self.model.blocks:
            block.cache = None
        self._shape = None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """input_ids [B, T] (no padding) -> [B, T + max_new_tokens], greedy."""
        b, t = input_ids.shape
        if t + max_new_tokens - 1 > self.model.g.n_positions:
            raise ValueError(f"{t} + {max_new_tokens} tokens exceed n_positions={self.model.g.n_positions}")
        shape = (b, self.cache_length(t + max_new_tokens - 1))
        if shape != self._shape:
            self.model.setup_caches(*shape)
            self._shape = shape
        device = input_ids.device
        token = self.next_token(self.model(input_ids, torch.arange(t, device=device), None))
        out = [input_ids, token[:, None]]
        input_pos = torch.tensor([t], device=device)
        for _ in range(max_new_tokens - 1):
            if self.compiled and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                torch.compiler.cudagraph_mark_step_begin()
            token = self._decode(token[:, None], input_pos).clone()  # the graph's output buffer is reused
            out.append(token[:, None])
            input_pos = input_pos + 1
        return torch.cat(out, dim=1)
