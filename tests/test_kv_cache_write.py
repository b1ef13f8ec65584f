"""The Triton cache write (RoPE on K, then K and V stored by slot) equals reference.apply_rope +
reference.write_kv_cache exactly: it moves data and rounds exactly as the reference rounds."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernels run on the CPU interpreter
pytest.importorskip("triton", reason="triton is not installed")

from kogpt_fast import backends, reference  # noqa: E402

kv_cache_write = backends.triton_kernels("kv_cache_write")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The interpreter cannot round to bfloat16 (its fp32 -> bf16 cast truncates): bfloat16 only on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def random_write(n_tokens, n_head, head_dim, rotary_dim, block_size, dtype, seed=0):
    """Inputs for one write: tokens scattered over a shuffled pool, every fifth one not cached (slot -1)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = -(-n_tokens // block_size) + 3
    k = torch.randn(n_tokens, n_head, head_dim, generator=g).to(dtype)
    v = torch.randn(n_tokens, n_head, head_dim, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n_tokens]
    slots[2::5] = -1
    positions = torch.randint(0, 2048, (n_tokens,), generator=g)
    cache = torch.randn(2, num_blocks, block_size, n_head, head_dim, generator=g).to(dtype)
    tensors = dict(k=k, v=v, k_cache=cache[0], v_cache=cache[1], slot_mapping=slots, positions=positions,
                   rope=reference.rope_table(2048, rotary_dim) if rotary_dim else None)
    return {name: t.to(DEVICE) if t is not None else None for name, t in tensors.items()}


def reference_write(k, v, k_cache, v_cache, slot_mapping, positions, rope, rotary_dim):
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    if rotary_dim:
        k = reference.apply_rope(k, positions, rope, rotary_dim)
    reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return k_cache, v_cache


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_tokens, block_size", [(1, 16), (7, 1), (33, 8), (130, 16)])
@pytest.mark.parametrize(
    "n_head, head_dim, rotary_dim",
    [(2, 256, 64), (3, 80, 80), (4, 32, 0)],  # KoGPT's heads; rotary over a whole non-power-of-two head; no RoPE
    ids=["kogpt", "full_rotary_d80", "no_rope_d32"],
)
def test_write_equals_reference(n_tokens, n_head, head_dim, rotary_dim, block_size, dtype):
    t = random_write(n_tokens, n_head, head_dim, rotary_dim, block_size, dtype, seed=n_tokens + block_size)
    expected_k, expected_v = reference_write(**t, rotary_dim=rotary_dim)
    kv_cache_write.write_kv_cache(**t, rotary_dim=rotary_dim)
    assert torch.equal(t["v_cache"], expected_v)
    mismatch = (t["k_cache"] != expected_k).sum().item()
    assert mismatch == 0, f"{mismatch} rotated key elements differ from the reference"


def as_column_slices(k, v, extra=24):
    """k, v as views into one wider [N, 2 * H * D + extra] buffer: last two dims contiguous, token stride
    2 * H * D + extra (the model's views into the fused GEMM's output). Same values."""
    n, h, d = k.shape
    wide = torch.randn(n, 2 * h * d + extra, generator=torch.Generator().manual_seed(5)).to(k.dtype).to(k.device)
    wide[:, :h * d] = k.reshape(n, h * d)
    wide[:, h * d:2 * h * d] = v.reshape(n, h * d)
    return wide[:, :h * d].view(-1, h, d), wide[:, h * d:2 * h * d].view(-1, h, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "n_head, head_dim, rotary_dim", [(2, 256, 64), (3, 80, 80), (4, 32, 0)], ids=["kogpt", "full_rotary_d80",
                                                                                 "no_rope_d32"],
)
def test_write_column_slices_of_a_wider_buffer(n_head, head_dim, rotary_dim, dtype):
    t = random_write(33, n_head, head_dim, rotary_dim, 8, dtype, seed=21)
    expected_k, expected_v = reference_write(**t, rotary_dim=rotary_dim)
    t["k"], t["v"] = as_column_slices(t["k"], t["v"])
    assert t["k"].stride(0) > n_head * head_dim and not t["k"].is_contiguous()
    kv_cache_write.write_kv_cache(**t, rotary_dim=rotary_dim)
    assert torch.equal(t["v_cache"], expected_v)
    assert torch.equal(t["k_cache"], expected_k)


def test_bad_inputs_raise_value_errors():
    t = random_write(4, 2, 32, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="v must have shape"):
        kv_cache_write.write_kv_cache(**{**t, "v": t["v"][:, :1].contiguous()}, rotary_dim=16)
    with pytest.raises(ValueError, match="dtypes differ"):
        kv_cache_write.write_kv_cache(**{**t, "v": t["v"].half()}, rotary_dim=16)
    with pytest.raises(ValueError, match="k must be contiguous"):
        kv_cache_write.write_kv_cache(**{**t, "k": t["k"].transpose(0, 1).contiguous().transpose(0, 1)}, rotary_dim=16)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        kv_cache_write.write_kv_cache(**t, rotary_dim=15)
    with pytest.raises(ValueError, match="rope table"):
        kv_cache_write.write_kv_cache(**t, rotary_dim=8)
    with pytest.raises(ValueError, match="slot_mapping must"):
        kv_cache_write.write_kv_cache(**{**t, "slot_mapping": t["slot_mapping"].float()}, rotary_dim=16)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("n_tokens", [1, 2048])
def test_write_equals_reference_kogpt_6b_shapes(n_tokens, dtype):
    t = random_write(n_tokens, 16, 256, 64, 16, dtype)
    expected_k, expected_v = reference_write(**t, rotary_dim=64)
    kv_cache_write.write_kv_cache(**t, rotary_dim=64)
    assert torch.equal(t["v_cache"], expected_v) and torch.equal(t["k_cache"], expected_k)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_write_column_slices_kogpt_6b_shapes(dtype):
    t = random_write(2048, 16, 256, 64, 16, dtype)
    expected_k, expected_v = reference_write(**t, rotary_dim=64)
    t["k"], t["v"] = as_column_slices(t["k"], t["v"])
    kv_cache_write.write_kv_cache(**t, rotary_dim=64)
    assert torch.equal(t["v_cache"], expected_v) and torch.equal(t["k_cache"], expected_k)


# ---- apply_rope on its own (the torch prefill path rotates q and k with it before SDPA) ----

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim, rotary_dim", [(256, 64), (32, 16), (80, 80), (64, 2)])
def test_apply_rope_equals_the_reference_bitwise(head_dim, rotary_dim, dtype):
    """x as a column slice of a wider buffer (token stride > H * D), positions out of order."""
    rope_kernels = backends.triton_kernels("rope")
    g = torch.Generator().manual_seed(head_dim + rotary_dim)
    n, h = 37, 3
    wide = torch.randn(n, h * head_dim + 24, generator=g).to(dtype).to(DEVICE)
    x = wide[:, 8:8 + h * head_dim].view(n, h, head_dim)
    positions = torch.randint(0, 2048, (n,), generator=g).to(DEVICE)
    table = reference.rope_table(2048, rotary_dim).to(DEVICE)
    got = rope_kernels.apply_rope(x, positions, table, rotary_dim)
    assert got.is_contiguous() and got.shape == x.shape
    assert torch.equal(got, reference.apply_rope(x, positions, table, rotary_dim))
    assert backends.triton_kernels("ops").apply_rope is rope_kernels.apply_rope
