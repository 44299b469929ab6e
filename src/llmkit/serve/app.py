"""The OpenAI-compatible HTTP server: `create_app(ServeConfig) -> FastAPI` and `serve(config)`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (OpenAI wire format, SSE
streaming), GET /health (200 while the engine thread runs, 503 while shutting down), GET /metrics
(Prometheus text), GET / (the web chat page in static/index.html).

Handlers only validate, submit to the `EngineRunner` and format what comes back: the engine lives in
the runner's thread. A client that disconnects (streaming or not) has its engine requests cancelled at
once, which frees their cache slots.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.serve import protocol
from llmkit.serve.metrics import ServerMetrics
from llmkit.serve.protocol import APIError, Context, IncrementalDecoder, ParsedRequest
from llmkit.serve.runner import Draining, EngineRunner, QueueFull

log = logging.getLogger(__name__)
STATIC_INDEX = Path(__file__).parent / "static" / "index.html"


@dataclass
class ServeConfig:
    """Settings of `llmkit serve` (the CLI flags map 1:1)."""

    model: str
    """Model directory (plain or quantized)."""
    adapter: str | None = None
    """Optional LoRA / prefix adapter directory."""
    served_model_name: str | None = None
    """Name in /v1/models and the `model` field; default: the model directory's name."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """If set, /v1/* require `Authorization: Bearer <api_key>`; /health, /metrics and / stay open."""
    max_batch: int = 16
    """Requests decoding together (KV cache slots)."""
    max_queue: int = 64
    """Most requests waiting for a slot; more get HTTP 429."""
    max_model_len: int | None = None
    """Context length (prompt + completion) in tokens; default and upper bound: the model's block_size."""
    prefix_cache_tokens: int = 4096
    max_request_bytes: int = 1 << 20
    """Largest accepted request body (HTTP 413 above)."""
    shutdown_grace: float = 10.0
    """Seconds in-flight requests get to finish on shutdown before they are cancelled."""
    device: str = "cpu"
    """cpu, cuda[:i] or auto (`llmkit.infer.device`)."""
    dtype: str = "auto"
    """auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16; INT8 dirs keep their int8 weights."""


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _StatusCounter:
    """Pure ASGI middleware counting responses by status (BaseHTTPMiddleware would wrap streaming)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_counted(message):
            if message["type"] == "http.response.start":
                self.metrics.http.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_counted)


def _default_model_name(model: str) -> str:
    """models:/quickstart@production -> quickstart; runs/sft/merged -> merged."""
    if model.startswith("models:/"):
        return model[len("models:/"):].split("@")[0].split("/")[0]
    return Path(model).resolve().name


def create_app(config: ServeConfig) -> FastAPI:
    """Load the model and build the app; the engine thread starts with the app's lifespan."""
    from llmkit.infer.engine import Engine
    from llmkit.infer.load import load_for_inference

    model, tok, template = load_for_inference(config.model, config.adapter, config.device, config.dtype)
    block = model.config.block_size
    max_len = min(config.max_model_len or block, block)
    try:
        engine = Engine(model, tok, max_batch=config.max_batch, max_len=max_len,
                        prefix_cache_tokens=config.prefix_cache_tokens)
    except TypeError as e:  # an encoder or encoder-decoder: a clean CLI error, not a traceback
        raise ValueError(f"{config.model}: {e}") from None
    runner = EngineRunner(engine, max_queue=config.max_queue)
    metrics = ServerMetrics()
    name = config.served_model_name or _default_model_name(str(config.model))
    ctx = Context(name, tok, max_len, template)
    api_key = config.api_key
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        await asyncio.to_thread(runner.stop, config.shutdown_grace)

    app = FastAPI(title="llmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runner, app.state.metrics, app.state.config, app.state.context = runner, metrics, config, ctx
    app.add_middleware(_StatusCounter, metrics=metrics)

    # -- errors: always the OpenAI shape ------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        param = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        return _error(APIError(err.get("msg", "invalid request"), param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return _error(APIError(str(e.detail), None, status=e.status_code, code=None,
                               type="invalid_request_error" if e.status_code < 500 else "server_error"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error")
        return _error(APIError(f"internal error: {type(e).__name__}", None, status=500, type="server_error"))

    # -- request reading ------------------------------------------------------------------------------
    def _auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError("Invalid or missing API key: send 'Authorization: Bearer <key>'", None, status=401,
                           code="invalid_api_key", type="authentication_error")

    async def _body(request: Request) -> dict:
        _auth(request)
        limit = config.max_request_bytes
        too_big = APIError(f"request body exceeds {limit} bytes", None, status=413, code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        raw = bytearray()
        async for chunk in request.stream():  # counted too: Content-Length may be absent (chunked)
            raw += chunk
            if len(raw) > limit:
                raise too_big
        return protocol.parse_json(bytes(raw))

    # -- endpoints --------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if runner.draining or not runner.alive:
            return JSONResponse({"status": "shutting_down" if runner.draining else "engine_down"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.render(runner.stats()), media_type=metrics.content_type)

    @app.get("/")
    async def index():
        if not STATIC_INDEX.is_file():
            return _error(APIError("the web page is not installed", None, status=404, code="not_found"))
        return FileResponse(STATIC_INDEX, media_type="text/html")

    @app.get("/v1/models")
    async def models(request: Request):
        _auth(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "llmkit", "max_model_len": max_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request)
        return await _generate(request, protocol.parse_chat(body, ctx), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        return await _generate(request, protocol.parse_completion(body, ctx), chat=False)

    # -- generation ---------------------------------------------------------------------------------------
    async def _generate(request: Request, parsed: ParsedRequest, chat: bool):
        if runner.draining:
            raise APIError("the server is shutting down", None, status=503, code="shutting_down",
                           type="server_error")
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        start = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()
        ids = [f"{rid}-{c.index}" for c in parsed.choices]
        try:
            runner.submit([(i, c.index, parsed.prompts[c.prompt_index], c.params)
                           for i, c in zip(ids, parsed.choices)], queue)
        except QueueFull as e:
            raise APIError(f"server busy: {e}; retry later", None, status=429, code="queue_full",
                           type="rate_limit_error", headers={"Retry-After": "1"}) from None
        except Draining:
            raise APIError("the server is shutting down", None, status=503, code="shutting_down",
                           type="server_error") from None
        metrics.prompt_tokens.inc(sum(len(parsed.prompts[c.prompt_index]) for c in parsed.choices))
        gen = _Generation(parsed, tok, metrics, start, ids, runner, queue)
        if parsed.stream:
            return StreamingResponse(gen.sse(rid, name, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_on_disconnect(request, lambda: runner.cancel(gen.unfinished())))
        try:
            await gen.collect()
        finally:
            watcher.cancel()
        return gen.response(rid, name, chat)

    return app


async def _on_disconnect(request: Request, callback) -> None:
    """Call `callback` when the client goes away (the body is already read, so receive() only returns
    http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            callback()
            return


class _ChoiceState:
    def __init__(self, tok, stop):
        self.dec = IncrementalDecoder(tok, stop)
        self.tokens: list[int] = []
        self.logprobs: list = []  # (token id, logprob, top) entries received
        self.unsent_lp: list = []  # streaming: entries not yet attached to a chunk
        self.first: float | None = None
        self.info: dict | None = None
        self.error: str | None = None


class _Generation:
    """Collects one HTTP request's engine events (all its choices) and formats them."""

    def __init__(self, parsed: ParsedRequest, tok, metrics: ServerMetrics, start: float, ids: list[str],
                 runner: EngineRunner, queue: asyncio.Queue):
        self.p, self.tok, self.metrics, self.start = parsed, tok, metrics, start
        self.ids, self.runner, self.queue = ids, runner, queue
        self.choices = [_ChoiceState(tok, parsed.stop) for _ in parsed.choices]
        self.pending = len(self.choices)

    def unfinished(self) -> list[str]:
        return [i for i, c in zip(self.ids, self.choices) if c.info is None and c.error is None]

    def _handle(self, ev) -> tuple[int, str]:
        """Apply one event; returns (choice index, text delta now safe to send)."""
        kind, index = ev[0], ev[1]
        c = self.choices[index]
        if kind == "token":
            _, _, token, entry = ev
            if c.first is None:
                c.first = time.monotonic()
            c.tokens.append(token)
            if entry is not None:
                c.logprobs.append(entry)
                c.unsent_lp.append(entry)
            return index, c.dec.push(token)
        self.pending -= 1
        if kind == "error":
            c.error = ev[2]
            return index, ""
        c.info = info = ev[2]
        n = info["completion_tokens"]
        self.metrics.observe_request(self.start, c.first, time.monotonic(), n)
        self.metrics.generation_tokens.inc(len(c.tokens))
        self.metrics.requests.labels(info["finish_reason"]).inc()
        return index, c.dec.finish(info["text"])

    async def collect(self) -> None:
        try:
            while self.pending:
                self._handle(await self.queue.get())
        finally:
            left = self.unfinished()
            if left:  # cancelled while waiting (e.g. the server task was cancelled)
                self.runner.cancel(left)

    def _usage(self) -> dict:
        done = [c.info for c in self.choices if c.info is not None]
        return protocol.usage(sum(len(p) for p in self.p.prompts), sum(i["completion_tokens"] for i in done))

    def _lp(self, chat: bool, entries, offset: int = 0):
        if self.p.logprobs is None:
            return None
        if chat:
            return protocol.chat_logprobs(self.tok, entries)
        return protocol.completion_logprobs(self.tok, entries, offset)

    def response(self, rid: str, model: str, chat: bool):
        errors = [c.error for c in self.choices if c.error is not None]
        if errors:
            return _error(APIError(errors[0], None, status=500, type="server_error"))
        out = []
        for i, c in enumerate(self.choices):
            info = c.info
            text = info["text"] if info["text"] is not None else self.tok.decode(c.tokens, skip_special_tokens=True)
            lp = self._lp(chat, c.logprobs[:info["completion_tokens"]])
            if chat:
                out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": info["finish_reason"]})
            else:
                out.append({"index": i, "text": text, "logprobs": lp, "finish_reason": info["finish_reason"]})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": self.p.created,
                "model": model, "choices": out, "usage": self._usage()}

    async def sse(self, rid: str, model: str, chat: bool):
        """Server-sent events: one chunk per text delta, a finish chunk per choice, optional usage, [DONE]."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage_field = {"usage": None} if self.p.include_usage else {}

        def chunk(choices: list, **extra) -> str:
            data = {"id": rid, "object": obj, "created": self.p.created, "model": model, "choices": choices,
                    **usage_field, **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def choice(i: int, text: str | None, finish: str | None, lp_entries) -> dict:
            c = self.choices[i]
            lp = self._lp(chat, lp_entries, c.dec.sent - len(text or "")) if lp_entries else None
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}

        try:
            if chat:
                for i in range(len(self.choices)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            while self.pending:
                ev = await self.queue.get()
                i, text = self._handle(ev)
                c = self.choices[i]
                if c.error is not None:
                    err = APIError(c.error, None, status=500, type="server_error").body()
                    yield f"data: {json.dumps(err)}\n\n"
                    continue
                if text or (c.info is not None and c.unsent_lp):
                    lp, c.unsent_lp = c.unsent_lp, []
                    yield chunk([choice(i, text, None, lp)])
                if c.info is not None:
                    yield chunk([choice(i, None if chat else "", c.info["finish_reason"], None)])
            if self.p.include_usage:
                last = {"id": rid, "object": obj, "created": self.p.created, "model": model, "choices": [],
                        "usage": self._usage()}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            left = self.unfinished()
            if left:  # the client went away (Starlette cancelled this generator): free the slots now
                self.runner.cancel(left)


def serve(config: ServeConfig) -> None:
    """Run the server with uvicorn until SIGINT/SIGTERM, then shut down gracefully: /health and new
    requests answer 503 at once, in-flight requests get `shutdown_grace` seconds and are then cancelled."""
    import uvicorn

    if config.api_key is None:
        config.api_key = os.environ.get("LLMKIT_API_KEY") or None
    app = create_app(config)
    server = GracefulServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           timeout_graceful_shutdown=config.shutdown_grace + 5))
    server.run()


try:
    import uvicorn as _uvicorn

    class GracefulServer(_uvicorn.Server):
        """uvicorn.Server that starts draining the app's runner as soon as a shutdown signal arrives."""

        def handle_exit(self, sig, frame) -> None:
            app = self.config.app
            runner = getattr(getattr(app, "state", None), "runner", None)
            if runner is not None:
                runner.drain(app.state.config.shutdown_grace)
            super().handle_exit(sig, frame)
except ImportError:  # pragma: no cover - uvicorn is a dependency
    GracefulServer = None
