"""Per-op benchmarks at a model's shapes, on each runnable backend, against the library baseline of each op.

Ops are looked up by the names of kogpt_fast/reference.py on each backend's ops module:
  linear, linear_gelu  the projections at M tokens: qkv (fused, d -> 3d), out_proj (d -> d; q, k, v unfused are
                       the same shape), fc_in (+bias +GELU, d -> d_ff), fc_out (+bias, d_ff -> d),
                       lm_head (+bias, d -> vocab). Baseline: cuBLAS through F.linear, plus a separate F.gelu
                       for fc_in.
  linear_split_gelu,   GPT-J's fused GEMMs (the fast path's two GEMMs a layer): fused_in (q | k | v | gelu(fc_in),
  linear_concat_residual, d -> 3d + d_ff), ln_fused_in (the same after ln_1, as the model calls it) and fused_out
  layer_norm_linear_split_gelu  ([a | gelu(fc_in)] read in place -> d, + residual).
                       Baseline: cuBLAS over the same weights, the GELU / concatenation / residual add as torch ops.
  quantized            the same ops with int8 / fp8 QuantizedWeights (kogpt_fast.quant: one byte a weight plus a scale a
                       row), where the model reads them: ln_fused_in, fused_out and lm_head, params weights=int8|fp8
                       (fp8 where it runs: compute capability 8.9+, or the CPU's torch backend). Bytes: those actually
                       read (the one-byte data and the scales). Baseline: cuBLAS over the dense weights in the
                       activation dtype, credited its own (two-byte) traffic: the speedup is what the bytes save.
  prefill_attention    causal attention over one T-token sequence, with RoPE and the paged KV-cache write.
                       Baseline: SDPA (flash), which does the attention only.
  decode_attention     one new token per sequence over a paged cache of `context` tokens, RoPE and cache write
                       included. Baseline: SDPA over a contiguous [B, H, context, D] cache.
  extend_attention     a chunk of T new tokens over `cached` paged tokens of its sequence (chunked prefill, a
                       prefix-cache hit), causal among themselves, RoPE and cache write included. Baseline: SDPA
                       over a contiguous cache with the chunk's causal mask.
  write_kv_cache       K and V of N tokens into the block pool at slot_mapping. Baseline: index_copy_.
  layer_norm           [M, d]. Baseline: F.layer_norm.

Every figure is judged against the roofline measured in the same run (timing.measure_peaks):
time >= max(bytes / copy bandwidth, flops / matmul peak). `bytes` is the traffic the op cannot avoid (inputs
read once, outputs written once); a baseline that does less (SDPA writes no cache) is credited its own bytes.
"""
from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

from kogpt_fast import quant
from kogpt_fast.config import GPTJConfig
from kogpt_fast.kv_cache import PagedKVCache

from .timing import Peaks, Timer, copies_for

BLOCK_SIZE = 16  # the model's kv_block_size

Call = Callable[[], torch.Tensor]


@dataclass
class Case:
    op: str  # the ops-module function under test
    name: str  # which instance of it: "fc_in", "prefill", ...
    params: dict  # the shape
    bytes: int  # traffic the op cannot avoid
    flops: int
    set_bytes: int  # bytes of one copy of the inputs: decides how many copies are rotated
    op_call: Callable[[ModuleType, int], Call]  # (ops module, copy index) -> a call returning the output
    baseline_name: str
    baseline_call: Callable[[int], Call]  # copy index -> a call
    baseline_bytes: int | None = None  # when the baseline does less work than the op
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} " + " ".join(f"{k}={v}" for k, v in self.params.items())


@dataclass
class Shapes:
    """Which sizes to run: tokens M for projections and LayerNorm, T for prefill, context x batch for decode."""

    tokens: list[int]
    prefill: list[int]
    decode_context: list[int]
    decode_batch: list[int]
    kv_write: list[int]
    layer_norm: list[int]
    extend: list[tuple[int, int]] = field(default_factory=list)  # (new tokens T, cached tokens)


