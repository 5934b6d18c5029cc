"""What a data-parallel router in front of several ``miniinfer serve`` replicas needs from each.

The router is ``vllm-router`` (PyPI, a Rust binary behind a Python launcher; docs/DEPLOYMENT.md
has the recipe). Of a worker it uses ``GET /health`` (startup wait and periodic checks: 200 is
healthy, 503 while loading / draining) and proxies ``/v1/chat/completions``, ``/v1/completions``
and ``/v1/models`` — all served by ``api_server`` already. Its ``power_of_two`` policy also polls
``GET /get_load`` (``{"load": <int>}``), served here.

One thing does not fit: the router re-serializes each generation body through its own request
type and adds SGLang-style fields with their default values (``no_stop_trim: false``,
``separate_reasoning: true``, ...). This server answers an unknown field with a 400
(``protocol.RequestModel``), so :class:`RouterFieldsMiddleware` drops those fields *when they
carry the router's default value* (a no-op here too); any other value still reaches the
parser and is refused, naming the field.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from miniinfer.server.middleware import replaying

# fields the router adds to every generation body, with the value it adds; none changes what
# this server generates when it has that value
ROUTER_DEFAULT_FIELDS: dict[str, Any] = {
    "no_stop_trim": False,
    "continue_final_message": False,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
    "include_reasoning": True,
}
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_MARKERS = tuple(f'"{k}"'.encode() for k in ROUTER_DEFAULT_FIELDS)


router = APIRouter()


@router.get("/get_load", include_in_schema=False)  # the router's probe, not part of the documented API
async def get_load(request: Request) -> JSONResponse:
    """The requests this server holds (queued, running, or finishing their response): the load
    ``vllm-router --policy power_of_two`` compares between two replicas."""
    return JSONResponse({"load": request.app.state.engine.num_active_streams})


def strip_router_defaults(body: bytes) -> bytes:
    """``body`` without the router-added fields that hold the router's default value; the
    bytes unchanged when it has none of them or is not a JSON object (the parser's 400s stay)."""
    if not any(m in body for m in _MARKERS):
        return body
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body
    if not isinstance(data, dict):
        return body
    dropped = False
    for key, default in ROUTER_DEFAULT_FIELDS.items():
        if key in data and data[key] is default:  # `is`: 0 / 1 are not false / true
            del data[key]
            dropped = True
    return json.dumps(data).encode() if dropped else body


class RouterFieldsMiddleware:
    """ASGI: applies :func:`strip_router_defaults` to the body of ``POST`` generation requests
    (installed inside ``GuardMiddleware``, so after its API-key and size checks)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        while True:  # GuardMiddleware has bounded the size already
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        raw = b"".join(chunks)
        body = strip_router_defaults(raw)
        if body is not raw:
            headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-length"]
            scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}
        await self.app(scope, replaying(body, receive), send)


def install(app: FastAPI) -> None:
    """Register the router support on ``app`` (call before adding ``GuardMiddleware``)."""
    app.include_router(router)
    app.add_middleware(RouterFieldsMiddleware)
