"""OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of :class:`AsyncEngine`.

Endpoints: ``POST /v1/chat/completions`` (``serving_chat``), ``POST /v1/completions``
(``serving_completion``), and here ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus), ``GET /version``, ``GET /api/stats`` (dashboard JSON) and ``GET /`` (chat
playground + live dashboard). ``middleware.GuardMiddleware`` checks the API key and the
body size first; ``serving`` holds the request lifecycle both generation routes share.

The socket comes up at once; the model loads in the engine thread meanwhile
(``/health`` answers 503 and ``/v1/*`` 503 until it is ready).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from miniinfer.server import serving_chat, serving_completion
from miniinfer.server.async_engine import AsyncEngine
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
    """200 once the model is loaded and the engine thread alive; 503 while loading or after a failure."""
    engine: AsyncEngine = request.app.state.engine
    if engine.healthy:
        return JSONResponse({"status": "ok"})
    if engine.state in ("created", "loading"):
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "unhealthy", "error": engine.error}, status_code=503)


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


def create_app(engine: AsyncEngine, *, api_key: str | None = None, max_n: int = 8,
               max_body_bytes: int = 1 << 20, served_model_name: str | None = None,
               device: str | None = None, start_engine: bool = True) -> FastAPI:
    """Build the FastAPI app around ``engine`` (started in the app's lifespan)."""
    metrics = ServerMetrics(engine, served_model_name or "miniinfer")
    engine.on_request_finished = metrics.observe_finished

    app = FastAPI(title="MiniInfer", version=_version(), lifespan=_lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.serving = OpenAIServing(engine, max_n=max_n, served_model_name=served_model_name)
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
