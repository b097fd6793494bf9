"""`respec serve`: an HTTP rollout server over the slot engine, with SGLang's native routes and OpenAI's
completions.

Threading: one engine thread (`loop.EngineLoop`) owns the engine and torch; the HTTP handlers run on uvicorn's
asyncio loop, validate a request completely (`protocol.py`), queue it, and await its outputs, which the engine
thread hands over with `loop.call_soon_threadsafe`. Handlers never touch the engine. A streaming client that
disconnects aborts its requests, which frees their slots at the next turn of the engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from respec.engine.generate import Engine
from respec.engine.outputs import RequestOutput
from respec.errors import ConfigError, DuplicateRequestError, PromptError, RespecError, SamplingError
from respec.serve.loop import EngineFailure, EngineLoop, Live, Overloaded
from respec.serve.protocol import (
    ApiError,
    GenRequest,
    ModelLimits,
    Parsed,
    ServeLimits,
    completion_body,
    completion_choice,
    generate_item,
    parse_completion,
    parse_generate,
    parse_json,
)

Decoder = Callable[[list[int]], str]
Encoder = Callable[[str], list[int]]
HEALTH_PROMPT = [0]  # /health_generate's one-token probe
DONE = "data: [DONE]\n\n"  # the end mark of an SSE stream (SGLang's and OpenAI's)


@dataclass(frozen=True)
class ServeConfig:
    """How the server listens and what it accepts (the engine's own settings live on the Engine)."""

    host: str = "127.0.0.1"  # loopback: nothing outside this machine can reach it unless asked
    port: int = 30000  # SGLang's default port
    api_key: str | None = None  # every route but /health then needs `Authorization: Bearer <key>`
    model_name: str = "respec"  # the `model` of OpenAI responses and /v1/models
    model_path: str = ""  # reported by /get_model_info
    limits: ServeLimits = field(default_factory=ServeLimits)
    health_timeout_s: float = 30.0  # /health_generate answers 503 when its probe takes longer

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key must be a non-empty string (or None for no key)")


def _status(e: Exception) -> ApiError:
    """Returns the HTTP error for an exception raised while serving one request."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Overloaded):
        return ApiError(503, str(e), "server_overloaded")
    if isinstance(e, (DuplicateRequestError, PromptError, SamplingError)):
        return ApiError(400, str(e))
    if isinstance(e, EngineFailure):
        return ApiError(500, str(e), "engine_error")
    return ApiError(500, f"internal error ({type(e).__name__})", "internal_error")


class _Guard:
    """An ASGI middleware that runs `check(scope, receive, send, app)` on every HTTP request."""

    def __init__(self, app, check):
        self.app, self.check = app, check

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self.check(scope, receive, send, self.app)


async def outputs(events: asyncio.Queue, n: int) -> AsyncIterator[tuple[int, RequestOutput, bool]]:
    """Yields (index, output so far, whether all n requests have now finished) until all n finished; raises the
    first request's error. Outputs of one request queued behind each other are merged into the latest (each
    holds all its tokens so far): a handler that fell a step behind sends one event for it, not two."""
    left = n
    while left:
        latest: dict[int, RequestOutput] = {}  # insertion order: the order the requests first advanced in
        item = await events.get()
        while True:
            i, ev = item
            if isinstance(ev, Exception):
                raise ev
            latest[i] = ev
            if events.empty():
                break
            item = events.get_nowait()
        for i, ev in latest.items():
            left -= ev.finished
            yield i, ev, left == 0


def create_app(engine: Engine, config: ServeConfig | None = None, encode: Encoder | None = None,
               decode: Decoder | None = None) -> FastAPI:
    """Returns the FastAPI app serving `engine`; its engine thread starts and stops with the app's lifespan.

    `encode` / `decode` turn text into prompt ids and ids into text (None: token ids only; text prompts get a
    400 and responses an empty `text`).
    """
    config = config or ServeConfig()
    limits = config.limits
    cfg = engine.target.config
    model = ModelLimits(cfg.vocab_size, engine.max_model_len)
    loop = EngineLoop(engine, limits.max_pending, decode)
    state = {"weight_version": "default", "drafter_weight_version": None}
    mailbox: list[Mailbox] = []  # engine-thread events to the event loop: made when the app starts on one

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        mailbox.append(Mailbox(asyncio.get_running_loop()))  # the event loop that serves the handlers
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="respec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loop = loop

    # -- errors, auth, bodies ------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        err = _status(e)
        return JSONResponse(err.body(), status_code=err.status)

    async def guard(scope, receive, send, inner):
        """Refuses an HTTP request without the API key (401) or with a declared body over the limit (413). A plain
        ASGI wrapper: FastAPI's @middleware("http") would hide client disconnects from the handlers."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        error = None
        if config.api_key is not None and scope["path"] != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                error = ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                 "authentication_error")
        length = headers.get("content-length")
        if error is None and length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            error = ApiError(413, f"request body is larger than {limits.max_body_bytes} bytes")
        if error is not None:
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        else:
            await inner(scope, receive, send)

    app.add_middleware(_Guard, check=guard)

    async def body_of(request: Request) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"request body is larger than {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        return parse_json(b"".join(chunks), limits)

    # -- requests to the engine thread ---------------------------------------------------------------------------
    def submit(reqs: list[GenRequest]) -> tuple[asyncio.Queue, list[Live]]:
        """Queues reqs; returns the queue of their (index, output or error) events and their records."""
        post, events = mailbox[-1].post, asyncio.Queue()
        lives = [Live(r.rid, r.prompt, r.params, lambda ev, i=i: post(events, (i, ev)), stop=r.stop)
                 for i, r in enumerate(reqs)]
        try:
            loop.submit(lives)
        except Overloaded as e:
            raise _status(e) from None
        return events, lives

    def abort_all(lives: list[Live]) -> None:
        for live in lives:
            loop.abort(live)

    async def finals(request: Request, events: asyncio.Queue, lives: list[Live]) -> list[RequestOutput]:
        """Returns every request's final output; aborts them all on an error or when the client goes away."""
        last: list[RequestOutput | None] = [None] * len(lives)

        async def collect():
            async for i, out, _ in outputs(events, len(lives)):
                last[i] = out

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                if not task.done() and await request.is_disconnected():
                    raise ApiError(499, "client closed the request")
            task.result()
        except BaseException as e:
            task.cancel()
            abort_all(lives)
            raise _status(e) if isinstance(e, Exception) else e from None
        return last

    def sse(payload) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    def stream(chunks: AsyncIterator[str], lives: list[Live]) -> StreamingResponse:
        """Returns the SSE response of `chunks`; the chunk of the last output ends with DONE itself, so a request's
        last event and the end mark go out in one write."""
        async def body():
            ended = False  # the end mark went out
            try:
                async for chunk in chunks:
                    ended = chunk.endswith(DONE)
                    yield chunk
                if not ended:
                    ended = True
                    yield DONE
            except Exception as e:  # an error after the headers went out: the stream's last event says it
                ended = True
                yield sse(_status(e).body()) + DONE
            finally:
                if not ended:  # the client went away (or the server is stopping): free the slots
                    abort_all(lives)

        return StreamingResponse(body(), media_type="text/event-stream")

    # -- SGLang's native routes ----------------------------------------------------------------------------------
    @app.post("/generate")
    async def generate(request: Request):
        parsed = parse_generate(await body_of(request), limits, model, encode, decode is not None)
        events, lives = submit(parsed.requests)

        def item(i: int, out: RequestOutput) -> dict:
            return generate_item(out, parsed.requests[i], lives[i].steps, engine.drafter_version, parsed.logprobs,
                                 decode)

        if parsed.stream:
            async def chunks():
                async for i, out, last in outputs(events, len(lives)):
                    payload = item(i, out)
                    if parsed.batched:
                        payload["index"] = i
                    chunk = sse(payload)
                    yield chunk + DONE if last else chunk

            return stream(chunks(), lives)
        items = [item(i, out) for i, out in enumerate(await finals(request, events, lives))]
        return items if parsed.batched else items[0]

    @app.get("/health")
    async def health():
        return {} if loop.alive else JSONResponse(ApiError(503, "engine thread is down").body(), status_code=503)

    @app.get("/health_generate")
    async def health_generate(request: Request):
        if loop.paused:
            return {}
        from respec.engine.sampling import SamplingParams
        from respec.serve.protocol import new_rid

        probe = GenRequest(HEALTH_PROMPT, SamplingParams(max_new_tokens=1, seed=0), f"health-{new_rid()}")
        events, lives = submit([probe])
        try:
            await asyncio.wait_for(finals(request, events, lives), config.health_timeout_s)
        except TimeoutError:
            abort_all(lives)
            raise ApiError(503, f"no token generated within {config.health_timeout_s} s", "unhealthy") from None
        return {}

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": config.model_path, "tokenizer_path": config.model_path if encode else None,
                "is_generation": True, "weight_version": state["weight_version"], "vocab_size": cfg.vocab_size,
                "max_model_len": engine.max_model_len}

    @app.get("/get_server_info")
    async def server_info():
        spec = engine.spec
        return {"model_path": config.model_path, "served_model_name": config.model_name, "host": config.host,
                "port": config.port, "max_running_requests": engine.max_running,
                "max_model_len": engine.max_model_len, "max_pending_requests": limits.max_pending,
                "speculative_algorithm": "EAGLE3" if engine.drafter is not None and spec.mode != "off" else None,
                "speculative": {"mode": spec.mode, "k": spec.k, "k_max": spec.k_max},
                "compile": engine.compile, "drafter_version": engine.drafter_version,
                "drafter_weight_version": state["drafter_weight_version"],
                "weight_version": state["weight_version"], "paused": loop.paused,
                "unfinished_requests": loop.pending, "aborted_requests": loop.aborted,
                "decode_steps": loop.steps, "decode_rows": loop.rows, "decode_seconds": loop.step_seconds,
                "decode_cpu_seconds": loop.step_cpu_seconds,
                "event_loop_cpu_seconds": time.thread_time()}  # handlers run on the event loop's thread

    @app.get("/get_weight_version")
    async def weight_version():
        return {"weight_version": state["weight_version"]}

    async def control(fn) -> object:
        return await asyncio.wrap_future(loop.call(fn))

    @app.post("/flush_cache")
    async def flush_cache():
        # The slot engine keeps no prefix cache: a finished request's KV entries are already free.
        return {"success": True, "message": "no prefix cache to flush"}

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await body_of(request)
        rid, everything = body.get("rid"), body.get("abort_all", False)
        if not isinstance(everything, bool) or (rid is not None and not isinstance(rid, str)) or \
                (rid is None and not everything):
            raise ApiError(400, "give rid (a string) or abort_all: true")
        loop.abort(None if everything else rid)
        return {"success": True}

    @app.post("/pause_generation")
    async def pause():
        await control(lambda e: setattr(loop, "paused", True))
        return {"success": True, "message": "paused: requests queue until /continue_generation"}

    @app.post("/continue_generation")
    async def resume():
        await control(lambda e: setattr(loop, "paused", False))
        return {"success": True, "message": "generating"}

    @app.post("/update_weights_from_disk")
    async def update_weights(request: Request):
        body = await body_of(request)
        path, version, draft = body.get("model_path"), body.get("weight_version"), body.get("is_draft_model", False)
        if not isinstance(path, str) or not path:
            raise ApiError(400, "model_path must be a non-empty string (a safetensors checkpoint directory)")
        if version is not None and not isinstance(version, (str, int)) or isinstance(version, bool):
            raise ApiError(400, "weight_version must be a string")
        if not isinstance(draft, bool):
            raise ApiError(400, "is_draft_model must be true or false")

        def load(engine: Engine) -> None:  # on the engine thread, between two steps
            from respec.engine.checkpoint import read_safetensors
            from respec.engine.drafter import load_drafter

            where = Path(path)
            if not where.is_dir():
                raise RespecError(f"{path}: no such checkpoint directory")
            if draft:
                engine.set_drafter(load_drafter(where, engine.target), version=(engine.drafter_version or 0) + 1)
            else:
                engine.load_weights(read_safetensors(where))

        try:
            await control(load)
        except RespecError as e:  # the old weights stay
            return JSONResponse({"success": False, "message": f"kept the old weights: {e}"}, status_code=400)
        if version is not None:
            state["drafter_weight_version" if draft else "weight_version"] = str(version)
        return {"success": True, "message": f"loaded {'drafter' if draft else 'policy'} weights from {path}"}

    # SGLang's in-memory weight transfers need a process group or CUDA IPC handles shared with the trainer; this
    # server loads weights from disk only, and says so rather than answering 404.
    def not_served(route: str):
        async def handler():
            raise ApiError(501, f"{route} (weights over NCCL or CUDA IPC) is not served by respec: save the weights "
                                "as a safetensors directory and POST /update_weights_from_disk {model_path}",
                           "not_implemented")
        return handler

    for route in ("/init_weights_update_group", "/update_weights_from_distributed", "/update_weights_from_tensor",
                  "/destroy_weights_update_group"):
        app.post(route)(not_served(route))

    # -- OpenAI's completions ------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "respec", "root": config.model_path or config.model_name,
                                            "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed: Parsed = parse_completion(await body_of(request), limits, model, encode, decode is not None)
        events, lives = submit(parsed.requests)
        rid = lives[0].rid

        def choice(i: int, out: RequestOutput, start: int = 0, text_start: int = 0) -> dict:
            c = completion_choice(i, out, parsed, decode, start, text_start)
            if parsed.return_token_ids and start == 0:
                c["prompt_token_ids"] = parsed.requests[i].prompt
            return c

        if parsed.stream:
            async def chunks():
                sent, sent_text = [0] * len(lives), [0] * len(lives)  # tokens and characters streamed
                async for i, out, last in outputs(events, len(lives)):
                    if len(out.token_ids) > sent[i] or out.finished:
                        c = choice(i, out, sent[i], sent_text[i])
                        chunk = sse(completion_body(rid, config.model_name, [c]))
                        yield chunk + DONE if last else chunk
                        sent[i], sent_text[i] = len(out.token_ids), sent_text[i] + len(c["text"])

            return stream(chunks(), lives)
        outs = await finals(request, events, lives)
        prompt_tokens = sum(len(r.prompt) for r in parsed.requests[::parsed.n])
        completion_tokens = sum(len(o.token_ids) for o in outs)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return completion_body(rid, config.model_name, [choice(i, o) for i, o in enumerate(outs)], usage)

    return app


