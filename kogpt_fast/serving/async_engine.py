"""The engine for asyncio code (the HTTP server): one background thread steps it while there is work.

    engine = AsyncEngine(Engine(model))
    stream = engine.add_request(prompt_ids, params)      # raises ValueError / QueueFull at once
    async for event in stream:                           # RequestOutputs, fed through the event loop
        ...

There is no thread per request and no lock around generation: add_request() and abort() only queue (the engine
takes them at its next step), and the engine thread hands a step's events to each event loop in one
call_soon_threadsafe (one wake-up of the loop per step, not one per request: the loop's thread and the engine's share
the GIL). A consumer that is cancelled (a client disconnecting), stops iterating, or drops its stream
aborts its request, whose blocks go back at the next step.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref

from .engine import Engine
from .request import Request, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while running the request (the request was aborted; the engine goes on with the others)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class RequestStream:
    """The events of one request as an async iterator; the last has finished=True. Iterate it on the event loop that
    created it. abort() (or cancelling the iterating task) stops the request."""

    def __init__(self, engine: "AsyncEngine", loop: asyncio.AbstractEventLoop):
        self._engine, self._loop = engine, loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.request: Request | None = None
        self._done = False

    @staticmethod
    def _listener(ref: "weakref.ref[RequestStream]"):
        """What the engine calls with each event (on its thread). It holds the stream weakly, so that a stream
        nobody holds any more is collected, and its __del__ aborts the request."""
        def deliver(event: RequestOutput) -> None:
            stream = ref()
            if stream is not None:
                stream._engine._deliver(stream, event)
        return deliver

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:  # cancelled: the consumer is gone
            self.abort()
            raise
        if event.finished:
            self._done = True
        if event.error is not None:
            raise EngineError(f"request {event.request_id}: {event.error}")
        return event

    def abort(self) -> None:
        if not self._done and self.request is not None:
            self._done = True
            self._engine.engine.abort(self.request)

    async def aclose(self) -> None:
        self.abort()

    def __del__(self):
        if not self._done and self.request is not None and not self.request.finished:
            self._engine.engine.abort(self.request)


def _send(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class AsyncEngine:
    """Runs `engine` on one daemon thread, started with the first request (or start())."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        engine.on_work = self._wake.set
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self._outbox: list[tuple[RequestStream, RequestOutput]] = []  # the running step's events, sent after it

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kogpt-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # the step's requests were aborted with the error; the others go on
                logger.exception("engine step failed")
            finally:
                self._flush()

    def _deliver(self, stream: RequestStream, event: RequestOutput) -> None:
        """An event for a stream: kept until the step ends on the engine thread, sent at once from any other (an
        add_request that finishes at once, close())."""
        if threading.current_thread() is self._thread:
            self._outbox.append((stream, event))
        else:
            _send(stream._loop, [(stream._queue, event)])

    def _flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, event in self._outbox:
            by_loop.setdefault(stream._loop, []).append((stream._queue, event))
        self._outbox = []
        for loop, items in by_loop.items():
            _send(loop, items)

    def add_request(self, prompt_ids, params: SamplingParams | None = None, *,
                    request_id: str | None = None) -> RequestStream:
        """Queue a request from a coroutine; its events come through the returned stream. Raises what
        Engine.add_request raises (ValueError naming the field, QueueFull), or EngineClosed, before anything runs."""
        if not self._accepting:
            raise EngineClosed("the engine is shutting down and takes no new requests")
        stream = RequestStream(self, asyncio.get_running_loop())
        stream.request = self.engine.add_request(prompt_ids, params, request_id=request_id,
                                                 listener=RequestStream._listener(weakref.ref(stream)))
        self.start()
        return stream

    async def generate(self, prompt_ids, params: SamplingParams | None = None, **kw):
        """add_request() and iterate: an async generator of the request's events."""
        stream = self.add_request(prompt_ids, params, **kw)
        try:
            async for event in stream:
                yield event
        finally:
            stream.abort()

    def stats(self):
        return self.engine.stats()

    async def drain(self, timeout: float | None = None) -> bool:
        """Take no new requests and wait (up to timeout seconds) until those queued and running have finished.
        Returns whether they all did."""
        self._accepting = False
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.engine.has_work():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def close(self) -> None:
        """Abort whatever is left (their streams end with finish_reason "abort") and stop the engine thread."""
        self._accepting = False
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.engine.abort_all()
        self.engine.step()  # takes the aborts: every stream gets its last event
