"""The OpenAI-compatible HTTP server: `create_app(ServeConfig) -> FastAPI` and `serve(config)`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (OpenAI wire format, SSE
streaming), GET|HEAD /health (200 while the engine thread runs, 503 while shutting down or after the
engine died), GET /metrics (Prometheus text), GET|HEAD / (the web chat page in static/index.html), and
GET|POST /v1/adapters, DELETE /v1/adapters/{name} (LoRA adapters served beside the base, `model:
"<name>:<adapter>"`: `llmkit.serve.adapters`).

Handlers only validate, submit to the `EngineRunner` and format what comes back: the engine lives in
the runner's thread, and parsing + tokenizing run in a worker thread so a large prompt list never stalls
the event loop (and with it every other stream). A client that disconnects (streaming or not) has its
engine requests cancelled at once, which frees their cache slots.

Errors never carry exception text (that goes to the log). A stream that fails ends with a chunk whose
finish_reason is "error" and which carries an OpenAI error object, and no ``data: [DONE]``. If the engine
thread dies, every request gets an error, new ones 503, and `serve` exits with status 1.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.serve import adapters as adapters_api
from llmkit.serve import protocol
from llmkit.serve.metrics import ServerMetrics
from llmkit.serve.protocol import APIError, Context, IncrementalDecoder, ParsedRequest
from llmkit.serve.runner import Draining, EngineDown, EngineRunner, QueueFull
from llmkit.serve.tool_calls import ToolStream, reply_message

log = logging.getLogger(__name__)
STATIC_INDEX = Path(__file__).parent / "static" / "index.html"


@dataclass
class ServeConfig:
    """Settings of `llmkit serve`: a YAML file for `--config`, every CLI flag a shorthand for one key."""

    model: str
    """Model directory (plain or quantized)."""
    adapter: str | None = None
    """Optional LoRA / prefix adapter directory, applied to the model (the only one served)."""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapters served side by side on the base, name -> dir (`--adapter NAME=DIR`): a request picks one
    with `model: "<served name>:<name>"`; more load at run time via POST /v1/adapters (`llmkit.serve.adapters`).
    Not with `adapter`."""
    adapter_budget_mb: float = 1024.0
    """Memory the resident adapters' factors may take, MiB; least recently used idle ones are paged out."""
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
    """Context length (prompt + completion) in tokens; upper bound: the model's block_size. Default: the
    block_size, or less where max_batch such contexts would not fit in `kv_cache_gb`."""
    kv_cache_gb: float = 2.0
    """Memory the KV cache may take, GiB: max_batch x max_model_len positions are reserved up front, so
    an imported model's 32k-128k context would otherwise ask for tens of GiB."""
    prefix_cache_tokens: int = 4096
    max_request_bytes: int = 1 << 20
    """Largest accepted request body (HTTP 413 above)."""
    shutdown_grace: float = 10.0
    """Seconds in-flight requests get to finish on shutdown before they are cancelled."""
    device: str = "auto"
    """cpu, cuda[:i] or auto (`llmkit.runtime`)."""
    dtype: str = "auto"
    """auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16; INT8 dirs keep their int8 weights."""


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


INTERNAL_ERROR = APIError("internal server error", None, status=500, type="server_error")


class _StatusCounter:
    """Pure ASGI middleware counting responses by status (BaseHTTPMiddleware would wrap streaming).

    It also answers unhandled exceptions itself (a generic 500, the traceback logged): Starlette's own
    last-resort handler sits outside every user middleware, so its 500s would go uncounted."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_counted(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.http.labels(str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:  # noqa: BLE001
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:  # mid-response (a stream): nothing valid can be sent any more
                raise
            await _error(INTERNAL_ERROR)(scope, receive, send_counted)


def _index_headers(html: str) -> dict[str, str]:
    """Security headers of the web page: no framing, no MIME sniffing, and a CSP that runs only the page's
    own inline scripts (by hash) and talks only to this origin."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
                      for m in re.findall(r"<script>(.*?)</script>", html, flags=re.S))
    csp = (f"default-src 'none'; script-src {hashes or chr(39) + 'none' + chr(39)}; "
           "style-src 'unsafe-inline'; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Content-Security-Policy": csp,
            "Referrer-Policy": "no-referrer"}


