"""The serving layer: continuous batching over the paged KV cache (engine), its asyncio front (async_engine).

    from kogpt_fast.serving import Engine, SamplingParams
    engine = Engine(model)
    request = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=32))
    for event in engine.stream(request):
        ...

Files: request.py (SamplingParams, Request, RequestOutput), block_manager.py (reference-counted blocks, the prefix
cache), scheduler.py (what each step runs), sampler.py (per-request sampling on generate()'s sampler), engine.py
(the loop), async_engine.py (one background thread, asyncio iteration per request).

The OpenAI-compatible HTTP server (`kogpt-fast serve`; FastAPI, uvicorn and prometheus_client, the serve extra, never
imported from here): engine_process.py (the engine in a process of its own, with AsyncEngine's contract), server.py
(the app, its errors and shutdown), protocol.py (OpenAI's request and response shapes), completions.py (one
completion call on the engine), chat.py, detokenizer.py (text as tokens come, stop strings), metrics.py.
"""
from __future__ import annotations

from .async_engine import AsyncEngine, EngineClosed, EngineError, RequestStream
from .engine import Engine, EngineStats, QueueFull
from .request import Request, RequestOutput, SamplingParams, TokenLogprob

__all__ = [
    "AsyncEngine", "Engine", "EngineClosed", "EngineError", "EngineStats", "QueueFull", "Request", "RequestOutput",
    "RequestStream", "SamplingParams", "TokenLogprob",
]
