"""The request lifecycle shared by ``/v1/chat/completions`` and ``/v1/completions``.

:class:`OpenAIServing` (one per app, ``app.state.serving``) does the steps before
generation: read and validate the body, check that the engine is ready and the model is
ours, and add the engine requests (one stream per prompt, each with ``n`` choices).

:class:`Generation` is one API request in flight. It merges its streams and either waits
for all of them (aborting them if the client disconnects) and answers one JSON response,
or streams the deltas as SSE chunks, then the usage chunk and ``[DONE]`` (aborting what is
unfinished when the stream ends early). Subclasses in ``serving_chat`` and
``serving_completion`` only shape the choices, chunks and responses.
"""
from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from miniinfer.outputs import CompletionOutput, RequestOutput
from miniinfer.sampling_params import SamplingParams
from miniinfer.server.async_engine import (
    AsyncEngine, EngineDeadError, EngineNotReadyError, Prompt, RequestFailedError, RequestStream,
    RequestTimeoutError, ServerDrainingError,
)
from miniinfer.server.protocol import (
    APIError, PromptTokensDetails, UsageInfo, invalid, parse_request,
)

LOADING = "the model is still loading; retry shortly"
ENGINE_FAILED = "the engine failed while serving this request: {}"
DRAINING = "the server is shutting down and no longer accepts requests"
TIMEOUT_STATUS = 504  # a request past the server's request_timeout_s (type "timeout", code "request_timeout")
MAX_MESSAGES = 1024  # messages per chat request


def engine_error(e: BaseException) -> APIError:
    """The API error of a request that failed in flight: 500 for an engine fault (the engine
    recovers and serves new requests), 504 for a request past the server's time limit, 503
    for one aborted by the shutdown drain."""
    if isinstance(e, RequestTimeoutError):
        return APIError(TIMEOUT_STATUS, str(e), type="timeout", code="request_timeout")
    if isinstance(e, ServerDrainingError):
        return APIError(503, str(e))
    return APIError(500, ENGINE_FAILED.format(e))


IN_FLIGHT_ERRORS = (EngineDeadError, RequestFailedError, RequestTimeoutError, ServerDrainingError)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = "data: [DONE]\n\n"


class OpenAIServing:
    """App-wide state of the generation routes and the steps before generation."""

    def __init__(self, engine: AsyncEngine, *, max_n: int, served_model_name: str | None,
                 request_timeout_s: float | None = None) -> None:
        self.engine = engine
        self.max_n = max_n
        self.served_model_name = served_model_name
        self.request_timeout_s = request_timeout_s  # None: no limit
        self.draining = False  # set by the shutdown drain: new requests get a 503

    def model_name(self) -> str:
        return self.served_model_name or self.engine.model_name or "miniinfer"

    def check_ready(self) -> None:
        if self.draining:
            raise APIError(503, DRAINING)
        if self.engine.state == "dead":
            raise APIError(503, f"the engine is not available: {self.engine.error}")
        if self.engine.state == "restarting":
            raise APIError(503, "the engine is being rebuilt after a fault; retry shortly")
        if not self.engine.ready:
            raise APIError(503, LOADING)

    def check_model(self, name: str | None) -> None:
        if name in (None, "", self.model_name(), self.engine.model_name):
            return
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    async def parse(self, request: Request, model_cls: type) -> Any:
        """The validated body; then 503 unless the engine is ready, 404 for another model."""
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise invalid(f"malformed JSON body: {e}") from None
        check_sizes(data)
        req = parse_request(model_cls, data)
        self.check_ready()
        self.check_model(req.model)
        return req

    async def add(self, request_id: str, prompt: Prompt, params: SamplingParams,
                  deadline: float | None = None) -> RequestStream:
        """Add one engine request; engine refusals become 400 / 500 / 503 / 504 API errors."""
        try:
            return await self.engine.add_request(request_id, prompt, params, deadline=deadline)
        except ValueError as e:  # InvalidRequestError names the field; others name none
            raise invalid(str(e), getattr(e, "param", None)) from None
        except EngineNotReadyError as e:
            raise APIError(503, LOADING if "loading" in str(e) else f"{e}; retry shortly") from None
        except EngineDeadError as e:
            raise APIError(503, f"the engine is not available: {e}") from None
        except (RequestFailedError, RequestTimeoutError, ServerDrainingError) as e:
            raise engine_error(e) from None

    async def add_all(self, prompts: list[tuple[str, Prompt]], params: SamplingParams) -> list[RequestStream]:
        """Add one engine request per ``(request_id, prompt)``; all or none. With a
        ``request_timeout_s``, all of them share one deadline, counted from now."""
        streams: list[RequestStream] = []
        deadline = None
        if self.request_timeout_s is not None:
            deadline = asyncio.get_running_loop().time() + self.request_timeout_s
        try:
            for request_id, prompt in prompts:
                streams.append(await self.add(request_id, prompt, params, deadline))
        except BaseException:
            self.abort_unfinished(streams)
            raise
        return streams

    def abort_unfinished(self, streams: list[RequestStream]) -> None:
        for s in streams:
            if not s.finished:
                self.engine.abort(s.request_id)


