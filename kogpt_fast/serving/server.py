"""The OpenAI-compatible HTTP server: FastAPI on uvicorn over the engine in its own process (`kogpt-fast serve`).

    POST /v1/completions        OpenAI's legacy completions (streamed as server-sent events with stream=true)
    POST /v1/chat/completions   400 unless the checkpoint ships a chat template (chat.py)
    GET  /v1/models, /v1/models/{name}, /health, /metrics (Prometheus text)

The HTTP layer only translates: each request is a coroutine on uvicorn's event loop that queues engine requests
and iterates their asyncio streams; the engine, in a process of its own (engine_process.py), does all the scheduling
and computing. Bad input is a 4xx with OpenAI's error body, never a 500. SIGTERM (or Ctrl-C) stops accepting, lets
what runs finish within the grace period (then ends it with a 503), and exits 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import signal
import socket
import time
import weakref
from dataclasses import dataclass, field

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import EngineError
from .completions import RETRY_AFTER_S, Completion, sampling_params, tokenize_prompts
from .engine_process import EngineProcess
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (APIError, CompletionRequest, bad_request, choice_object, completion_id, completion_object,
                       model_object, models_object, now, parse_completion_request, usage_object)

logger = logging.getLogger(__name__)
# FastAPI >= 0.160 looks up OpenTelemetry's providers on every request (about a millisecond here); the server counts
# what it serves in /metrics instead.
NO_TELEMETRY = ({"telemetry": {"tracing": False, "metrics": False, "logs": False}}
                if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServerState:
    engine: EngineProcess  # or anything with its interface: add_request, stats, start, close, config, max_waiting
    tokenizer: object
    model_name: str
    api_key: str | None = None
    chat_template: str | None = None
    created: int = field(default_factory=now)
    draining: bool = False  # SIGTERM: new requests get a 503
    active: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # the completions being answered

    def __post_init__(self):
        config = self.engine.config
        self.n_positions, self.vocab_size = config.n_positions, config.vocab_size
        self.metrics = ServerMetrics(self.engine.stats)

    def abort_all(self) -> None:
        """The grace period ran out: every completion still running ends with a 503 (an error event if streamed)."""
        for completion in list(self.active):
            completion.abort()


class CountRequests:
    """ASGI middleware: kogpt_http_requests_total{endpoint, status}, counted when the response starts."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/models/{name}" if path.startswith("/v1/models/") else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        yield
        state.engine.close()  # aborts what is left (after the grace period), stops the engine process

    app = FastAPI(title="kogpt-fast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  **NO_TELEMETRY)
    app.state.server = state
    app.add_middleware(CountRequests, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        what = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(APIError(e.status_code, what, code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        logger.exception("internal error on %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    async def authorized(request: Request) -> None:  # async: a plain def would run in FastAPI's thread pool
        """401 unless the request carries `Authorization: Bearer KEY` (when a key is set), compared in constant
        time. /health and /metrics are open (probes and Prometheus)."""
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send it as the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not (scheme.lower() == "bearer"
                and hmac.compare_digest(given.strip().encode(), state.api_key.encode())):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if state.draining or not state.engine.alive:
            return JSONResponse({"status": "shutting down" if state.draining else "the engine process has exited"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return models_object(state.model_name, state.created, state.n_positions)

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorized)])
    async def model(name: str):
        check_model(state, name, status=404)
        return model_object(state.model_name, state.created, state.n_positions)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request):
        arrival = time.perf_counter()
        r = parse_completion_request(await request.body())
        completion = prepare_completion(state, r, arrival)
        if r.stream:
            return event_stream(completion_chunks(state, completion))
        await finish_unless_disconnected(request, completion)
        return JSONResponse(completion_response(state, completion))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request):
        from .chat import chat_completion

        return await chat_completion(state, request)

    return app


def check_model(state: ServerState, name: str, status: int = 400) -> None:
    """A request's `model` (400 when it names another) or GET /v1/models/NAME's (404)."""
    if name != state.model_name:
        raise APIError(status, f"the model {name!r} does not exist: this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def check_accepting(state: ServerState) -> None:
    if state.draining:
        raise APIError(503, "the server is shutting down and takes no new requests", type="server_error",
                       code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})


def prepare_completion(state: ServerState, r: CompletionRequest, arrival: float) -> Completion:
    """Check the request against the model and queue its first choices (APIError for a refusal)."""
    check_model(state, r.model)
    check_accepting(state)
    prompts = tokenize_prompts(state.tokenizer, state.vocab_size, r.prompt)
    params = [sampling_params(r, len(ids), state.n_positions) for ids in prompts]
    choices = len(prompts) * (r.n or 1)
    if choices > state.engine.max_waiting:
        raise bad_request(f"{len(prompts)} prompts x n={r.n or 1} make {choices} choices, more than the server "
                          f"queues ({state.engine.max_waiting}, --max-queue)", param="n")
    completion = Completion(state.engine, state.tokenizer, r, prompts, params, state.metrics, arrival)
    completion.start()
    state.active.add(completion)
    return completion


async def finish_unless_disconnected(request: Request, completion: Completion) -> None:
    """Run the completion to its end; a client that disconnects first aborts it (its blocks go back)."""
    async def run():
        async for _ in completion.updates():
            pass

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(run()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            completion.abort()
    if work.cancelled():
        raise asyncio.CancelledError  # nobody is listening for the answer
    try:
        work.result()
    except EngineError as e:
        raise APIError(500, str(e), type="server_error", code="engine_error") from None


def completion_response(state: ServerState, completion: Completion) -> dict:
    choices = []
    for c in completion.choices:
        logprobs = c.logprobs.since(0) if c.logprobs is not None else None
        choices.append(choice_object(c.index, c.full_text, logprobs, c.finish_reason))
    return completion_object(completion_id(), now(), state.model_name, choices,
                             usage_object(completion.prompt_tokens, completion.completion_tokens))


def dumps(data) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def sse(data: dict) -> bytes:
    return b"data: " + dumps(data) + b"\n\n"


async def stream_events(completion: Completion, chunk, usage_chunk):
    """OpenAI's stream: chunk(choice, text, logprobs) for each choice update (an SSE event's bytes, or None:
    nothing to send), then usage_chunk() when stream_options.include_usage, then `data: [DONE]`. An engine failure
    arrives as an error event (the status line is long sent)."""
    options = completion.request.stream_options
    try:
        async for choice in completion.updates():
            data = chunk(choice, *completion.delta(choice))
            if data is not None:
                yield data
        if options is not None and options.include_usage:
            yield usage_chunk()
    except (EngineError, APIError) as e:
        error = e if isinstance(e, APIError) else APIError(500, str(e), type="server_error", code="engine_error")
        yield sse(error.body())
    yield b"data: [DONE]\n\n"


def event_stream(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def completion_chunks(state: ServerState, completion: Completion):
    cid, created = completion_id(), now()
    # Each chunk is completion_object(cid, created, model, [choice], None); all but the choice is encoded once.
    head = b'data: {"id":%s,"object":"text_completion","created":%d,"model":%s,"choices":[' % (
        dumps(cid), created, dumps(state.model_name))
    tail = b'],"usage":null,"system_fingerprint":null}\n\n'

    def chunk(choice, text, logprobs):
        if not text and not (logprobs and logprobs["tokens"]) and choice.finish_reason is None:
            return None  # held back (a possible stop string, an incomplete character): nothing to say yet
        return head + dumps(choice_object(choice.index, text, logprobs, choice.finish_reason)) + tail

    def usage_chunk():
        return sse(completion_object(cid, created, state.model_name, [],
                                     usage_object(completion.prompt_tokens, completion.completion_tokens)))

    return stream_events(completion, chunk, usage_chunk)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: new requests get a 503 and new connections are refused; what runs has grace_period seconds
    to finish, then ends with a 503 (an error event if streamed); then the engine stops and the process exits 0."""

    BACKSTOP_S = 10  # after the grace period, how long uvicorn waits for the aborted responses before cancelling them

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_period: float):
        super().__init__(config)
        self.state, self.grace_period = state, grace_period

    def handle_exit(self, sig, frame):
        self.state.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None):
        abort = asyncio.get_running_loop().call_later(self.grace_period, self.state.abort_all)
        try:
            await super().shutdown(sockets)
        finally:
            abort.cancel()

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own re-raises the signal once shut down, and the process would die of it: a server that drained
        # as asked exits 0.
        handlers = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so that a port in use is an error at once (port 0: any
    free one)."""
    try:
        return socket.create_server((host, port), backlog=2048)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run(state: ServerState, sock: socket.socket, grace_period: float, access_log: bool = False) -> None:
    """Serve on `sock` until SIGTERM/SIGINT, then drain for up to grace_period seconds."""
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(build_app(state), host=host, port=port, access_log=access_log, log_level="info",
                            lifespan="on", timeout_graceful_shutdown=grace_period + DrainingServer.BACKSTOP_S)
    DrainingServer(config, state, grace_period).run(sockets=[sock])
