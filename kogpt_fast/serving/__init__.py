"""The serving layer: continuous batching over the paged KV cache (engine), its asyncio front (async_engine).

    from kogpt_fast.serving import Engine, SamplingParams
    engine = Engine(model)
    request = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=32))
    for event in engine.stream(request):
        ...

Files: request.py (SamplingParams, Request, RequestOutput), block_manager.py (reference-counted blocks, the prefix
cache), scheduler.py (what each step runs), sampler.py (per-request sampling on generate()'s sampler), engine.py
(the loop), async_engine.py (one background thread, asyncio iteration per request).
"""
from __future__ import annotations

from .async_engine import AsyncEngine, EngineClosed, EngineError, RequestStream
from .engine import Engine, EngineStats, QueueFull
from .request import Request, RequestOutput, SamplingParams, TokenLogprob

__all__ = [
    "AsyncEngine", "Engine", "EngineClosed", "EngineError", "EngineStats", "QueueFull", "Request", "RequestOutput",
    "RequestStream", "SamplingParams", "TokenLogprob",
]