class Mailbox:
    """Carries events from the engine thread to the server's event loop in batches: the first event of a burst
    (one decode step's outputs for every running request) schedules one wake-up of the loop, the rest of the burst
    rides along, so a step with 64 streaming requests costs the loop one wake-up, not 64."""

    def __init__(self, aloop: asyncio.AbstractEventLoop):
        self._aloop = aloop
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, item) -> None:
        """Queues `item` for `queue` (from any thread); raises RuntimeError once the event loop has closed."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        self._aloop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


def run_server(engine: Engine, config: ServeConfig, encode: Encoder | None = None,
               decode: Decoder | None = None, log_level: str = "warning") -> None:
    """Serves `engine` until interrupted (uvicorn on config.host:config.port)."""
    import uvicorn

    uvicorn.run(create_app(engine, config, encode, decode), host=config.host, port=config.port, log_level=log_level)


@contextlib.contextmanager
def serving_in_thread(engine: Engine, config: ServeConfig | None = None, encode: Encoder | None = None,
                      decode: Decoder | None = None, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Yields the base URL of `engine` served (as `run_server` serves it) from a background thread on
    config.host and a free port the OS picks; on leaving, stops uvicorn and the engine thread and joins both.

    The socket is bound here and handed to uvicorn, so no other process can take the port in between.
    """
    import uvicorn

    config = config or ServeConfig()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, 0))
    port = sock.getsockname()[1]
    config = dataclasses.replace(config, port=port)
    app = create_app(engine, config, encode, decode)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="respec-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RespecError(f"the server did not start on {config.host}:{port} within {start_timeout_s} s")
            time.sleep(0.01)
        yield f"http://{config.host}:{port}"
    finally:
        server.should_exit = True
        thread.join(start_timeout_s)
        sock.close()
        if app.state.loop.alive:  # the lifespan stops it; this covers a server that did not shut down in time
            app.state.loop.stop()
