"""OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of :class:`AsyncEngine`.

Endpoints: ``POST /v1/chat/completions`` (``serving_chat``), ``POST /v1/completions``
(``serving_completion``), and here ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus), ``GET /version``, ``GET /api/stats`` (dashboard JSON) and ``GET /`` (chat
playground + live dashboard). ``middleware.GuardMiddleware`` checks the API key and the
body size first; ``serving`` holds the request lifecycle both generation routes share.

The socket comes up at once; the model loads in the engine thread meanwhile
(``/health`` answers 503 and ``/v1/*`` 503 until it is ready).

Reliability: an engine fault fails the requests in flight (500) and the engine recovers
(``async_engine``; ``/health`` counts faults, recoveries and restarts). SIGTERM drains:
new requests get a 503, requests in flight get ``shutdown_grace_s`` to finish, what is
left is aborted (a 503 error, or an error event on a stream), then the process exits 0.
``request_timeout_s`` aborts a request past it with a 504. Sizes: body (413), request
line + headers (431, ``max_header_bytes``), and the per-field bounds of ``protocol`` /
``serving`` (400 naming the field). See SECURITY.md.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from miniinfer.server import router_endpoints, serving_chat, serving_completion
from miniinfer.server.async_engine import AsyncEngine, ServerDrainingError
from miniinfer.server.metrics import ServerMetrics
from miniinfer.server.middleware import GuardMiddleware
from miniinfer.server.protocol import APIError, ModelCard, ModelList, invalid
from miniinfer.server.serving import OpenAIServing

logger = logging.getLogger("miniinfer.server")

STATIC_DIR = Path(__file__).parent / "static"

_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("miniinfer")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0.1.0"


# --------------------------------------------------------------------------- info routes

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    """The one served model (503 until it is loaded)."""
    serving: OpenAIServing = request.app.state.serving
    serving.check_ready()
    engine = serving.engine
    root = engine.model_name or serving.model_name()
    cards = ModelList(data=[ModelCard(id=serving.model_name(), root=root, created=int(request.app.state.started_at),
                                      max_model_len=engine.max_model_len)])
    return Response(cards.model_dump_json(), media_type="application/json")


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while serving (also after recovered faults: ``faults`` / ``recoveries`` / ``restarts``
    count them); 503 while loading, rebuilding the engine after a fault, draining for
    shutdown, or once the engine is dead."""
    engine: AsyncEngine = request.app.state.engine
    faults = engine.fault_info()
    if request.app.state.serving.draining:
        return JSONResponse({"status": "draining", **faults}, status_code=503)
    if engine.healthy:
        return JSONResponse({"status": "ok", **faults})
    if engine.state in ("created", "loading"):
        return JSONResponse({"status": "loading"}, status_code=503)
    if engine.state == "restarting":
        return JSONResponse({"status": "restarting", **faults}, status_code=503)
    return JSONResponse({"status": "unhealthy", "error": engine.error, **faults}, status_code=503)


@router.get("/version")
async def version(request: Request) -> JSONResponse:
    """Server version, model, device and context length."""
    state = request.app.state
    return JSONResponse({"version": _version(), "model": state.engine.model_name and state.serving.model_name(),
                         "device": state.device, "max_model_len": state.engine.max_model_len})


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text exposition of the server and engine metrics."""
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/api/stats")
async def api_stats(request: Request) -> JSONResponse:
    """The dashboard's JSON: engine state, load, throughput and latency."""
    state = request.app.state
    data = state.metrics.dashboard()
    data["model"] = state.engine.model_name and state.serving.model_name()
    data["device"] = state.device
    data["version"] = _version()
    data["auth_required"] = state.auth_required
    data["faults"] = state.engine.fault_info()
    data["draining"] = state.serving.draining
    return JSONResponse(data, headers={"Cache-Control": "no-store"})


