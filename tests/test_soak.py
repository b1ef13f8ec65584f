"""Soak: 500 generate() calls of mixed sizes on the demo model; memory and file handles stay flat."""
from __future__ import annotations

import gc
import os
import random

import pytest
import torch

from kogpt_fast import KoGPTForCausalLM, KoGPTTokenizer


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def device_memory(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from Linux /proc")
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow),  # 25 s on the 2-core CI machine
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_500_mixed_generate_calls_keep_memory_and_handles_flat(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    tokenizer = KoGPTTokenizer.from_pretrained()
    model = KoGPTForCausalLM.from_pretrained(device=device)
    texts = ["대한민국은", "국회는 법률에", "모든 국민은 인간으로서의 존엄과 가치를 가지며", "제1조", "대통령은"]
    rng = random.Random(0)

    def one_call():
        batch = rng.sample(texts, rng.randint(1, 3))
        enc = tokenizer(batch, return_tensors="pt")
        kwargs = dict(max_new_tokens=rng.randint(1, 24))
        if rng.random() < 0.5:
            kwargs.update(do_sample=True, temperature=rng.uniform(0.5, 1.5), top_p=rng.uniform(0.5, 1.0), seed=rng.randint(0, 99))
        out = model.generate(**enc, **kwargs)
        assert out.shape[0] == len(batch)
        if rng.random() < 0.1:  # errors along the way must not leak either
            with pytest.raises(ValueError):
                model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=10_000)

    # Warm-up: the largest request first, so the KV pool reaches its final size.
    model.generate(**tokenizer(texts[:3], return_tensors="pt"), max_new_tokens=24, min_new_tokens=24)
    for _ in range(20):
        one_call()
    gc.collect()
    rss0, fds0, dev0 = rss_bytes(), open_fds(), device_memory(device)
    for _ in range(480):
        one_call()
    gc.collect()
    growth = rss_bytes() - rss0
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 480 calls"
    assert open_fds() == fds0
    assert model.kv_cache.allocator.num_free == model.kv_cache.num_blocks
    assert device_memory(device) - dev0 <= 2**20, "device memory grew over 480 calls"
