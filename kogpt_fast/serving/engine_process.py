"""The engine in a process of its own, for the HTTP server: the server's event loop and the engine never wait for each
other's GIL. (With the engine on a thread of the server's process, the HTTP work of every streamed token delays the
engine's next step: on the CPU demo model at 32 streams that cost about 20% of the engine's tokens/s, and the share
grows with the engine's speed.) This is how vLLM splits its API server from its engine core.

    engine = EngineProcess(functools.partial(load, args), dict(max_running=32), threads=1)
    engine.start()                                   # spawns the process, which loads the model; raises what failed
    stream = engine.add_request(prompt_ids, params)  # AsyncEngine's contract: refused here, at once, with its errors
    async for event in stream:                       # RequestOutputs, as from AsyncEngine
        ...

One multiprocessing Pipe carries pickled tuples:
    to the engine:   ("add", id, prompt_ids, params) | ("abort", id) | ("close",)
    from the engine: ("ready", info) | ("failed", message) | ("events", [RequestOutput, ...], EngineStats)
The engine process steps while it has work and sends each step's events in one message; a reader thread here hands
each message to the event loop in one call_soon_threadsafe. The engine process ignores SIGINT and SIGTERM (the
server drains, then closes it through the pipe; close() also runs at exit) and exits when the pipe closes (the
server died). Spawned, it imports the caller's main module again: a script that starts one needs the usual
`if __name__ == "__main__":` guard.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import signal
import threading
from typing import Callable

from .async_engine import EngineClosed, EngineError
from .engine import Engine, EngineStats, QueueFull, check_request
from .request import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 600  # loading a 6B checkpoint from a slow disk


class EngineProcessError(RuntimeError):
    """The engine process could not start (its loading failed) or has died."""


class ProcessStream:
    """The events of one request, as AsyncEngine's RequestStream gives them (the last has finished=True)."""

    def __init__(self, engine: "EngineProcess", request_id: str):
        self._engine, self.request_id = engine, request_id
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._done = False

    def __aiter__(self) -> "ProcessStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:  # cancelled: the consumer is gone
            self.abort()
            raise
        return self._taken(event)

    def ready(self) -> list[RequestOutput]:
        """The events that have arrived and not been taken yet, without waiting (a consumer that fell behind takes
        them together: one streamed chunk for several tokens)."""
        events = []
        while not self._done and not self._queue.empty():
            events.append(self._taken(self._queue.get_nowait()))
        return events

    def _taken(self, event: RequestOutput) -> RequestOutput:
        if event.finished:
            self._done = True
        if event.error is not None:
            raise EngineError(f"request {event.request_id}: {event.error}")
        return event

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._engine._abort(self.request_id)

    def __del__(self):
        if not self._done:
            self._engine._abort(self.request_id)