@router.get("/")
async def index() -> FileResponse:
    """The chat playground and live dashboard page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_PAGE_HEADERS)


# --------------------------------------------------------------------------- errors

async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    request.app.state.metrics.http_errors.labels(status=str(exc.status)).inc()
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = APIError(exc.status_code, str(exc.detail))
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(invalid(str(exc)).body(), status_code=400)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    return JSONResponse(APIError(500, f"internal server error: {type(exc).__name__}").body(), status_code=500)


# --------------------------------------------------------------------------- app

@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Start the engine thread (if asked), sample throughput every 0.5 s, shut the engine down."""
    engine: AsyncEngine = app.state.engine
    metrics: ServerMetrics = app.state.metrics
    app.state.loop = asyncio.get_running_loop()
    if app.state.start_engine:
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


async def drain(app: FastAPI, grace_s: float) -> dict:
    """Shutdown drain: refuse new requests (503), give those in flight ``grace_s`` seconds,
    then fail what is left (503 / an error event) and abort it in the engine. Returns what
    happened: ``in_flight`` at the start, ``aborted``, ``seconds``."""
    serving: OpenAIServing = app.state.serving
    engine: AsyncEngine = app.state.engine
    serving.draining = True
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    in_flight = engine.num_active_streams
    logger.info("draining: %d requests in flight, grace period %.1f s", in_flight, grace_s)
    while engine.num_active_streams and loop.time() - t0 < grace_s:
        await asyncio.sleep(0.05)
    aborted = 0
    if engine.num_active_streams:
        aborted = engine.fail_all(ServerDrainingError(
            f"the server is shutting down; the request was aborted after the {grace_s:g} s grace period"))
        await asyncio.sleep(0.1)  # let the handlers send their error responses
    result = {"in_flight": in_flight, "aborted": aborted, "seconds": round(loop.time() - t0, 3)}
    app.state.drain_result = result
    logger.info("drained in %.2f s (%d requests in flight at SIGTERM, %d aborted)",
                result["seconds"], in_flight, aborted)
    return result


def create_app(engine: AsyncEngine, *, api_key: str | None = None, max_n: int = 8,
               max_body_bytes: int = 1 << 20, served_model_name: str | None = None,
               device: str | None = None, start_engine: bool = True,
               request_timeout_s: float | None = None) -> FastAPI:
    """Build the FastAPI app around ``engine`` (started in the app's lifespan).

    ``request_timeout_s`` (None: off) aborts a generation request that runs longer, counted
    from when its body is parsed (tokenization and queueing included), frees its KV blocks and
    answers 504 ``type: timeout`` (on a stream: an error event, then ``[DONE]``)."""
    metrics = ServerMetrics(engine, served_model_name or "miniinfer")
    engine.on_request_finished = metrics.observe_finished

    app = FastAPI(title="MiniInfer", version=_version(), lifespan=_lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.serving = OpenAIServing(engine, max_n=max_n, served_model_name=served_model_name,
                                      request_timeout_s=request_timeout_s)
    app.state.loop = None
    app.state.drain_result = None
    app.state.start_engine = start_engine
    app.state.started_at = time.time()
    app.state.device = device
    app.state.auth_required = bool(api_key)

    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)

    app.include_router(serving_chat.router)
    app.include_router(serving_completion.router)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    router_endpoints.install(app)  # data-parallel router support (docs/DEPLOYMENT.md)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        try:
            import torch
            return f"{device} ({torch.cuda.get_device_name(0)})"
        except Exception:  # noqa: BLE001
            return device
    return device


try:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # pragma: no cover - uvicorn always brings h11
    H11Protocol = object  # type: ignore[assignment,misc]