def _default_model_name(model: str) -> str:
    """models:/quickstart@production -> quickstart; runs/sft/merged -> merged."""
    if model.startswith("models:/"):
        return model[len("models:/"):].split("@")[0].split("/")[0]
    return Path(model).resolve().name


def context_length(model, config: ServeConfig) -> int:
    """The served context (tokens per request): `max_model_len` or the model's block_size, capped so that
    `max_batch` requests' keys and values fit in `kv_cache_gb`. An explicit `max_model_len` that does not
    fit is refused with the figures, rather than silently shortened."""
    c = model.config
    block = c.block_size
    dtype = next(model.parameters()).dtype  # the Engine's KV cache takes the weights' float dtype
    per_token = 2 * c.n_layer * c.kv_heads * c.head_dim * dtype.itemsize  # keys + values, bytes
    fits = int(config.kv_cache_gb * 2**30) // (config.max_batch * per_token)
    wanted = min(config.max_model_len or block, block)
    if wanted <= fits:
        return wanted
    if config.max_model_len is not None or fits < 16:
        need = config.max_batch * wanted * per_token / 2**30
        raise ValueError(f"max_model_len={wanted}: {config.max_batch} requests x {wanted} tokens of KV cache need "
                         f"{need:.2f} GiB, more than kv_cache_gb={config.kv_cache_gb}; lower --max-model-len or "
                         f"--max-batch, or raise --kv-cache-gb")
    log.info("context %d tokens (of the model's %d): %d requests x %d tokens of KV cache fit in %.2f GiB "
             "(--kv-cache-gb)", fits, block, config.max_batch, fits, config.kv_cache_gb)
    return fits