class EngineProcess:
    """An Engine(model, tokenizer=tokenizer, **engine_kwargs) in a spawned process, where `load()` gives
    (tokenizer, model). Serves one event loop at a time (the server's)."""

    def __init__(self, load: Callable, engine_kwargs: dict, threads: int | None = None):
        self._load, self._engine_kwargs, self._threads = load, dict(engine_kwargs), threads
        self._process = None
        self._conn = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, ProcessStream] = {}  # unfinished, touched on the event loop only
        self._next_id = 0
        self._accepting = True
        self._gone = False  # the pipe closed: the engine process has exited, or is exiting
        self.info: dict = {}
        self._stats: EngineStats | None = None

    # ---- life ----
    def start(self) -> None:
        """Spawn the engine process and wait until its model is loaded; EngineProcessError says why it failed."""
        if self._process is not None:
            return
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, self._load, self._engine_kwargs, self._threads),
                                        name="kogpt-engine", daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(STARTUP_TIMEOUT_S):
            self._process.kill()
            raise EngineProcessError(f"the engine process did not start within {STARTUP_TIMEOUT_S} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._process.join()
            raise EngineProcessError(f"the engine process exited with {self._process.exitcode} while starting")
        if kind == "failed":
            self._process.join()
            raise EngineProcessError(payload)
        self.info, self._stats = payload, payload["stats"]
        threading.Thread(target=self._read, name="kogpt-engine-reader", daemon=True).start()
        # Before multiprocessing's own exit handler, which would SIGTERM the process (ignored there) and wait forever.
        atexit.register(self.close)

    @property
    def config(self):
        return self.info["config"]

    @property
    def max_waiting(self) -> int:
        return self.info["max_waiting"]

    @property
    def alive(self) -> bool:
        return self._process is not None and not self._gone and self._process.is_alive()

    def close(self) -> None:
        """Abort what is left (its streams end with finish_reason "abort") and stop the engine process."""
        self._accepting = False
        if self._process is None:
            return
        atexit.unregister(self.close)
        if self._process.is_alive():
            try:
                self._conn.send(("close",))
            except OSError:
                pass
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    # ---- requests ----
    def add_request(self, prompt_ids, params: SamplingParams | None = None) -> ProcessStream:
        """Queue a request from a coroutine; raises what Engine.add_request raises (ValueError naming the field,
        QueueFull), or EngineClosed, before anything is sent."""
        if not self._accepting or not self.alive:
            raise EngineClosed("the engine is shutting down and takes no new requests")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._streams:
                raise RuntimeError("an EngineProcess serves one event loop at a time: another has requests open")
            self._loop = loop
        info = self.info
        prompt, params = check_request(prompt_ids, params, info["config"], info["num_blocks"], info["block_size"],
                                       has_tokenizer=True)
        waiting = len(self._streams) - self._stats.running  # the engine's own count lags by up to a step
        if waiting >= info["max_waiting"]:
            raise QueueFull(f"the waiting queue is full ({info['max_waiting']} requests): try again later")
        request_id = f"p{self._next_id}"
        self._next_id += 1
        stream = ProcessStream(self, request_id)
        self._streams[request_id] = stream
        self._conn.send(("add", request_id, prompt, params))
        return stream

    def _abort(self, request_id: str) -> None:
        if self.alive:
            try:
                self._conn.send(("abort", request_id))
            except OSError:
                pass

    def stats(self) -> EngineStats:
        """The engine's numbers after its last step."""
        return self._stats

    # ---- messages from the engine process ----
    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                message = ("gone", None, None)
                self._gone = True
            if message[0] == "events":
                self._stats = message[2]
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._dispatch, message)
                except RuntimeError:  # the loop is closed: nobody is listening any more
                    pass
            if message[0] == "gone":
                return

    def _dispatch(self, message) -> None:
        kind, events, _ = message
        if kind == "events":
            for event in events:
                stream = self._streams.get(event.request_id)
                if stream is not None:
                    stream._queue.put_nowait(event)
                    if event.finished:
                        del self._streams[event.request_id]
        elif kind == "gone":
            self._accepting = False
            code = self._process.exitcode if self._process is not None else None
            for request_id, stream in self._streams.items():
                stream._queue.put_nowait(RequestOutput(request_id, [], finished=True, finish_reason="abort",
                                                       error=f"the engine process exited (status {code})"))
            self._streams.clear()


def _serve(conn, load: Callable, engine_kwargs: dict, threads: int | None) -> None:
    """The engine process: load, then step while there is work, taking messages between steps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server drains us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    try:
        tokenizer, model = load()
        if threads is not None and model.device.type == "cpu":
            torch.set_num_threads(threads)
        engine = Engine(model, tokenizer=tokenizer, **engine_kwargs)
    except BaseException as e:  # the server reports it and exits
        conn.send(("failed", f"{type(e).__name__}: {e}" if not isinstance(e, (OSError, ValueError)) else str(e)))
        return
    conn.send(("ready", {
        "config": model.config, "max_waiting": engine.max_waiting, "num_blocks": engine.blocks.num_blocks,
        "block_size": engine.blocks.block_size, "device": str(model.device), "dtype": str(model.dtype),
        "threads": torch.get_num_threads(), "stats": engine.stats(),
    }))
    requests = {}
    outbox: list[RequestOutput] = []  # each event names its request (request_id)
    while True:
        wait = 0 if engine.has_work() else None
        try:
            while conn.poll(wait):
                message = conn.recv()
                wait = 0
                if message[0] == "add":
                    _, request_id, prompt, params = message
                    try:
                        requests[request_id] = engine.add_request(
                            prompt, params, request_id=request_id, listener=outbox.append)
                    except (ValueError, TypeError, QueueFull) as e:  # the server's checks lagged (a full queue)
                        outbox.append(RequestOutput(request_id, [], finished=True, finish_reason="abort",
                                                    error=f"refused: {e}"))
                elif message[0] == "abort":
                    request = requests.get(message[1])
                    if request is not None:
                        engine.abort(request)
                elif message[0] == "close":
                    engine.abort_all()
                    engine.step()
                    conn.send(("events", outbox, engine.stats()))
                    return
        except (EOFError, OSError):  # the server is gone
            return
        if engine.has_work():
            try:
                engine.step()
            except Exception:  # the step's requests were aborted with the error; the others go on
                logger.exception("engine step failed")
        if outbox:
            for event in outbox:
                if event.finished:
                    requests.pop(event.request_id, None)
            try:
                conn.send(("events", outbox, engine.stats()))
            except (EOFError, OSError):
                return
            outbox.clear()  # in place: every request's listener is this list's append (send pickled it already)