class _H11Protocol(H11Protocol):
    """uvicorn's h11 protocol whose refusal of a malformed request is OpenAI-shaped JSON, and a
    431 naming the limit when the request line + headers are larger than ``max_header_bytes``
    (h11's ``max_incomplete_event_size``), instead of uvicorn's plain-text 400."""

    def send_400_response(self, msg: str) -> None:  # noqa: D102
        limit = self.config.h11_max_incomplete_event_size or h11.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        buffered = len(getattr(self.conn, "_receive_buffer", b""))
        if buffered > limit:
            status, text = 431, f"the request line and headers exceed the limit of {limit} bytes"
        else:
            status, text = 400, "invalid HTTP request"
        body = json.dumps(APIError(status, text).body()).encode()
        try:
            reason = b"Request Header Fields Too Large" if status == 431 else b"Bad Request"
            out = self.conn.send(h11.Response(status_code=status, reason=reason, headers=[
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]))
            out += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
            self.transport.write(out)
        except h11.LocalProtocolError:  # a response was already under way: just close
            pass
        self.transport.close()


def uvicorn_config(app: FastAPI, host: str, port: int, max_header_bytes: int = 16 * 1024, **kw: Any) -> Any:
    """The uvicorn config of the server: the h11 protocol above (so the header limit holds
    whatever HTTP parsers are installed), no ``Server`` header, short keep-alive."""
    import uvicorn
    kw.setdefault("log_level", "info")
    kw.setdefault("timeout_keep_alive", 10)
    kw.setdefault("timeout_graceful_shutdown", 5)
    return uvicorn.Config(app, host=host, port=port, http=_H11Protocol, server_header=False,
                          h11_max_incomplete_event_size=max_header_bytes, **kw)


def _draining_server_cls():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """``uvicorn.Server`` whose first SIGTERM drains (see :func:`drain`) and then exits
        cleanly (exit code 0); SIGINT and a second SIGTERM keep uvicorn's behaviour."""

        def __init__(self, config: Any, app: FastAPI, grace_s: float) -> None:
            super().__init__(config)
            self.miniinfer_app = app
            self.grace_s = grace_s
            self.drain_started = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            loop = self.miniinfer_app.state.loop
            if sig != signal.SIGTERM or self.drain_started or self.should_exit or loop is None:
                return super().handle_exit(sig, frame)
            # a signal handler may run in the middle of the loop's own code: only hand the
            # loop a callback (thread-safe), which starts the drain task
            self.drain_started = True
            loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            self._drain_task = asyncio.ensure_future(self._drain_then_exit())  # keep a reference

        async def _drain_then_exit(self) -> None:
            try:
                await drain(self.miniinfer_app, self.grace_s)
            finally:
                self.should_exit = True

    return DrainingServer


def run_server(engine_config: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_n: int = 8, max_body_bytes: int = 1 << 20, served_model_name: str | None = None,
               shutdown_grace_s: float = 30.0, request_timeout_s: float | None = None,
               max_header_bytes: int = 16 * 1024, engine_factory: Any = None) -> None:
    """Serve ``engine_config``'s model over HTTP until interrupted (blocks).

    ``api_key`` falls back to the ``MINIINFER_API_KEY`` environment variable; when set,
    ``/v1/*`` needs ``Authorization: Bearer <key>``. SIGTERM drains for up to
    ``shutdown_grace_s`` seconds, then the function returns (exit code 0).
    ``engine_factory`` (tests) replaces ``LLMEngine(engine_config)``.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = api_key or os.environ.get("MINIINFER_API_KEY") or None

    def factory():
        from miniinfer.engine.llm_engine import LLMEngine
        return LLMEngine(engine_config)

    engine = AsyncEngine(engine_factory or factory)
    app = create_app(engine, api_key=api_key, max_n=max_n, max_body_bytes=max_body_bytes,
                     served_model_name=served_model_name, request_timeout_s=request_timeout_s,
                     device=_device_name(str(getattr(engine_config, "device", "cpu"))))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this port can use it "
                       "(pass --api-key or set MINIINFER_API_KEY)", host)
    logger.info("MiniInfer %s listening on http://%s:%d (API key %s); loading the model in the background",
                _version(), host, port, "required" if api_key else "not required")
    config = uvicorn_config(app, host, port, max_header_bytes=max_header_bytes)
    _draining_server_cls()(config, app, shutdown_grace_s).run()