def create_app(config: ServeConfig, on_engine_failure=None) -> FastAPI:
    """Load the model and build the app; the engine thread starts with the app's lifespan.

    on_engine_failure(exc): called from the engine thread if it dies (after every request got its
    error); `serve` passes one that stops uvicorn so the process exits non-zero."""
    from llmkit.infer.engine import Engine
    from llmkit.infer.load import load_for_inference

    model, tok, template = load_for_inference(config.model, config.adapter, config.device, config.dtype)
    max_len = context_length(model, config)
    name = config.served_model_name or _default_model_name(str(config.model))
    created = int(time.time())
    multi_lora, adapter_service = adapters_api.build(model, config, name, created)
    try:
        engine = Engine(model, tok, max_batch=config.max_batch, max_len=max_len,
                        prefix_cache_tokens=config.prefix_cache_tokens, adapters=multi_lora)
    except TypeError as e:  # an encoder or encoder-decoder: a clean CLI error, not a traceback
        raise ValueError(f"{config.model}: {e}") from None
    adapters_api.register_startup(adapter_service, config.adapters)
    runner = EngineRunner(engine, max_queue=config.max_queue, on_fatal=on_engine_failure)
    metrics = ServerMetrics()
    ctx = Context(name, tok, max_len, template)
    api_key = config.api_key

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        await asyncio.to_thread(runner.stop, config.shutdown_grace)

    # redirect_slashes off: Starlette's redirect of POST /v1/completions/ builds its Location from the
    # client's Host header (an open redirect); an unknown path is a plain 404 instead.
    app = FastAPI(title="llmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
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

    # -- request reading ------------------------------------------------------------------------------
    key_bytes = api_key.encode("utf-8") if api_key is not None else None

    def _auth(request: Request) -> None:
        if key_bytes is None:
            return
        # Header values are bytes on the wire; Starlette decodes them as Latin-1, which round-trips, so a
        # UTF-8 key is compared as the bytes the client sent.
        header = request.headers.get("authorization", "").encode("latin-1")
        given = header[7:] if header[:7].lower() == b"bearer " else b""
        if not hmac.compare_digest(given, key_bytes):
            raise APIError("Invalid or missing API key: send 'Authorization: Bearer <key>'", None, status=401,
                           code="invalid_api_key", type="authentication_error",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _body(request: Request) -> bytes:
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
        return bytes(raw)

    def _parse(raw: bytes, chat: bool) -> ParsedRequest:
        """JSON -> validated, tokenized request (runs in a worker thread: a 1 MB prompt list takes a while)."""
        body = protocol.parse_json(raw)
        adapter = adapter_service.resolve(body)  # model "<name>:<adapter>" (404 if not loaded)
        parsed = protocol.parse_chat(body, ctx) if chat else protocol.parse_completion(body, ctx)
        return adapter_service.apply(parsed, adapter)

    # -- endpoints --------------------------------------------------------------------------------------
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if runner.dead or not runner.alive:
            return JSONResponse({"status": "engine_down"}, 503)
        if runner.draining:
            return JSONResponse({"status": "shutting_down"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.render(runner.stats()), media_type=metrics.content_type)

    page_headers = _index_headers(STATIC_INDEX.read_text(encoding="utf-8")) if STATIC_INDEX.is_file() else {}

    @app.api_route("/", methods=["GET", "HEAD"])
    async def index():
        if not STATIC_INDEX.is_file():
            return _error(APIError("the web page is not installed", None, status=404, code="not_found"))
        return FileResponse(STATIC_INDEX, media_type="text/html", headers=page_headers)

    @app.get("/v1/models")
    async def models(request: Request):
        _auth(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "llmkit", "max_model_len": max_len},
                                           *adapter_service.model_entries(max_len)]}

    adapter_service.install(app, _auth, _body)  # GET/POST /v1/adapters, DELETE /v1/adapters/{name}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await _body(request)
        return await _generate(request, await asyncio.to_thread(_parse, raw, True), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await _body(request)
        return await _generate(request, await asyncio.to_thread(_parse, raw, False), chat=False)

    # -- generation ---------------------------------------------------------------------------------------
    async def _generate(request: Request, parsed: ParsedRequest, chat: bool):
        if runner.draining:
            raise APIError("the server is shutting down", None, status=503, code="shutting_down",
                           type="server_error")
        if len(parsed.choices) > runner.max_queue:  # could never be admitted: not a "retry later"
            param = "n" if len(parsed.prompts) == 1 else "prompt"
            raise APIError(f"this request needs {len(parsed.choices)} generations (prompts x n); the server "
                           f"queues at most {runner.max_queue}", param, code="too_many_generations")
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
        except EngineDown:
            raise APIError("the inference engine stopped; retry on another replica", None, status=503,
                           code="engine_down", type="server_error") from None
        metrics.prompt_tokens.inc(sum(len(parsed.prompts[c.prompt_index]) for c in parsed.choices))
        gen = _Generation(parsed, tok, metrics, start, ids, runner, queue)
        if parsed.stream:
            return StreamingResponse(gen.sse(rid, adapter_service.model_id(parsed), chat),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_on_disconnect(request, lambda: runner.cancel(gen.unfinished())))
        try:
            await gen.collect()
        finally:
            watcher.cancel()
        return gen.response(rid, adapter_service.model_id(parsed), chat, shutting_down=runner.draining)

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
        # chat with tools: each choice's text goes through its call parser (llmkit.serve.tools)
        self.tool_streams = [ToolStream(parsed.tools) if parsed.tools is not None else None for _ in parsed.choices]

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
            self.metrics.requests.labels("error").inc()
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

    def response(self, rid: str, model: str, chat: bool, shutting_down: bool = False):
        """The JSON body of a non-streaming request, or an error response: 500 if a choice failed, 503 if
        one was cancelled (by shutdown: its client is still waiting; "cancelled" is no OpenAI
        finish_reason, and a truncated 200 would pass for a whole answer)."""
        errors = [c.error for c in self.choices if c.error is not None]
        if errors:
            return _error(APIError(errors[0], None, status=500, type="server_error"))
        if any(c.info["finish_reason"] == "cancelled" for c in self.choices):
            why = "the server shut down" if shutting_down else "the request was cancelled"
            return _error(APIError(f"{why} before the request finished; retry", None, status=503,
                                   code="shutting_down" if shutting_down else "cancelled", type="server_error"))
        out = []
        for i, c in enumerate(self.choices):
            info = c.info
            text = info["text"] if info["text"] is not None else self.tok.decode(c.tokens, skip_special_tokens=True)
            lp = self._lp(chat, c.logprobs[:info["completion_tokens"]])
            if chat:
                message, finish = reply_message(text, self.p.tools, info["finish_reason"])
                out.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
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

        def error_end(i: int, err: APIError) -> str:
            """The last event of a failed stream: choice i's finish chunk, finish_reason "error", with the
            OpenAI error object beside the choices (no [DONE] follows: the reply is not whole)."""
            fin = choice(i, None if chat else "", "error", None)
            return chunk([fin], error=err.body()["error"])

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
                    yield error_end(i, APIError(c.error, None, status=500, type="server_error"))
                    return  # the finally cancels this request's other choices
                ts = self.tool_streams[i]
                if ts is not None:  # tool calls: text deltas become content and tool_calls deltas
                    for delta in ts.deltas(text, final=c.info is not None):
                        lp, c.unsent_lp = c.unsent_lp, []
                        yield chunk([{"index": i, "delta": delta, "logprobs": self._lp(chat, lp) if lp else None,
                                      "finish_reason": None}])
                elif text or (c.info is not None and c.unsent_lp):
                    lp, c.unsent_lp = c.unsent_lp, []
                    yield chunk([choice(i, text, None, lp)])
                if c.info is not None and c.info["finish_reason"] == "cancelled":  # by shutdown
                    yield error_end(i, APIError("the server shut down before the request finished; retry",
                                                None, status=503, code="shutting_down", type="server_error"))
                    return
                if c.info is not None:
                    finish = ts.finish_reason(c.info["finish_reason"]) if ts is not None else c.info["finish_reason"]
                    yield chunk([choice(i, None if chat else "", finish, None)])
            if self.p.include_usage:
                last = {"id": rid, "object": obj, "created": self.p.created, "model": model, "choices": [],
                        "usage": self._usage()}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        except Exception:  # noqa: BLE001 - a bug while formatting: end the stream as failed, not cut off
            log.exception("stream %s failed", rid)
            yield error_end(0, INTERNAL_ERROR)
        finally:
            left = self.unfinished()
            if left:  # the client went away (Starlette cancelled this generator): free the slots now
                self.runner.cancel(left)
                # nobody reads the 'done' events of these any more: count them as cancelled here
                self.metrics.requests.labels("cancelled").inc(len(left))


def serve(config: ServeConfig) -> None:
    """Run the server with uvicorn until SIGINT/SIGTERM, then shut down gracefully (`GracefulServer`):
    /health and new requests answer 503 at once while the listener stays open, in-flight requests get
    `shutdown_grace` seconds and are then cancelled.

    If the engine thread dies, uvicorn is stopped and this raises SystemExit(1), so that a supervisor
    (systemd, Kubernetes, the deploy script's restart loop) starts a fresh process."""
    import uvicorn

    if config.api_key is None:
        config.api_key = os.environ.get("LLMKIT_API_KEY") or None
    holder: dict = {}

    def engine_failed(exc: BaseException) -> None:
        log.critical("the engine thread died (%s); stopping the server", type(exc).__name__)
        if "server" in holder:
            holder["server"].should_exit = True  # uvicorn's main loop checks this every 0.1 s

    app = create_app(config, on_engine_failure=engine_failed)
    server = GracefulServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           timeout_graceful_shutdown=config.shutdown_grace + 5))
    holder["server"] = server
    server.run()
    if app.state.runner.dead:
        raise SystemExit(1)


