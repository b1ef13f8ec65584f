"""The engine on backend="triton" (the CPU interpreter in CI, small shapes): chunked prefill and prefix hits run the
Triton extend kernel, decode-only steps the decode kernel; each request's greedy tokens equal generate() on it alone
on the same backend."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernels run on the CPU interpreter
pytest.importorskip("triton", reason="triton is not installed")

from engine_helpers import one_cpu_thread  # noqa: E402, F401  (an autouse fixture)
from engine_helpers import (  # noqa: E402
    StepLog, assert_greedy_equals_generate, assert_pool_is_clean, random_prompts, run_arrivals,
)
from hf_reference import random_hf_model  # noqa: E402
from kogpt_fast import KoGPTForCausalLM, backends  # noqa: E402
from kogpt_fast.serving import Engine, SamplingParams  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf = random_hf_model(seed=21, n_positions=64, vocab_size=97, n_embd=128, n_head=2, rotary_dim=16, n_layer=1)
    path = tmp_path_factory.mktemp("engine_triton")
    hf.save_pretrained(path)
    ours = KoGPTForCausalLM.from_pretrained(path, device=DEVICE, dtype=torch.float32, backend="triton")
    assert ours.ops() is backends.triton_kernels("ops")
    ours.kv_block_size = 4
    return ours


def test_engine_on_triton_equals_generate(model):
    prompts = random_prompts([13, 2, 9], model.config.vocab_size, seed=1)
    engine = Engine(model, max_batch_tokens=8, max_running=3)
    log = StepLog(engine)
    params = SamplingParams(max_new_tokens=5, min_new_tokens=5)
    requests = run_arrivals(engine, [(0, [(prompts[0], params), (prompts[1], params)]),
                                     (3, [(prompts[0][:8] + prompts[2], params)])])  # 2 blocks from the cache
    assert log.chunked() and log.mixed() and requests[2].num_cached_prompt == 8
    assert any(all(count == 1 for _, _, count, _ in step) for step in log.steps)  # decode-only steps too
    assert assert_greedy_equals_generate(model, requests) == 0
    assert_pool_is_clean(engine)
