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
from .decode import DecodeStep, graphs_enabled
from .generation import GenerationMixin
from .kv_cache import PagedKVCache, StepMetadata
from .quant import QuantizedWeight, as_weight


PREFILL_PATHS = ("kernel", "torch")  # KoGPTForCausalLM.prefill_path


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
        # GPT-J's two fused GEMMs (see fused()); None: on for the kernel backends in fp16/bf16.
        self.fuse_projections: bool | None = None
        self.use_cuda_graph = True  # decode steps replay as CUDA graphs where decode.graphs_enabled allows
        # Where the prefill steps' projections and attention run: "kernel" (the backend's) or "torch" (cuBLAS and
        # SDPA through torch: kogpt_fast.torch_prefill). Decode steps always run on the backend's kernels.
        self.prefill_path = "kernel"
        self._rope: torch.Tensor | None = None
        self._fused: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._layout_key: tuple | None = None  # _gemm_layout's last check
        self._decode_steps: dict[int, DecodeStep] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        backend: str = "auto",
        torch_dtype: torch.dtype | str | None = None,
        device_map=None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        subfolder: str | None = None,
        use_safetensors: bool | None = None,
        variant: str | None = None,
        generation_config=None,
        progress: bool | None = None,
        quantize: str | None = None,
        **overrides,
    ) -> "KoGPTForCausalLM":
        """Load a HF GPT-J checkpoint: a directory (safetensors, sharded safetensors or pytorch_model.bin), or a
        hub id ("kakaobrain/kogpt", with `revision`) that the local HF cache holds (nothing is ever downloaded).

        device: default cuda when available, else cpu; or HF's device_map naming one device ("auto", "cuda:0",
        {"": 0}). dtype (or HF's torch_dtype): default float16 on a GPU (bfloat16 for a bfloat16 checkpoint) and
        float32 on the CPU. backend: "auto", "torch", "triton" or "cuda" (also from the KOGPT_BACKEND environment
        variable when "auto"). use_safetensors, variant, subfolder, cache_dir and generation_config as in HF.
        Like HF, config fields may be overridden by keyword (e.g. `pad_token_id=tokenizer.eos_token_id`); HF's
        arguments that change nothing here are accepted, those asking for what kogpt-fast does not do raise
        NotImplementedError (kogpt_fast.hf_compat; the README's argument table). quantize: "int8" or "fp8"
        (kogpt_fast.quant) quantizes every projection and the lm_head as they are read; a checkpoint written by
        `kogpt-fast convert --quantize` loads quantized as it is.
        """
        from .loader import load_model

        return load_model(
            cls, path, device=device, dtype=dtype if dtype is not None else torch_dtype, backend=backend,
            device_map=device_map, revision=revision, cache_dir=cache_dir, subfolder=subfolder,
            use_safetensors=use_safetensors, variant=variant, generation_config=generation_config,
            progress=progress, overrides=overrides, quantize=quantize,
        )

    @classmethod
    def from_hf(cls, hf_model, *, backend: str = "auto") -> "KoGPTForCausalLM":
        """Ours over a loaded `transformers.GPTJForCausalLM`'s own tensors (no copy; its device and dtype), with
        its config and generation_config: an app that holds the HF model swaps in one line. The first forward
        lays the projections out for the backend's GEMMs (fused_weights, _gemm_layout), as for a loaded model."""
        from .loader import model_from_hf

        return model_from_hf(cls, hf_model, backend=backend)

    @classmethod
    def from_state_dict(cls, config: GPTJConfig, state_dict: dict, *, backend: str = "auto") -> "KoGPTForCausalLM":
        """A model over the given tensors (HF GPT-J names; shared, not copied), e.g. weights already on a GPU."""
        from .loader import model_from_state_dict

        return model_from_state_dict(cls, config, state_dict, backend=backend)

    def to(self, *args, **kwargs):
        """nn.Module.to, after checking that the device exists here (a clear error, not torch's AssertionError)."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            backends.require_device(device)
        return super().to(*args, **kwargs)

    def cuda(self, device=None):
        backends.require_device(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")
        return super().cuda(device)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def ops(self):
        return backends.get_ops(self.backend_name, self.device)

    def backend(self) -> str:
        """The backend that runs on the model's device (the one `ops()` returns)."""
        return backends.resolve(self.backend_name, self.device)

    def fused(self) -> bool:
        """Whether forward_step uses the fused GEMMs: by default on the kernel backends in fp16/bf16 (the fast
        path); the torch backend and fp32 keep HF's four GEMMs, whose rounding they reproduce exactly."""
        if self.fuse_projections is not None:
            return self.fuse_projections
        return self.backend() != "torch" and self.dtype != torch.float32

    def fused_weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer (w_in [3d + d_ff, d], b_in [3d + d_ff], w_out [d, d + d_ff], b_out [d]).

        w_in = [Wq; Wk; Wv; W_fc_in] and b_in = [0; 0; 0; b_fc_in]: q | k | v | fc_in from one GEMM over ln_1(x).
        w_out = [Wo | W_fc_out]: out_proj and fc_out as one GEMM over [a | gelu(fc_in)]. Built once; the per-module
        weights become views into them, so the model holds each weight once.
        """
        # Stale once the per-module weights are no longer views into the fused ones (model.to(), load_state_dict).
        stale = self._fused is not None and any(
            w_in.data_ptr() != block.attn.q_proj.weight.data_ptr()
            for (w_in, *_), block in zip(self._fused, self.transformer.h)
        )
        if self._fused is None or stale:
            with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, as the loaded weights are
                self._fused = [self._fuse(block) for block in self.transformer.h]
        return self._fused

    def _unfuse(self) -> None:
        """Give the per-module weights their own contiguous memory again (the kernels' unfused GEMMs need it)."""
        if self._fused is not None:
            with torch.inference_mode(False), torch.no_grad():
                for block in self.transformer.h:
                    for module in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.out_proj,
                                   block.mlp.fc_in, block.mlp.fc_out):
                        module.weight = as_weight(module.weight.contiguous().clone())
                    # fc_in's bias is a slice of the fused [0; 0; 0; b_in], which would otherwise stay alive
                    block.mlp.fc_in.bias = nn.Parameter(block.mlp.fc_in.bias.clone(), requires_grad=False)
            self._fused = None

    def _gemm_layout(self) -> None:
        """Store the projections the way the backend's GEMMs read them fastest: on the CPU's torch backend in fp32,
        each weight [N, K] as a transposed view of a contiguous [K, N] copy, so that F.linear hands MKL x @ W
        without a transpose (measured: equal at M = 1, up to 2x faster at M = 4-16, the decode batch; the same
        values, and at M >= 32 or so the same bits); everywhere else (the kernels) contiguous [N, K]. Checked once
        per change of backend, device, dtype or weights, not per layer."""
        c = self.config
        transposed = self.device.type == "cpu" and self.dtype == torch.float32 and self.backend() == "torch"
        modules = [m for b in self.transformer.h
                   for m in (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.attn.out_proj, b.mlp.fc_in, b.mlp.fc_out)]
        if not c.tie_word_embeddings:
            modules.append(self.lm_head)
        key = (transposed, modules[0].weight.data_ptr(), modules[-1].weight.data_ptr())
        if key == self._layout_key:
            return
        with torch.inference_mode(False), torch.no_grad():
            for module in modules:
                w = module.weight
                if isinstance(w, QuantizedWeight):  # the reference dequantizes it at each call: the kernels' layout
                    continue
                if transposed and w.is_contiguous():
                    module.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=False)
                elif not transposed and not w.is_contiguous():
                    module.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        self._layout_key = (transposed, modules[0].weight.data_ptr(), modules[-1].weight.data_ptr())

    @staticmethod
    def _fuse(block: Block):
        attn, mlp = block.attn, block.mlp
        d = attn.q_proj.weight.shape[0]
        w_in = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, mlp.fc_in.weight])
        b_in = torch.cat([mlp.fc_in.bias.new_zeros(3 * d), mlp.fc_in.bias])
        w_out = torch.cat([attn.out_proj.weight, mlp.fc_out.weight], dim=1)
        views = [
            (attn.q_proj, w_in[:d]), (attn.k_proj, w_in[d:2 * d]), (attn.v_proj, w_in[2 * d:3 * d]),
            (mlp.fc_in, w_in[3 * d:]), (attn.out_proj, w_out[:, :d]), (mlp.fc_out, w_out[:, d:]),
        ]
        for module, view in views:
            module.weight = as_weight(view)
        mlp.fc_in.bias = nn.Parameter(b_in[3 * d:], requires_grad=False)
        return w_in, b_in, w_out, mlp.fc_out.bias

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
            self.drop_cache()  # the old pool (and the graphs over it) first
            cache = PagedKVCache(c.n_layer, max(blocks, 1), bs, c.n_head, c.head_dim, self.dtype, self.device)
            self.kv_cache = cache
        return cache

    def drop_cache(self) -> None:
        """Free the KV pool and the decode steps (and CUDA graphs) built over it; the next request makes new ones."""
        self.kv_cache, self._decode_steps = None, {}

    def decode_step(self, cache: PagedKVCache) -> DecodeStep:
        """The decode step for the cache's current sequences (one per batch size, reused across requests while the
        cache and the weights it reads stay the same)."""
        batch = len(cache.tables)
        step = self._decode_steps.get(batch)
        key = self._weights_key()
        if step is None or step.cache is not cache or step.weights_key != key:
            use_graph = self.use_cuda_graph and graphs_enabled(self.backend(), self.device)
            step = self._decode_steps[batch] = DecodeStep(self, cache, batch, use_graph)
            step.weights_key = key
        step.load(cache.tables, cache.lengths)
        return step

    def _weights_key(self) -> tuple:
        """What a captured decode graph depends on besides its cache: the backend, the fusion, and the address of
        every weight it reads. A graph replays raw pointers, so once model.to(), a load, or switching the fusion
        on or off replaces a tensor, the old graph would read freed memory: a new key makes a new step."""
        backend, fused = self.backend(), self.fused()
        weights = [t for layer in self.fused_weights() for t in layer] if fused else (self._unfuse() or [])
        weights += list(self.parameters())
        return (backend, fused, self.rope().data_ptr(), *(t.data_ptr() for t in weights))

    @torch.inference_mode()
    def forward_step(self, input_ids: torch.Tensor, meta: StepMetadata, cache: PagedKVCache) -> torch.Tensor:
        """input_ids [N] packed new tokens -> fp32 logits [B, vocab] at each sequence's last new token, or
        [M, vocab] at meta.logits_indices."""
        ops, c = self.ops(), self.config
        if not meta.is_prefill:
            attention = ops.decode_attention
        else:
            attention = ops.extend_attention if meta.has_context else ops.prefill_attention
        gemm = ops  # the projections' ops
        if self.prefill_path not in PREFILL_PATHS:
            raise ValueError(f"prefill_path={self.prefill_path!r} is not one of {PREFILL_PATHS}")
        if meta.is_prefill and self.prefill_path == "torch" and self.backend() != "torch":
            from . import torch_prefill as gemm

            if not meta.has_context:
                attention = gemm.prefill_attention
        rope = self.rope()
        if self.fused():
            fused = self.fused_weights()
        else:
            fused = self._unfuse()
            self._gemm_layout()
        d, shape = c.n_embd, (-1, c.n_head, c.head_dim)
        x = self.transformer.wte(input_ids)  # [N, d]
        for layer, block in enumerate(self.transformer.h):
            ln_1 = (block.ln_1.weight, block.ln_1.bias, c.layer_norm_epsilon)
            if fused:  # two GEMMs a layer; rounding differs from HF's four, so the reference path stays unfused
                w_in, b_in, w_out, b_out = fused[layer]
                # ln_1 inside the first GEMM where the backend can (the Triton GEMV): [N, 3d + d_ff]
                y = gemm.layer_norm_linear_split_gelu(x, *ln_1, w_in, b_in, 3 * d, c.activation_function)
                q, k, v = (y[:, i * d:(i + 1) * d].view(shape) for i in range(3))  # views: token stride 3d + d_ff
                a = attention(q, k, v, meta, cache.k[layer], cache.v[layer], rope, c.rotary_dim)
                x = gemm.linear_concat_residual(a.reshape(-1, d), y[:, 3 * d:], w_out, b_out, x)  # [a | m] in place
                continue
            h = ops.layer_norm(x, *ln_1)
            q = gemm.linear(h, block.attn.q_proj.weight).view(shape)  # [N, H, D]
            k = gemm.linear(h, block.attn.k_proj.weight).view(shape)
            v = gemm.linear(h, block.attn.v_proj.weight).view(shape)
            a = attention(q, k, v, meta, cache.k[layer], cache.v[layer], rope, c.rotary_dim)  # [N, H, D]
            a = gemm.linear(a.reshape(-1, d), block.attn.out_proj.weight)
            m = gemm.linear_gelu(h, block.mlp.fc_in.weight, block.mlp.fc_in.bias, c.activation_function)
            m = gemm.linear(m, block.mlp.fc_out.weight, block.mlp.fc_out.bias)
            x = a + m + x  # HF's order: (attention + MLP) + residual
        if meta.logits_indices is not None:
            x = x[meta.logits_indices]  # [M, d]
        elif meta.is_prefill:  # a decode step's N tokens are its B sequences' last ones already, in order
            x = x[meta.last_token]  # [B, d]
        if x.shape[0] == 0:  # a step that only fills the cache (a chunk in the middle of a prompt)
            return torch.empty(0, c.vocab_size, dtype=torch.float32, device=x.device)
        x = ops.layer_norm(x, self.transformer.ln_f.weight, self.transformer.ln_f.bias, c.layer_norm_epsilon)
        return ops.linear(x, self.lm_head.weight, self.lm_head.bias).float()