# --------------------------------------------------------------------------- helpers

def check_sizes(data: Any) -> None:
    """Bounds checked on the decoded body before the pydantic models see it (the other bounds
    are ``protocol.py``'s: n, max_tokens, stop, logprobs, logit_bias, prompts)."""
    if not isinstance(data, dict):
        return
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
        raise invalid(f"messages may hold at most {MAX_MESSAGES} messages, got {len(messages)}", "messages")


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator (so aborts run at once)."""

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def sse(obj: Any) -> str:
    """One SSE event: a pydantic model (``None`` fields left out) or a JSON-able object."""
    if hasattr(obj, "model_dump_json"):
        return f"data: {obj.model_dump_json(exclude_none=True)}\n\n"
    return f"data: {json.dumps(obj)}\n\n"


def ranked(d: dict, top_n: int) -> list:
    """The ``top_n`` best ``(token_id, Logprob)`` of one position, best first."""
    items = sorted(d.items(), key=lambda kv: kv[1].rank)
    return [(tid, lp) for tid, lp in items if lp.rank <= top_n][:top_n]


def token_str(lp: Any, tid: int) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"<token_{tid}>"


def token_bytes(lp: Any, tid: int) -> bytes:
    """The token's real bytes (``Logprob.token_bytes``; the decoded text's without a tokenizer)."""
    b = getattr(lp, "token_bytes", None)
    return b if b is not None else token_str(lp, tid).encode("utf-8")


def token_key(lp: Any, tid: int) -> str:
    """A text key for the completions ``top_logprobs`` dict that no other candidate shares: the
    decoded token, or ``bytes:\\xNN...`` when it is a fragment of a character (which decodes
    to U+FFFD alone, like every other fragment)."""
    text = token_str(lp, tid)
    if "\ufffd" in text and getattr(lp, "token_bytes", None):
        return "bytes:" + "".join(f"\\x{b:02x}" for b in lp.token_bytes)
    return text


def clamp_logprob(value: float) -> float:
    return max(value, -9999.0)  # -inf is not valid JSON


def usage(outs: list[RequestOutput | None], prompt_lens: list[int]) -> UsageInfo:
    p = sum(prompt_lens)
    c = sum(len(co.token_ids) for o in outs if o is not None for co in o.outputs)
    cached = sum(o.num_cached_tokens or 0 for o in outs if o is not None)
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class ChoiceState:
    """What of one choice was already streamed: text, tokens, finished, text offset."""

    __slots__ = ("text_len", "ntok", "done", "offset", "utf8")

    def __init__(self, offset: int = 0) -> None:
        self.text_len = 0
        self.ntok = 0
        self.done = False
        self.offset = offset  # text offset of the next token (characters, into the returned text)
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # the tokens' bytes so far

    def advance(self, c: CompletionOutput) -> tuple[str, list[int], list | None]:
        """The new text, token ids and logprobs of ``c`` since the last call."""
        text = c.text[self.text_len:]
        ids = c.token_ids[self.ntok:]
        lps = c.logprobs[self.ntok:] if c.logprobs is not None else None
        self.text_len = len(c.text)
        self.ntok = len(c.token_ids)
        return text, ids, lps


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
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


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


# --------------------------------------------------------------------------- one request

class Generation:
    """One API request in flight: ``n`` choices for each of its engine streams.

    Choice ``j`` of stream ``i`` has the API index ``i * n + j``. Subclasses set the
    response models and shape the choices.
    """

    chunk_cls: ClassVar[type[BaseModel]]  # the SSE chunk model
    response_cls: ClassVar[type[BaseModel]]  # the non-streaming response model

    def __init__(self, serving: OpenAIServing, request_id: str, streams: list[RequestStream], n: int, *,
                 want_logprobs: bool, top_n: int, include_usage: bool) -> None:
        self.serving = serving
        self.request_id = request_id
        self.streams = streams
        self.n = n
        self.want_logprobs = want_logprobs
        self.top_n = top_n
        self.include_usage = include_usage
        self.model = serving.model_name()
        self.created = int(time.time())

    # ------------------------------------------------------------------ shaped by subclasses
    def head(self) -> list[Any]:
        """Choices streamed (one per chunk) before any generated text."""
        return []

    def start_offset(self, i: int) -> int:
        """Text offset of the first generated character of stream ``i`` (logprobs)."""
        return 0

    def delta_choice(self, index: int, c: CompletionOutput, text: str, ids: list[int],
                     lps: list | None, st: ChoiceState) -> Any:
        """The streamed choice for new ``text`` / ``ids`` (``lps``: their logprobs, if wanted),
        or a list of choices, one chunk each (an empty list: nothing to send yet)."""
        raise NotImplementedError

    def final_choice(self, i: int, index: int, c: CompletionOutput) -> Any:
        """The choice of the non-streaming response for output ``c`` of stream ``i``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ lifecycle
    async def respond(self, request: Request, stream: bool) -> Response:
        """An SSE response when ``stream``; else wait for every choice and answer one JSON body."""
        if stream:
            return SSEResponse(self._events(), media_type="text/event-stream", headers=SSE_HEADERS)
        finals = await self._collect(request)
        choices = [self.final_choice(i, i * self.n + c.index, c)
                   for i, final in enumerate(finals) for c in final.outputs]
        resp = self.response_cls(id=self.request_id, created=self.created, model=self.model,
                                 choices=choices, usage=self._usage(finals))
        return Response(resp.model_dump_json(), media_type="application/json")

    def _usage(self, outs: list[RequestOutput | None]) -> UsageInfo:
        return usage(outs, [len(s.prompt_token_ids) for s in self.streams])

    def _chunk(self, choices: list[Any], usage: UsageInfo | None = None) -> str:
        return sse(self.chunk_cls(id=self.request_id, created=self.created, model=self.model,
                                  choices=choices, usage=usage))

    async def _collect(self, request: Request) -> list[RequestOutput]:
        """Wait for all streams to finish; abort them if the client goes away."""
        async def consume() -> list[RequestOutput]:
            finals: list[RequestOutput | None] = [None] * len(self.streams)
            async for i, out in merge_streams(self.streams):
                finals[i] = out
            return finals  # type: ignore[return-value]

        work = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                for s in self.streams:
                    self.serving.engine.abort(s.request_id)
        if not work.done() or work.cancelled():
            raise APIError(499, "client disconnected")
        try:
            return work.result()
        except IN_FLIGHT_ERRORS as e:
            self.serving.abort_unfinished(self.streams)  # a timed-out request still holds KV blocks
            raise engine_error(e) from None

    async def _events(self) -> AsyncIterator[str]:
        """The SSE body: head chunks, one chunk per choice delta, usage, ``[DONE]``."""
        states = [[ChoiceState(self.start_offset(i)) for _ in range(self.n)] for i in range(len(self.streams))]
        lasts: list[RequestOutput | None] = [None] * len(self.streams)
        try:
            for choice in self.head():
                yield self._chunk([choice])
            async for i, out in merge_streams(self.streams):
                lasts[i] = out
                for c in out.outputs:
                    st = states[i][c.index]
                    if st.done:
                        continue
                    text, ids, lps = st.advance(c)
                    lps = lps if self.want_logprobs else None
                    if not text and not c.finish_reason and not lps:
                        continue
                    choice = self.delta_choice(i * self.n + c.index, c, text, ids, lps, st)
                    if c.finish_reason:
                        st.done = True
                    for one in choice if isinstance(choice, list) else [choice]:  # a list: one chunk each
                        yield self._chunk([one])
            if self.include_usage:
                yield self._chunk([], usage=self._usage(lasts))
            yield SSE_DONE
        except IN_FLIGHT_ERRORS as e:
            self.serving.abort_unfinished(self.streams)
            yield sse(engine_error(e).body())
            yield SSE_DONE
        finally:
            self.serving.abort_unfinished(self.streams)
