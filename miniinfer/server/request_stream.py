"""What the event loop side of the server holds per request: :class:`RequestStream` (an async
iterator over one request's cumulative outputs), the prompt types, and the errors a stream can
end with. The engine thread posts to streams; it never touches them otherwise."""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Optional, Union

from miniinfer.outputs import CompletionOutput, RequestOutput
from miniinfer.tokenizer import ChatMessages


class EngineDeadError(RuntimeError):
    """The engine thread crashed (or failed to load); in-flight requests cannot finish."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (``RequestOutput.error``); the engine goes on."""


class EngineCrashedError(RequestFailedError):
    """The engine raised while this request was in flight; the engine recovered (or is being
    rebuilt) and serves new requests, but this request is lost."""


class RequestTimeoutError(RuntimeError):
    """The request ran past its deadline (the server's ``request_timeout_s``) and was aborted."""


class ServerDrainingError(RuntimeError):
    """The server is shutting down and aborted this request after the grace period."""


class EngineNotReadyError(RuntimeError):
    """The engine is still loading."""


@dataclasses.dataclass
class ChatPrompt:
    """Chat messages; the engine thread renders them with the chat template. ``tools`` and
    ``chat_template_kwargs`` go to the template too: they ride on ``messages`` (a
    ``tokenizer.ChatMessages``), which is all the engine's ``apply_chat_template`` receives."""

    messages: list[dict]
    tools: Optional[list[dict]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        if self.tools is not None or self.chat_template_kwargs is not None:
            self.messages = ChatMessages(self.messages, self.tools, self.chat_template_kwargs)


Prompt = Union[str, list[int], ChatPrompt]

class RequestStream:
    """Async iterator over one request's (cumulative) outputs. Lives on the event loop."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.prompt_token_ids: list[int] = []
        self.finished = False  # the engine reported the final output
        self.aborted = False
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._added: asyncio.Future = self._loop.create_future()
        self.deadline: float | None = None  # event-loop time; past it, iteration raises RequestTimeoutError

    # called on the event loop
    def _put(self, out: RequestOutput) -> None:
        self._latest = out
        if out.finished:
            self.finished = True
        self._event.set()

    def _fail(self, exc: BaseException) -> None:
        if not self._added.done():
            self._added.set_exception(exc)
            self._added.exception()  # mark retrieved
        self._error = exc
        self._event.set()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._latest is not None:
                out, self._latest = self._latest, None
                return out
            if self._error is not None:
                raise self._error
            if self.finished or self.aborted:
                raise StopAsyncIteration
            self._event.clear()
            if self.deadline is None:
                await self._event.wait()
                continue
            remaining = self.deadline - self._loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(self._event.wait(), remaining)
            except asyncio.TimeoutError:
                raise RequestTimeoutError("the request ran past the server's time limit and was aborted") from None


def snapshot(out: RequestOutput) -> RequestOutput:
    """Copy the mutable parts so the engine may keep mutating its own objects."""
    return RequestOutput(
        request_id=out.request_id,
        prompt=out.prompt,
        prompt_token_ids=out.prompt_token_ids,
        outputs=[CompletionOutput(
            index=c.index, text=c.text, token_ids=list(c.token_ids),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            logprobs=list(c.logprobs) if c.logprobs is not None else None,
        ) for c in out.outputs],
        finished=out.finished,
        num_cached_tokens=out.num_cached_tokens,
        metrics=dict(out.metrics or {}),
        error=out.error,
    )
