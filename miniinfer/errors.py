"""Errors a request can cause, shared by the offline API and the server."""
from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine cannot accept. ``param`` names the request field to blame (the
    OpenAI error's ``param``); never a word taken from another exception's message."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
