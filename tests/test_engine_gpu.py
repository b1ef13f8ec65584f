"""The engine on a GPU (marked gpu; bench/gpu_check.sh runs them): decode-only steps replay CUDA graphs per
batch-size bucket, padded rows harmless; greedy tokens equal generate() alone (fp32 exactly under the 1e-4 margin
rule; fp16 under the demo's ulp rule), with chunked prefill (the Triton extend kernel), prefix hits and
preemption."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import one_cpu_thread  # noqa: F401  (an autouse fixture)
from engine_helpers import (
    StepLog, assert_greedy_equals_generate, assert_pool_is_clean, blocks_written_by_each_step, random_prompts,
)
from kogpt_fast import KoGPTForCausalLM
from kogpt_fast.serving import Engine, SamplingParams
from kogpt_fast.serving.engine import DECODE_BUCKETS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEMO_BOUND_ULPS = 4  # as tests/test_triton_model.py: HF fp16's own margins reach 0 and 2 ulps on the demo


def scenario(model):
    v, half = model.config.vocab_size, model.config.n_positions // 2
    prompts = random_prompts([1, 17, half, 40, 100, 3, 200, 64, 9, 33, 5, 77], v, seed=1)
    engine = Engine(model, max_batch_tokens=64, max_running=8, num_blocks=60)
    log = StepLog(engine)
    requests = [engine.add_request(p, SamplingParams(max_new_tokens=24 + 3 * i, min_new_tokens=10))
                for i, p in enumerate(prompts[:6])]
    for _ in range(4):
        engine.step()
    requests += [engine.add_request(p, SamplingParams(max_new_tokens=30, min_new_tokens=30)) for p in prompts[6:]]
    requests.append(engine.add_request(prompts[4][:96] + [5, 6, 7], SamplingParams(max_new_tokens=12)))
    engine.run()
    return engine, log, requests


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_engine_fp32_on_gpu_equals_generate(backend):
    from gpu_requirements import require_backend

    require_backend(backend, torch.device("cuda"))
    model = KoGPTForCausalLM.from_pretrained(None, device="cuda", dtype=torch.float32, backend=backend)
    engine, log, requests = scenario(model)
    assert log.chunked() and log.mixed() and engine.stats().preemptions > 0
    assert engine.use_graph and engine._decode_steps and all(s.graph is not None for s in engine._decode_steps.values())
    assert set(engine._decode_steps) <= set(DECODE_BUCKETS) and len(engine._decode_steps) > 1
    assert assert_greedy_equals_generate(model, requests) == 0
    assert_pool_is_clean(engine)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_engine_fp16_bf16_on_gpu_under_the_margin_rule(dtype):
    model = KoGPTForCausalLM.from_pretrained(None, device="cuda", dtype=dtype)
    assert model.fused()
    engine, log, requests = scenario(model)
    assert all(s.graph is not None for s in engine._decode_steps.values())
    allowed = assert_greedy_equals_generate(model, requests, bound_ulps=DEMO_BOUND_ULPS)
    print(f"engine vs generate(), demo {dtype}: {allowed} near-tie differences in {len(requests)} requests")
    assert_pool_is_clean(engine)


def test_decode_graphs_replay_with_padded_rows_writing_only_the_scratch_block():
    """Three live rows in a bucket of 4: the graph's padded row writes only the scratch block."""
    model = KoGPTForCausalLM.from_pretrained(None, device="cuda", dtype=torch.float16)
    engine = Engine(model, prefix_caching=False, decode_buckets=(4,))
    requests = [engine.add_request(p, SamplingParams(max_new_tokens=20, min_new_tokens=20))
                for p in random_prompts([5, 9, 14], model.config.vocab_size, seed=2)]
    engine.step()
    engine.step()  # the first decode step: captures the graph
    assert engine._decode_steps[4].graph is not None
    assert blocks_written_by_each_step(engine)
    assert all(r.finish_reason == "length" and r.num_new == 20 for r in requests)