try:
    import uvicorn as _uvicorn

    class GracefulServer(_uvicorn.Server):
        """uvicorn.Server that drains the app's runner on the first SIGINT/SIGTERM before closing anything.

        uvicorn's own shutdown closes the listening socket first, so clients arriving during the grace
        period would get "connection refused". Here the first signal only starts draining (new requests and
        /health answer 503, in-flight ones go on); uvicorn's shutdown starts once no request is in flight or
        `shutdown_grace` seconds have passed (then the rest are cancelled). A second signal shuts down now.
        """

        _drainer: threading.Thread | None = None

        def handle_exit(self, sig, frame) -> None:
            app = self.config.app
            runner = getattr(getattr(app, "state", None), "runner", None)
            if runner is None or self._drainer is not None or self.should_exit:
                return super().handle_exit(sig, frame)
            grace = app.state.config.shutdown_grace
            runner.drain(grace)

            def finish_then_exit():
                if not runner.wait_idle(grace):
                    runner.wait_idle(5.0)  # the drain timer cancels them at `grace`: let those answers go out
                super(GracefulServer, self).handle_exit(sig, frame)

            self._drainer = threading.Thread(target=finish_then_exit, name="llmkit-drain", daemon=True)
            self._drainer.start()
except ImportError:  # pragma: no cover - uvicorn is a dependency
    GracefulServer = None