def shapes_for(device: torch.device, quick: bool) -> Shapes:
    if device.type != "cuda":  # tiny shapes: a smoke test of the machinery, seconds on a CPU
        if quick:
            return Shapes([1, 16], [32], [32], [1, 4], [16], [16], [(16, 32)])
        return Shapes([1, 4, 16, 64], [16, 64], [16, 64], [1, 4], [4, 64], [1, 64], [(16, 32), (64, 64)])
    if quick:
        return Shapes([1, 64, 2048], [128, 2048], [512, 2048], [1, 64], [64, 2048], [1, 2048], [(512, 1536)])
    return Shapes([1, 4, 16, 64, 256, 2048], [128, 512, 2048], [128, 512, 2048], [1, 16, 64], [1, 64, 2048],
                  [1, 64, 2048], [(128, 1920), (512, 1536), (512, 0)])


class _Random:
    """Seeded inputs on the device: copy i of a case is the same tensor on every backend."""

    def __init__(self, device, dtype, key: str):
        self.device, self.dtype = device, dtype
        self.g = torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))

    def randn(self, *shape, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        t = torch.randn(shape, generator=self.g, device=self.device, dtype=self.dtype)
        return t.mul_(scale).add_(offset) if (scale != 1.0 or offset) else t


def _sdpa_flash():
    """A context that restricts SDPA to flash attention on CUDA (a no-op elsewhere or on old torch)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def projection_cases(c: GPTJConfig, tokens: list[int], device, dtype) -> list[Case]:
    d, ff, vocab = c.n_embd, c.n_inner, c.vocab_size
    elt = torch.tensor([], dtype=dtype).element_size()
    shapes = [  # (name, K, N, bias, gelu)
        ("qkv", d, 3 * d, False, False),
        ("out_proj", d, d, False, False),
        ("fc_in", d, ff, True, True),
        ("fc_out", ff, d, True, False),
        ("lm_head", d, vocab, True, False),
    ]
    library = "cublas" if torch.device(device).type == "cuda" else "F.linear"
    cases = []
    for name, k, n, has_bias, gelu in shapes:
        for m in tokens:
            def inputs(i, name=name, k=k, n=n, m=m, has_bias=has_bias):
                r = _Random(device, dtype, f"{name}/{m}/{i}")
                x = r.randn(m, k)
                w = r.randn(n, k, scale=k**-0.5)
                b = r.randn(n, scale=0.1) if has_bias else None
                return x, w, b

            def op_call(ops, i, inputs=inputs, gelu=gelu):
                x, w, b = inputs(i)
                if gelu:
                    return lambda: ops.linear_gelu(x, w, b, c.activation_function)
                return lambda: ops.linear(x, w, b)

            def baseline_call(i, inputs=inputs, gelu=gelu):
                x, w, b = inputs(i)
                if gelu:
                    return lambda: F.gelu(F.linear(x, w, b), approximate="tanh")
                return lambda: F.linear(x, w, b)

            nbytes = (m * k + n * k + m * n + (n if has_bias else 0)) * elt
            cases.append(Case(
                op="linear_gelu" if gelu else "linear", name=name, params={"M": m, "K": k, "N": n},
                bytes=nbytes, flops=2 * m * n * k, set_bytes=nbytes, op_call=op_call,
                baseline_name=f"{library}+gelu" if gelu else library, baseline_call=baseline_call,
            ))
    return cases


def fused_cases(c: GPTJConfig, tokens: list[int], device, dtype) -> list[Case]:
    """GPT-J's two fused GEMMs as the model runs them on the fast path: q | k | v | gelu(fc_in) from one GEMM over
    ln_1(x) (linear_split_gelu), and out_proj + fc_out from one over [a | gelu(fc_in)] read in place, into the
    residual (linear_concat_residual). Baselines: cuBLAS on the same fused weights, with what it cannot fuse (the
    GELU of the fc_in columns; the concatenation and the residual add) as separate torch ops."""
    d, ff = c.n_embd, c.n_inner
    elt = torch.tensor([], dtype=dtype).element_size()
    library = "cublas" if torch.device(device).type == "cuda" else "F.linear"
    cases = []
    for m in tokens:
        def in_inputs(i, m=m):
            r = _Random(device, dtype, f"fused_in/{m}/{i}")
            x = r.randn(m, d)
            w = r.randn(3 * d + ff, d, scale=d**-0.5)
            b = torch.cat([torch.zeros(3 * d, device=device, dtype=dtype), r.randn(ff, scale=0.1)])
            return x, w, b

        def in_op(ops, i, in_inputs=in_inputs):
            x, w, b = in_inputs(i)
            return lambda: ops.linear_split_gelu(x, w, b, 3 * d, c.activation_function)

        def in_baseline(i, in_inputs=in_inputs):
            x, w, b = in_inputs(i)

            def call():
                y = F.linear(x, w, b)
                y[:, 3 * d:] = F.gelu(y[:, 3 * d:], approximate="tanh")
                return y
            return call

        n_in = 3 * d + ff
        nbytes = (m * d + n_in * d + n_in + m * n_in) * elt
        cases.append(Case(
            op="linear_split_gelu", name="fused_in", params={"M": m, "K": d, "N": n_in}, bytes=nbytes,
            flops=2 * m * n_in * d, set_bytes=nbytes, op_call=in_op, baseline_name=f"{library}+gelu",
            baseline_call=in_baseline,
        ))

        def ln_op(ops, i, in_inputs=in_inputs):
            x, w, b = in_inputs(i)
            g = torch.ones(d, device=device, dtype=dtype)
            beta = torch.zeros(d, device=device, dtype=dtype)
            return lambda: ops.layer_norm_linear_split_gelu(x, g, beta, c.layer_norm_epsilon, w, b, 3 * d,
                                                            c.activation_function)

        def ln_baseline(i, in_inputs=in_inputs):
            x, w, b = in_inputs(i)
            g = torch.ones(d, device=device, dtype=dtype)
            beta = torch.zeros(d, device=device, dtype=dtype)

            def call():
                y = F.linear(F.layer_norm(x, (d,), g, beta, c.layer_norm_epsilon), w, b)
                y[:, 3 * d:] = F.gelu(y[:, 3 * d:], approximate="tanh")
                return y
            return call

        cases.append(Case(
            op="layer_norm_linear_split_gelu", name="ln_fused_in", params={"M": m, "K": d, "N": n_in},
            bytes=nbytes + 2 * d * elt, flops=2 * m * n_in * d, set_bytes=nbytes, op_call=ln_op,
            baseline_name=f"layer_norm+{library}+gelu", baseline_call=ln_baseline,
            notes=["ln_1 and the first fused GEMM: on the triton backend one kernel at M <= 2"],
        ))

        def out_inputs(i, m=m):
            r = _Random(device, dtype, f"fused_out/{m}/{i}")
            a = r.randn(m, d)
            y = r.randn(m, 3 * d + ff)  # the first fused GEMM's output: x2 is its fc_in columns, read in place
            w = r.randn(d, d + ff, scale=(d + ff) ** -0.5)
            b = r.randn(d, scale=0.1)
            residual = r.randn(m, d)
            return a, y[:, 3 * d:], w, b, residual

        def out_op(ops, i, out_inputs=out_inputs):
            a, m_cols, w, b, residual = out_inputs(i)
            return lambda: ops.linear_concat_residual(a, m_cols, w, b, residual)

        def out_baseline(i, out_inputs=out_inputs):
            a, m_cols, w, b, residual = out_inputs(i)
            return lambda: F.linear(torch.cat([a, m_cols], dim=1), w, b) + residual

        nbytes = (m * (d + ff) + d * (d + ff) + d + 2 * m * d) * elt
        cases.append(Case(
            op="linear_concat_residual", name="fused_out", params={"M": m, "K": d + ff, "N": d}, bytes=nbytes,
            flops=2 * m * d * (d + ff), set_bytes=nbytes, op_call=out_op, baseline_name=f"cat+{library}+add",
            baseline_call=out_baseline,
        ))
    return cases


def quantized_schemes(device) -> list[str]:
    """The schemes the device's fastest backend runs (fp8: compute capability 8.9+ on a GPU; the CPU's torch)."""
    backend = "cuda" if torch.device(device).type == "cuda" else "torch"
    return [s for s in quant.SCHEMES if quant.unavailable_reason(s, backend, torch.device(device)) is None]


def quantized_cases(c: GPTJConfig, tokens: list[int], device, dtype) -> list[Case]:
    """The model's large GEMMs with quantized weights (module docstring): ln_1 + q|k|v|gelu(fc_in), out_proj + fc_out
    into the residual, and the lm_head."""
    d, ff, vocab, eps = c.n_embd, c.n_inner, c.vocab_size, c.layer_norm_epsilon
    elt = torch.tensor([], dtype=dtype).element_size()
    library = "cublas" if torch.device(device).type == "cuda" else "F.linear"
    shapes = {  # name: (N, K1, K2, op)
        "ln_fused_in": (3 * d + ff, d, 0, "layer_norm_linear_split_gelu"),
        "fused_out": (d, d, ff, "linear_concat_residual"),
        "lm_head": (vocab, d, 0, "linear"),
    }
    cases = []
    for scheme in quantized_schemes(device):
        for name, (n, k1, k2, op) in shapes.items():
            for m in tokens:
                def inputs(i, name=name, n=n, k1=k1, k2=k2, m=m, scheme=scheme):
                    r = _Random(device, dtype, f"{name}/{scheme}/{m}/{i}")
                    w = r.randn(n, k1 + k2, scale=(k1 + k2) ** -0.5)
                    x, x2 = r.randn(m, k1), r.randn(m, k2) if k2 else None
                    b, residual = r.randn(n, scale=0.1), r.randn(m, n)
                    gain, shift = r.randn(d, scale=0.1, offset=1.0), r.randn(d, scale=0.1)
                    return x, x2, w, b, residual, gain, shift

                def op_call(ops, i, inputs=inputs, op=op, name=name, scheme=scheme):
                    x, x2, w, b, residual, gain, shift = inputs(i)
                    qw = quant.quantize(w, scheme, dtype)  # only the kernel's side reads the quantized weight
                    if op == "layer_norm_linear_split_gelu":
                        return lambda: ops.layer_norm_linear_split_gelu(x, gain, shift, eps, qw, b, 3 * d,
                                                                        c.activation_function)
                    if op == "linear_concat_residual":
                        return lambda: ops.linear_concat_residual(x, x2, qw, b, residual)
                    return lambda: ops.linear(x, qw, b)

                def baseline_call(i, inputs=inputs, op=op):
                    x, x2, w, b, residual, gain, shift = inputs(i)
                    if op == "layer_norm_linear_split_gelu":
                        def call():
                            y = F.linear(F.layer_norm(x, (d,), gain, shift, eps), w, b)
                            y[:, 3 * d:] = F.gelu(y[:, 3 * d:], approximate="tanh")
                            return y
                        return call
                    if op == "linear_concat_residual":
                        return lambda: F.linear(torch.cat([x, x2], dim=1), w, b) + residual
                    return lambda: F.linear(x, w, b)

                k = k1 + k2
                activations = (m * k + m * n + n + (m * n if k2 else 0) + (2 * d if k2 == 0 and op != "linear" else 0))
                nbytes = n * k + n * elt + activations * elt  # one byte a weight, a scale a row
                dense_bytes = (n * k + activations) * elt
                cases.append(Case(
                    op=op, name=name, params={"M": m, "K": k, "N": n, "weights": scheme}, bytes=nbytes,
                    flops=2 * m * n * k, set_bytes=nbytes + dense_bytes, op_call=op_call,
                    baseline_name=f"{library}-{str(dtype).removeprefix('torch.')}", baseline_call=baseline_call,
                    baseline_bytes=dense_bytes,
                    notes=[f"{scheme} weights decoded in the kernel; the baseline reads the dense weights"],
                ))
    return cases


def _paged_cache(c: GPTJConfig, lengths: list[int], new_tokens: int, device, dtype, r: _Random):
    """A one-layer paged cache holding `lengths[b]` random tokens per sequence, planned for `new_tokens` more."""
    cache = PagedKVCache(1, sum(-(-(n + new_tokens) // BLOCK_SIZE) for n in lengths), BLOCK_SIZE, c.n_head,
                         c.head_dim, dtype, device)
    cache.k.normal_(generator=r.g)
    cache.v.normal_(generator=r.g)
    cache.start(lengths)
    if any(lengths):
        cache.plan(lengths, torch.zeros(sum(lengths), dtype=torch.int64), is_prefill=True)
    return cache


def prefill_cases(c: GPTJConfig, lengths: list[int], device, dtype) -> list[Case]:
    h, dh = c.n_head, c.head_dim
    elt = torch.tensor([], dtype=dtype).element_size()
    cases = []
    for t in lengths:
        def op_call(ops, i, t=t):
            r = _Random(device, dtype, f"prefill/{t}/{i}")
            q, k, v = (r.randn(t, h, dh) for _ in range(3))
            cache = _paged_cache(c, [0], t, device, dtype, r)
            meta = cache.plan([t], torch.arange(t), is_prefill=True)
            rope = ops.rope_table(c.n_positions, c.rotary_dim, device)
            return lambda: ops.prefill_attention(q, k, v, meta, cache.k[0], cache.v[0], rope, c.rotary_dim)

        def baseline_call(i, t=t):
            r = _Random(device, dtype, f"prefill-sdpa/{t}/{i}")
            q, k, v = (r.randn(1, h, t, dh) for _ in range(3))

            def call():
                with _sdpa_flash() if q.is_cuda else contextlib.nullcontext():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return call

        qkvo = 4 * t * h * dh * elt
        cases.append(Case(
            op="prefill_attention", name="prefill", params={"T": t, "H": h, "D": dh},
            bytes=qkvo + 2 * t * h * dh * elt, flops=2 * h * dh * t * (t + 1), set_bytes=qkvo + 2 * t * h * dh * elt,
            op_call=op_call, baseline_name="sdpa-flash" if device.type == "cuda" else "sdpa",
            baseline_call=baseline_call, baseline_bytes=qkvo,
            notes=["the op also applies RoPE and writes K, V to the paged cache; the baseline does neither"],
        ))
    return cases


def decode_cases(c: GPTJConfig, contexts: list[int], batches: list[int], device, dtype) -> list[Case]:
    h, dh = c.n_head, c.head_dim
    elt = torch.tensor([], dtype=dtype).element_size()
    cases = []
    for ctx in contexts:
        for b in batches:
            def op_call(ops, i, ctx=ctx, b=b):
                r = _Random(device, dtype, f"decode/{ctx}/{b}/{i}")
                q, k, v = (r.randn(b, h, dh) for _ in range(3))
                cache = _paged_cache(c, [ctx - 1] * b, 1, device, dtype, r)
                meta = cache.plan([1] * b, torch.full((b,), ctx - 1), is_prefill=False)
                rope = ops.rope_table(c.n_positions, c.rotary_dim, device)
                return lambda: ops.decode_attention(q, k, v, meta, cache.k[0], cache.v[0], rope, c.rotary_dim)

            def baseline_call(i, ctx=ctx, b=b):
                r = _Random(device, dtype, f"decode-sdpa/{ctx}/{b}/{i}")
                q = r.randn(b, h, 1, dh)
                k, v = r.randn(b, h, ctx, dh), r.randn(b, h, ctx, dh)
                return lambda: F.scaled_dot_product_attention(q, k, v)

            kv = 2 * b * ctx * h * dh * elt
            small = b * h * dh * elt  # q, k, v in; out; k, v written
            cases.append(Case(
                op="decode_attention", name="decode", params={"context": ctx, "batch": b, "H": h, "D": dh},
                bytes=kv + 6 * small, flops=4 * b * h * ctx * dh, set_bytes=kv + 6 * small, op_call=op_call,
                baseline_name="sdpa-contiguous", baseline_call=baseline_call, baseline_bytes=kv + 2 * small,
                notes=["the op reads a paged cache, applies RoPE to the new q, k and writes them; the baseline "
                       "attends over a contiguous cache"],
            ))
    return cases


def extend_cases(c: GPTJConfig, shapes: list[tuple[int, int]], device, dtype) -> list[Case]:
    h, dh = c.n_head, c.head_dim
    elt = torch.tensor([], dtype=dtype).element_size()
    cases = []
    for t, cached in shapes:
        def op_call(ops, i, t=t, cached=cached):
            r = _Random(device, dtype, f"extend/{t}/{cached}/{i}")
            q, k, v = (r.randn(t, h, dh) for _ in range(3))
            cache = _paged_cache(c, [cached], t, device, dtype, r)
            meta = cache.plan([t], torch.arange(cached, cached + t), is_prefill=True)
            rope = ops.rope_table(c.n_positions, c.rotary_dim, device)
            return lambda: ops.extend_attention(q, k, v, meta, cache.k[0], cache.v[0], rope, c.rotary_dim)

        def baseline_call(i, t=t, cached=cached):
            r = _Random(device, dtype, f"extend-sdpa/{t}/{cached}/{i}")
            q = r.randn(1, h, t, dh)
            k, v = r.randn(1, h, cached + t, dh), r.randn(1, h, cached + t, dh)
            mask = torch.ones(t, cached + t, dtype=torch.bool, device=device).tril(cached)  # row i sees cached + i
            return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        new = 4 * t * h * dh * elt  # q, k, v in, out
        kv = 2 * (cached + t) * h * dh * elt
        cases.append(Case(
            op="extend_attention", name="extend", params={"T": t, "cached": cached, "H": h, "D": dh},
            bytes=new + kv, flops=4 * h * dh * t * (cached + (t + 1) / 2), set_bytes=new + kv, op_call=op_call,
            baseline_name="sdpa-contiguous-masked", baseline_call=baseline_call, baseline_bytes=new + kv,
            notes=["the op reads a paged cache, applies RoPE and writes the chunk's K, V; the baseline attends "
                   "over a contiguous cache with a mask"],
        ))
    return cases


def kv_write_cases(c: GPTJConfig, tokens: list[int], device, dtype) -> list[Case]:
    h, dh = c.n_head, c.head_dim
    elt = torch.tensor([], dtype=dtype).element_size()
    cases = []
    for n in tokens:
        def inputs(i, n=n):
            r = _Random(device, dtype, f"kv_write/{n}/{i}")
            k, v = r.randn(n, h, dh), r.randn(n, h, dh)
            blocks = 2 * -(-n // BLOCK_SIZE)
            k_cache, v_cache = r.randn(blocks, BLOCK_SIZE, h, dh), r.randn(blocks, BLOCK_SIZE, h, dh)
            slots = torch.randperm(blocks * BLOCK_SIZE, generator=r.g, device=device)[:n]
            return k, v, k_cache, v_cache, slots

        def op_call(ops, i, inputs=inputs):
            k, v, k_cache, v_cache, slots = inputs(i)
            return lambda: (ops.write_kv_cache(k, v, k_cache, v_cache, slots), k_cache)[1]

        def baseline_call(i, inputs=inputs):
            k, v, k_cache, v_cache, slots = inputs(i)

            def call():
                k_cache.view(-1, h, dh).index_copy_(0, slots, k)
                v_cache.view(-1, h, dh).index_copy_(0, slots, v)
                return k_cache
            return call

        nbytes = 4 * n * h * dh * elt + 8 * n
        cases.append(Case(
            op="write_kv_cache", name="kv_write", params={"N": n, "H": h, "D": dh}, bytes=nbytes, flops=0,
            set_bytes=nbytes, op_call=op_call, baseline_name="index_copy", baseline_call=baseline_call,
        ))
    return cases


def layer_norm_cases(c: GPTJConfig, tokens: list[int], device, dtype) -> list[Case]:
    d, eps = c.n_embd, c.layer_norm_epsilon
    elt = torch.tensor([], dtype=dtype).element_size()
    cases = []
    for m in tokens:
        def inputs(i, m=m):
            r = _Random(device, dtype, f"layer_norm/{m}/{i}")
            return r.randn(m, d), r.randn(d, scale=0.1, offset=1.0), r.randn(d, scale=0.1)

        def op_call(ops, i, inputs=inputs):
            x, w, b = inputs(i)
            return lambda: ops.layer_norm(x, w, b, eps)

        def baseline_call(i, inputs=inputs):
            x, w, b = inputs(i)
            return lambda: F.layer_norm(x, (d,), w, b, eps)

        nbytes = (2 * m * d + 2 * d) * elt
        cases.append(Case(
            op="layer_norm", name="layer_norm", params={"M": m, "d": d}, bytes=nbytes, flops=8 * m * d,
            set_bytes=nbytes, op_call=op_call, baseline_name="torch-layer_norm", baseline_call=baseline_call,
        ))
    return cases


# The order of the tables and plots.
NAME_ORDER = ("qkv", "out_proj", "fc_in", "fc_out", "lm_head", "fused_in", "ln_fused_in", "fused_out", "prefill", "extend",
              "decode", "kv_write", "layer_norm")


def all_cases(c: GPTJConfig, shapes: Shapes, device, dtype) -> list[Case]:
    """In the order they run: what decides decode speed first (M=1 projections, decode attention), then prefill,
    so that a run cut short by --budget has measured what matters most."""
    first, rest = shapes.tokens[:1], shapes.tokens[1:]
    return (
        projection_cases(c, first, device, dtype)
        + fused_cases(c, first, device, dtype)
        + quantized_cases(c, first, device, dtype)
        + decode_cases(c, shapes.decode_context, shapes.decode_batch, device, dtype)
        + prefill_cases(c, shapes.prefill, device, dtype)
        + extend_cases(c, shapes.extend, device, dtype)
        + projection_cases(c, rest, device, dtype)
        + fused_cases(c, rest, device, dtype)
        + quantized_cases(c, rest[-1:], device, dtype)
        + kv_write_cases(c, shapes.kv_write, device, dtype)
        + layer_norm_cases(c, shapes.layer_norm, device, dtype)
    )


def display_order(record: dict) -> tuple:
    """Sort key of a record for tables and plots: by op instance, then by shape, the baseline first."""
    name = record.get("name")
    rank = NAME_ORDER.index(name) if name in NAME_ORDER else len(NAME_ORDER)
    return rank, list(record.get("params", {}).values()), not record.get("is_baseline", False)


def _figures(case: Case, impl: str, is_baseline: bool, seconds: float, peaks: Peaks) -> dict:
    nbytes = case.baseline_bytes if is_baseline and case.baseline_bytes is not None else case.bytes
    roofline_s = max(nbytes / peaks.copy_bytes_per_s, case.flops / peaks.matmul_flop_per_s)
    bandwidth = nbytes / seconds
    throughput = case.flops / seconds
    return {
        "op": case.op, "name": case.name, "label": case.label, "params": case.params, "impl": impl,
        "is_baseline": is_baseline, "bytes": nbytes, "flops": case.flops,
        "time": {"value": seconds * 1e6, "unit": "us"},
        "bandwidth": {"value": bandwidth / 1e12, "unit": "TB/s"},
        "throughput": {"value": throughput / 1e12, "unit": "TFLOP/s"},
        "fraction_of_copy_bandwidth": {"value": bandwidth / peaks.copy_bytes_per_s, "unit": "fraction"},
        "fraction_of_matmul_peak": {"value": throughput / peaks.matmul_flop_per_s, "unit": "fraction"},
        "fraction_of_roofline": {"value": roofline_s / seconds, "unit": "fraction"},
    }


def _max_diff(got: torch.Tensor, expected: torch.Tensor) -> dict:
    diff = (got.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    return {"value": diff, "unit": "abs", "relative_to_max_abs": diff / scale if scale else None}


def run_case(case: Case, impls: dict[str, ModuleType], timer: Timer, peaks: Peaks) -> list[dict]:
    """The baseline, then each backend (torch first: its output is what the others are compared with)."""
    device = timer.device
    copies = copies_for(case.set_bytes, device)
    records = []
    try:
        m = timer.measure([case.baseline_call(i) for i in range(copies)])
        baseline_s = m.median_s
        records.append({**_figures(case, case.baseline_name, True, m.median_s, peaks),
                        "samples": m.samples, "copies": m.copies, "timing": m.method, "baseline": None})
    except Exception as e:  # a baseline the device cannot run (e.g. no flash kernel for this shape)
        baseline_s = None
        records.append({"op": case.op, "name": case.name, "label": case.label, "params": case.params,
                        "impl": case.baseline_name, "is_baseline": True, "error": _one_line(e)})
    expected = None
    for name, ops in impls.items():
        fn = getattr(ops, case.op, None)
        if fn is None:
            records.append({"op": case.op, "name": case.name, "label": case.label, "params": case.params,
                            "impl": name, "is_baseline": False, "skipped": f"the {name} backend has no {case.op}"})
            continue
        try:
            calls = [case.op_call(ops, i) for i in range(copies)]
            out = calls[0]()
            check = _max_diff(out, expected) if expected is not None else None
            if name == "torch":
                expected = out.clone()
            m = timer.measure(calls)
            del calls, out
        except Exception as e:
            records.append({"op": case.op, "name": case.name, "label": case.label, "params": case.params,
                            "impl": name, "is_baseline": False, "error": _one_line(e)})
            continue
        rec = {**_figures(case, name, False, m.median_s, peaks), "samples": m.samples, "copies": m.copies,
               "timing": m.method}
        rec["baseline"] = None if baseline_s is None else {
            "impl": case.baseline_name, "time": {"value": baseline_s * 1e6, "unit": "us"}}
        rec["speedup_vs_baseline"] = None if baseline_s is None else {"value": baseline_s / m.median_s, "unit": "x"}
        rec["max_diff_vs_torch"] = check
        if case.notes:
            rec["notes"] = case.notes
        records.append(rec)
    return records


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]
