"""OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of :class:`AsyncEngine`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus), ``GET /version``, ``GET /api/stats``
(dashboard JSON) and ``GET /`` (chat playground + live dashboard).

The socket comes up at once; the model loads in the engine thread meanwhile
(``/health`` answers 503 and ``/v1/*`` 503 until it is ready).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from miniinfer.outputs import CompletionOutput, RequestOutput
from miniinfer.server.async_engine import (
    AsyncEngine, ChatPrompt, EngineDeadError, EngineNotReadyError, InvalidPromptError, RequestStream,
)
from miniinfer.server.metrics import ServerMetrics
from miniinfer.server.protocol import (
    APIError, ChatChoiceLogprobs, ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse,
    ChatCompletionStreamChoice, ChatCompletionStreamResponse, ChatLogprobToken, ChatResponseMessage,
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, CompletionStreamResponse,
    DeltaMessage, ModelCard, ModelList, PromptTokensDetails, TopLogprob, UsageInfo, invalid,
    param_from_value_error, parse_request,
)

logger = logging.getLogger("miniinfer.server")

STATIC_DIR = Path(__file__).parent / "static"


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("miniinfer")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0.1.0"


# --------------------------------------------------------------------------- ASGI guard

def _error_bytes(status: int, message: str, param: str | None = None) -> bytes:
    return json.dumps(APIError(status, message, param).body()).encode()


class _GuardMiddleware:
    """API-key check for ``/v1/*`` and request body size limit, before any parsing.

    The body is read here (up to the limit) and replayed to the app, so an oversized
    chunked upload is refused as soon as it crosses the limit.
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body = max_body_bytes

    @staticmethod
    async def _reply(send: Callable, status: int, message: str, extra_headers: list | None = None) -> None:
        body = _error_bytes(status, message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += extra_headers or []
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        for k, v in headers:
            if k == b"authorization":
                value = v.decode("latin-1").strip()
                if value[:7].lower() == "bearer ":
                    return secrets.compare_digest(value[7:].strip().encode(), self.api_key.encode())
        return False

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope.get("path", "")
        headers = scope.get("headers", [])
        if self.api_key and path.startswith("/v1/") and not self._authorized(headers):
            return await self._reply(send, 401, "Invalid or missing API key (send 'Authorization: Bearer <key>')",
                                     [(b"www-authenticate", b"Bearer")])
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = None
        for k, v in headers:
            if k == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    return await self._reply(send, 400, "invalid Content-Length header")
        if length is not None and length > self.max_body:
            return await self._reply(send, 413, f"request body is {length} bytes; the limit is {self.max_body} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return await self._reply(send, 413, f"request body exceeds the limit of {self.max_body} bytes")
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator (so aborts run at once)."""

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def _sse(obj: Any) -> str:
    if hasattr(obj, "model_dump_json"):
        return f"data: {obj.model_dump_json(exclude_none=True)}\n\n"
    return f"data: {json.dumps(obj)}\n\n"


# --------------------------------------------------------------------------- logprobs

def _ranked(d: dict, top_n: int) -> list:
    items = sorted(d.items(), key=lambda kv: kv[1].rank)
    return [(tid, lp) for tid, lp in items if lp.rank <= top_n][:top_n]


def _token_str(lp: Any, tid: int) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"<token_{tid}>"


def chat_logprobs(token_ids: list[int], logprobs: list[dict], top_n: int) -> ChatChoiceLogprobs:
    content = []
    for tid, d in zip(token_ids, logprobs):
        lp = d.get(tid)
        if lp is None:  # should not happen (the sampled token is always a key)
            continue
        tok = _token_str(lp, tid)
        tops = [TopLogprob(token=_token_str(v, k), logprob=max(v.logprob, -9999.0),
                           bytes=list(_token_str(v, k).encode("utf-8"))) for k, v in _ranked(d, top_n)]
        content.append(ChatLogprobToken(token=tok, logprob=max(lp.logprob, -9999.0),
                                        bytes=list(tok.encode("utf-8")), top_logprobs=tops))
    return ChatChoiceLogprobs(content=content)


def completion_logprobs(token_ids: list[int], logprobs: list[dict], top_n: int,
                        offset: int) -> tuple[CompletionLogprobs, int]:
    out = CompletionLogprobs()
    for tid, d in zip(token_ids, logprobs):
        lp = d.get(tid)
        if lp is None:
            continue
        tok = _token_str(lp, tid)
        out.tokens.append(tok)
        out.token_logprobs.append(max(lp.logprob, -9999.0))
        top = {_token_str(v, k): max(v.logprob, -9999.0) for k, v in _ranked(d, top_n)}
        top.setdefault(tok, max(lp.logprob, -9999.0))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(tok)
    return out, offset


def _usage(outs: list[RequestOutput], prompt_lens: list[int]) -> UsageInfo:
    p = sum(prompt_lens)
    c = sum(len(co.token_ids) for o in outs if o is not None for co in o.outputs)
    cached = sum(o.num_cached_tokens or 0 for o in outs if o is not None)
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class _ChoiceState:
    __slots__ = ("text_len", "ntok", "done", "offset")

    def __init__(self, offset: int = 0) -> None:
        self.text_len = 0
        self.ntok = 0
        self.done = False
        self.offset = offset


def _delta(st: _ChoiceState, c: CompletionOutput) -> tuple[str, list[int], list | None]:
    text = c.text[st.text_len:]
    ids = c.token_ids[st.ntok:]
    lps = c.logprobs[st.ntok:] if c.logprobs is not None else None
    st.text_len = len(c.text)
    st.ntok = len(c.token_ids)
    return text, ids, lps


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams, tagging outputs with their stream index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()
    done_marker = object()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                q.put_nowait((i, out))
            q.put_nowait((i, done_marker))
        except Exception as e:  # noqa: BLE001 - forwarded to the consumer
            q.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await q.get()
            if item is done_marker:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


# --------------------------------------------------------------------------- app

def create_app(engine: AsyncEngine, *, api_key: str | None = None, max_n: int = 8,
               max_body_bytes: int = 1 << 20, served_model_name: str | None = None,
               device: str | None = None, start_engine: bool = True) -> FastAPI:
    """Build the FastAPI app around ``engine`` (started in the app's lifespan)."""
    metrics = ServerMetrics(engine, served_model_name or "miniinfer")
    engine.on_request_finished = metrics.observe_finished
    started_at = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start(asyncio.get_running_loop())

        async def sampler() -> None:
            while True:
                metrics.sample()
                await asyncio.sleep(0.5)

        task = asyncio.ensure_future(sampler())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(engine.shutdown, 5.0)

    app = FastAPI(title="MiniInfer", version=_version(), lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics

    def model_name() -> str:
        return served_model_name or engine.model_name or "miniinfer"

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.http_errors.labels(status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(invalid(str(exc)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal server error: {type(exc).__name__}").body(), status_code=500)

    # ------------------------------------------------------------------ helpers
    async def read_json(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise invalid(f"malformed JSON body: {e}") from None

    def check_ready() -> None:
        if engine.state == "dead":
            raise APIError(503, f"the engine is not available: {engine.error}")
        if not engine.ready:
            raise APIError(503, "the model is still loading; retry shortly")

    def check_model(name: str | None) -> None:
        if name in (None, "", model_name(), engine.model_name):
            return
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    async def add(request_id: str, prompt: Any, params: Any) -> RequestStream:
        try:
            return await engine.add_request(request_id, prompt, params)
        except InvalidPromptError as e:
            raise invalid(str(e), e.param) from None
        except ValueError as e:
            raise invalid(str(e), param_from_value_error(str(e))) from None
        except EngineNotReadyError:
            raise APIError(503, "the model is still loading; retry shortly") from None
        except EngineDeadError as e:
            raise APIError(503, f"the engine is not available: {e}") from None

    async def wait_disconnect(request: Request) -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    async def collect(request: Request, streams: list[RequestStream]) -> list[RequestOutput]:
        """Wait for all streams to finish; abort them if the client goes away."""
        async def consume() -> list[RequestOutput]:
            finals: list[RequestOutput | None] = [None] * len(streams)
            async for i, out in _merge(streams):
                finals[i] = out
            return finals  # type: ignore[return-value]

        work = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                for s in streams:
                    engine.abort(s.request_id)
        if not work.done() or work.cancelled():
            raise APIError(499, "client disconnected")
        try:
            return work.result()
        except EngineDeadError as e:
            raise APIError(500, f"the engine failed while serving this request: {e}") from None

    def abort_unfinished(streams: list[RequestStream]) -> None:
        for s in streams:
            if not s.finished:
                engine.abort(s.request_id)

    # ------------------------------------------------------------------ chat
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await read_json(request))
        check_ready()
        check_model(req.model)
        params = req.to_sampling_params(max_n, engine.max_model_len)
        messages = req.to_messages()
        top_n = req.top_logprobs or 0
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await add(request_id, ChatPrompt(messages), params)
        name, created = model_name(), int(time.time())

        if req.stream:
            include_usage = req.include_usage()

            async def gen() -> AsyncIterator[str]:
                states = [_ChoiceState() for _ in range(params.n)]
                last: RequestOutput | None = None
                try:
                    for i in range(params.n):
                        yield _sse(ChatCompletionStreamResponse(
                            id=request_id, created=created, model=name,
                            choices=[ChatCompletionStreamChoice(
                                index=i, delta=DeltaMessage(role="assistant", content=""))]))
                    async for out in stream:
                        last = out
                        for c in out.outputs:
                            st = states[c.index]
                            if st.done:
                                continue
                            text, ids, lps = _delta(st, c)
                            if not text and not c.finish_reason and not (lps and req.logprobs):
                                continue
                            choice = ChatCompletionStreamChoice(
                                index=c.index, delta=DeltaMessage(content=text) if text else DeltaMessage(),
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                            if req.logprobs and lps:
                                choice.logprobs = chat_logprobs(ids, lps, top_n)
                            if c.finish_reason:
                                st.done = True
                            yield _sse(ChatCompletionStreamResponse(
                                id=request_id, created=created, model=name, choices=[choice]))
                    if include_usage and last is not None:
                        yield _sse(ChatCompletionStreamResponse(
                            id=request_id, created=created, model=name, choices=[],
                            usage=_usage([last], [len(stream.prompt_token_ids)])))
                    yield "data: [DONE]\n\n"
                except EngineDeadError as e:
                    yield _sse(APIError(500, f"the engine failed while serving this request: {e}").body())
                    yield "data: [DONE]\n\n"
                finally:
                    abort_unfinished([stream])

            return _SSEResponse(gen(), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        final = (await collect(request, [stream]))[0]
        choices = []
        for c in final.outputs:
            choice = ChatCompletionChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            if req.logprobs and c.logprobs is not None:
                choice.logprobs = chat_logprobs(c.token_ids, c.logprobs, top_n)
            choices.append(choice)
        resp = ChatCompletionResponse(id=request_id, created=created, model=name, choices=choices,
                                      usage=_usage([final], [len(stream.prompt_token_ids)]))
        return Response(resp.model_dump_json(), media_type="application/json")

    # ------------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse_request(CompletionRequest, await read_json(request))
        check_ready()
        check_model(req.model)
        params = req.to_sampling_params(max_n, engine.max_model_len)
        prompts = req.prompts()
        if req.echo and any(not isinstance(p, str) for p in prompts):
            raise invalid("echo is only supported for text prompts", "echo")
        top_n = req.logprobs or 0
        want_lp = req.logprobs is not None
        base_id = f"cmpl-{uuid.uuid4().hex}"
        streams: list[RequestStream] = []
        try:
            for i, p in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(await add(rid, p, params))
        except BaseException:
            abort_unfinished(streams)
            raise
        name, created, n = model_name(), int(time.time()), params.n
        prefix = [p if (req.echo and isinstance(p, str)) else "" for p in prompts]

        if req.stream:
            include_usage = req.include_usage()

            async def gen() -> AsyncIterator[str]:
                states = [[_ChoiceState(len(prefix[i])) for _ in range(n)] for i in range(len(streams))]
                lasts: list[RequestOutput | None] = [None] * len(streams)
                try:
                    for i, pre in enumerate(prefix):
                        if pre:
                            for j in range(n):
                                yield _sse(CompletionStreamResponse(
                                    id=base_id, created=created, model=name,
                                    choices=[CompletionChoice(index=i * n + j, text=pre)]))
                    async for i, out in _merge(streams):
                        lasts[i] = out
                        for c in out.outputs:
                            st = states[i][c.index]
                            if st.done:
                                continue
                            text, ids, lps = _delta(st, c)
                            if not text and not c.finish_reason and not (lps and want_lp):
                                continue
                            choice = CompletionChoice(index=i * n + c.index, text=text,
                                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                            if want_lp and lps:
                                choice.logprobs, st.offset = completion_logprobs(ids, lps, top_n, st.offset)
                            if c.finish_reason:
                                st.done = True
                            yield _sse(CompletionStreamResponse(id=base_id, created=created, model=name,
                                                                choices=[choice]))
                    if include_usage:
                        yield _sse(CompletionStreamResponse(
                            id=base_id, created=created, model=name, choices=[],
                            usage=_usage(lasts, [len(s.prompt_token_ids) for s in streams])))
                    yield "data: [DONE]\n\n"
                except EngineDeadError as e:
                    yield _sse(APIError(500, f"the engine failed while serving this request: {e}").body())
                    yield "data: [DONE]\n\n"
                finally:
                    abort_unfinished(streams)

            return _SSEResponse(gen(), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        finals = await collect(request, streams)
        choices = []
        for i, final in enumerate(finals):
            for c in final.outputs:
                choice = CompletionChoice(index=i * n + c.index, text=prefix[i] + c.text,
                                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                if want_lp and c.logprobs is not None:
                    choice.logprobs, _ = completion_logprobs(c.token_ids, c.logprobs, top_n, len(prefix[i]))
                choices.append(choice)
        resp = CompletionResponse(id=base_id, created=created, model=name, choices=choices,
                                  usage=_usage(finals, [len(s.prompt_token_ids) for s in streams]))
        return Response(resp.model_dump_json(), media_type="application/json")

    # ------------------------------------------------------------------ info
    @app.get("/v1/models")
    async def list_models() -> Response:
        check_ready()
        root = engine.model_name or model_name()
        cards = ModelList(data=[ModelCard(id=model_name(), root=root, created=int(started_at),
                                          max_model_len=engine.max_model_len)])
        return Response(cards.model_dump_json(), media_type="application/json")

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        if engine.state in ("created", "loading"):
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "unhealthy", "error": engine.error}, status_code=503)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": _version(), "model": engine.model_name and model_name(),
                             "device": device, "max_model_len": engine.max_model_len})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/stats")
    async def api_stats() -> JSONResponse:
        data = metrics.dashboard()
        data["model"] = engine.model_name and model_name()
        data["device"] = device
        data["version"] = _version()
        data["auth_required"] = bool(api_key)
        return JSONResponse(data, headers={"Cache-Control": "no-store"})

    _page_headers = {
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                   "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_page_headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(_GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        try:
            import torch
            return f"{device} ({torch.cuda.get_device_name(0)})"
        except Exception:  # noqa: BLE001
            return device
    return device


def run_server(engine_config: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_n: int = 8, max_body_bytes: int = 1 << 20, served_model_name: str | None = None) -> None:
    """Serve ``engine_config``'s model over HTTP until interrupted (blocks).

    ``api_key`` falls back to the ``MINIINFER_API_KEY`` environment variable; when set,
    ``/v1/*`` needs ``Authorization: Bearer <key>``.
    """
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = api_key or os.environ.get("MINIINFER_API_KEY") or None

    def factory():
        from miniinfer.engine.llm_engine import LLMEngine
        return LLMEngine(engine_config)

    engine = AsyncEngine(factory)
    app = create_app(engine, api_key=api_key, max_n=max_n, max_body_bytes=max_body_bytes,
                     served_model_name=served_model_name,
                     device=_device_name(str(getattr(engine_config, "device", "cpu"))))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this port can use it "
                       "(pass --api-key or set MINIINFER_API_KEY)", host)
    logger.info("MiniInfer %s listening on http://%s:%d (API key %s); loading the model in the background",
                _version(), host, port, "required" if api_key else "not required")
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_keep_alive=10,
                            timeout_graceful_shutdown=5, server_header=False)
    uvicorn.Server(config).run()
