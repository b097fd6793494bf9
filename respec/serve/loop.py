"""The engine thread: the one thread that touches the engine (and torch), running SGLang's `event_loop_normal`.

Each turn it takes everything queued for it (new requests, aborts, control calls such as a weight update), runs
one `Engine.step()` unless paused or idle, and hands every request's output so far to that request's sink. A
request with stop strings ends in the step whose tokens complete one: its tokens are cut after that token, its
engine request is aborted, and it finishes with reason "stop" and the string as `stop_reason`.
HTTP handlers only `submit`, `abort` and `call`; a request that arrives while others decode is added before the
next step and joins the running batch there.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from respec.engine.generate import Engine
from respec.engine.outputs import RequestOutput
from respec.errors import RespecError
from respec.serve.protocol import find_stop

IDLE_WAIT_S = 0.5  # how long an idle engine thread sleeps on its inbox before looking again


class Overloaded(RespecError):
    """The server holds as many unfinished requests as it accepts (answered 503)."""


class EngineFailure(RespecError):
    """A decode step raised: every request of that step ends with this error (answered 500)."""


Sink = Callable[[RequestOutput | Exception], None]  # called from the engine thread; must not block


@dataclass
class Live:
    """A request the engine thread is serving: where its outputs go and how many steps it took part in."""

    rid: str
    prompt: list[int]
    params: object
    sink: Sink
    steps: int = 0
    last: RequestOutput | None = field(default=None)
    stop: tuple[str, ...] = ()  # stop strings
    checked: int = 0  # tokens already searched for them


class EngineLoop:
    """Owns the engine from its own thread; other threads talk to it through a queue.

    `submit` raises Overloaded once `max_pending` requests are unfinished. Outputs go to each request's sink after
    every step it advanced in (a RequestOutput with all its tokens so far), the last one with finished=True; an
    engine error for one request (e.g. a duplicate id) goes to that request's sink as the exception, and a failed
    step to every request of that step as EngineFailure, after which the loop serves on.
    """

    def __init__(self, engine: Engine, max_pending: int, decode: Callable[[list[int]], str] | None = None):
        self.engine, self.max_pending, self.decode = engine, max_pending, decode
        self.paused = False
        self.steps = 0
        self.rows = 0  # requests advanced, summed over steps: rows / steps is the mean live batch
        self.step_seconds = 0.0  # wall time inside Engine.step
        self.step_cpu_seconds = 0.0  # the engine thread's CPU time in them (the rest: waiting for the GIL or a core)
        self.aborted = 0  # requests aborted by a client, a disconnect or the server stopping
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, Live] = {}  # engine thread only
        self._pending = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="respec-engine", daemon=True)

    # -- any thread ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Aborts everything unfinished and ends the thread."""
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, requests: list[Live]) -> None:
        """Queues requests for the next step (all or none); raises Overloaded when they do not fit."""
        with self._lock:
            if self._pending + len(requests) > self.max_pending:
                raise Overloaded(f"the server holds {self._pending} unfinished requests and accepts at most "
                                 f"{self.max_pending}: retry later")
            self._pending += len(requests)
        self._inbox.put(("add", requests))

    def abort(self, rid: str | Live | None) -> None:
        """Aborts request `rid` (a Live: that very request, not another that took its id; None: every request) at
        the next turn; unknown or finished requests are ignored."""
        self._inbox.put(("abort", rid))

    def call(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Returns a future of fn(engine), run on the engine thread between two steps."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (fn, future)))
        return future

    # -- the engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            busy = not self.paused and self.engine.has_unfinished_requests()
            try:
                self._handle(*(self._inbox.get_nowait() if busy else self._inbox.get(timeout=IDLE_WAIT_S)))
                while True:
                    self._handle(*self._inbox.get_nowait())
            except queue.Empty:
                pass
            if self._stop.is_set():
                break
            if not self.paused and self.engine.has_unfinished_requests():
                self._step()
        self._abort(None)

    def _handle(self, kind: str, payload) -> None:
        if kind == "add":
            for live in payload:
                try:
                    self.engine.add_request(live.rid, live.prompt, live.params)
                except RespecError as e:  # e.g. a duplicate rid: this request only (another may own the rid)
                    with self._lock:
                        self._pending -= 1
                    self._deliver(live, e)
                else:
                    self._live[live.rid] = live
        elif kind == "abort":
            self._abort(payload)
        elif kind == "call":
            fn, future = payload
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as e:  # the caller gets the error; the loop serves on
                    future.set_exception(e)

    def _abort(self, rid: str | Live | None) -> None:
        if isinstance(rid, Live):
            if self._live.get(rid.rid) is not rid:
                return
            rid = rid.rid
        for r in [rid] if rid is not None else list(self._live):
            live = self._live.get(r)
            if live is None:
                continue
            self.engine.abort_request(r)
            self.aborted += 1
            last = live.last
            self._finish(live, RequestOutput(r, last.token_ids if last else [], last.logprobs if last else [],
                                             True, "abort"))

    def _step(self) -> None:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            outs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - one failed step must not end the server
            failure = EngineFailure(f"decode step failed ({type(e).__name__}: {str(e)[:200]})")
            for rid in list(self._live):
                try:
                    self.engine.abort_request(rid)
                except RespecError:
                    pass
                self._finish(self._live[rid], failure)
            return
        self.steps += 1
        self.rows += len(outs)
        self.step_seconds += time.perf_counter() - t0
        self.step_cpu_seconds += time.thread_time() - cpu0
        for out in outs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            live.steps += 1
            if live.stop and self.decode is not None:
                out = self._stop_strings(live, out)
            live.last = out
            if out.finished:
                self._finish(live, out)
            else:
                self._deliver(live, out)

    def _stop_strings(self, live: Live, out: RequestOutput) -> RequestOutput:
        """Returns `out`, or, if its new tokens complete one of the request's stop strings, its output cut after
        the completing token, finished; the engine request is then aborted (its slot is free for the next step)."""
        hit = find_stop(self.decode, out.token_ids, live.checked, live.stop)
        live.checked = len(out.token_ids)
        if hit is None:
            return out
        n, matched = hit
        if not out.finished:
            self.engine.abort_request(out.request_id)
        return RequestOutput(out.request_id, out.token_ids[:n], out.logprobs[:n], True, "stop", matched)

    def _finish(self, live: Live, event: RequestOutput | Exception) -> None:
        self._live.pop(live.rid, None)
        with self._lock:
            self._pending -= 1
        self._deliver(live, event)

    @staticmethod
    def _deliver(live: Live, event: RequestOutput | Exception) -> None:
        try:
            live.sink(event)
        except RuntimeError:  # the handler's event loop has closed (server shutting down)
            pass
