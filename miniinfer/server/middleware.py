"""ASGI guard in front of the app: API-key check for ``/v1/*`` and the request body size limit."""
from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from typing import Any

from miniinfer.server.protocol import APIError


def _error_bytes(status: int, message: str, param: str | None = None) -> bytes:
    return json.dumps(APIError(status, message, param).body()).encode()


class GuardMiddleware:
    """API-key check for ``/v1/*`` and request body size limit, before any parsing.

    The body is read here (up to the limit) and replayed to the app, so an oversized
    chunked upload is refused as soon as it crosses the limit.
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        # the key is compared as a SHA-256 digest, in constant time: neither its bytes nor its
        # length leak through the response time
        self._key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else b""
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
                    given = hashlib.sha256(value[7:].strip().encode("latin-1")).digest()
                    return secrets.compare_digest(given, self._key_digest)
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
        await self.app(scope, replaying(body, receive), send)


def replaying(body: bytes, receive):
    """An ASGI ``receive`` that first returns ``body`` as the whole request (already read by a
    middleware), then defers to the original ``receive`` (disconnects)."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay
