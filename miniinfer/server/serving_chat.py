"""``POST /v1/chat/completions``: chat messages in, assistant messages out (JSON or SSE)."""
from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from miniinfer.outputs import CompletionOutput
from miniinfer.server.async_engine import ChatPrompt
from miniinfer.server.chat_output import ChatOutputParser, parse_whole
from miniinfer.server.reasoning_parser import thinking_disabled
from miniinfer.server.protocol import (
    ChatChoiceLogprobs, ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse,
    ChatCompletionStreamChoice, ChatCompletionStreamResponse, ChatLogprobToken, ChatResponseMessage,
    DeltaMessage, TopLogprob, openapi_request_body,
)
from miniinfer.server.serving import (
    ChoiceState, Generation, OpenAIServing, clamp_logprob, ranked, token_bytes, token_str,
)

router = APIRouter()


def chat_logprobs(token_ids: list[int], logprobs: list[dict], top_n: int) -> ChatChoiceLogprobs:
    """Chat-shaped logprobs of ``token_ids``: per token its logprob, bytes and ``top_n`` alternatives."""
    content = []
    for tid, d in zip(token_ids, logprobs):
        lp = d.get(tid)
        if lp is None:  # should not happen (the sampled token is always a key)
            continue
        tok = token_str(lp, tid)
        tops = [TopLogprob(token=token_str(v, k), logprob=clamp_logprob(v.logprob),
                           bytes=list(token_bytes(v, k))) for k, v in ranked(d, top_n)]
        content.append(ChatLogprobToken(token=tok, logprob=clamp_logprob(lp.logprob),
                                        bytes=list(token_bytes(lp, tid)), top_logprobs=tops))
    return ChatChoiceLogprobs(content=content)


def reasoning_parser_of(serving: OpenAIServing) -> str | None:
    """The engine's ``config.reasoning_parser`` (``--reasoning-parser``), if any."""
    engine = getattr(serving.engine, "_engine", None)
    parser = getattr(getattr(engine, "config", None), "reasoning_parser", None)
    return parser if isinstance(parser, str) else None


class ChatGeneration(Generation):
    """One chat request: ``n`` choices of one conversation; each choice's text goes through a
    :class:`ChatOutputParser` (reasoning split, tool calls) when one is active."""

    chunk_cls = ChatCompletionStreamResponse
    response_cls = ChatCompletionResponse

    def __init__(self, *args: Any, tool_mode: tuple[str, str | None] = ("none", None),
                 reasoning_parser: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_mode = tool_mode
        self.reasoning_parser = reasoning_parser
        self._parsers: dict[int, ChatOutputParser] = {}

    def parser(self, index: int) -> ChatOutputParser:
        """The parser of choice ``index`` (made on first use)."""
        if index not in self._parsers:
            self._parsers[index] = ChatOutputParser(*self.tool_mode, reasoning_parser=self.reasoning_parser)
        return self._parsers[index]

    def head(self) -> list[Any]:
        return [ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(self.n)]

    def delta_choice(self, index: int, c: CompletionOutput, text: str, ids: list[int],
                     lps: list | None, st: ChoiceState) -> list[ChatCompletionStreamChoice]:
        """The chunks' choices for new text: one per delta (a tool call's header and its
        arguments are separate deltas); logprobs ride on the first, the finish reason on the last."""
        parser = self.parser(index)
        if parser.active:
            deltas = parser.feed(text) if text else []
            if c.finish_reason:
                deltas += parser.finish()
        else:
            deltas = [DeltaMessage(content=text)] if text else []
        if not deltas and not c.finish_reason and not lps:
            return []
        choices = [ChatCompletionStreamChoice(index=index, delta=d) for d in deltas or [DeltaMessage()]]
        if lps:
            choices[0].logprobs = chat_logprobs(ids, lps, self.top_n)
        choices[-1].finish_reason = parser.finish_reason(c.finish_reason)
        choices[-1].stop_reason = c.stop_reason
        return choices

    def final_choice(self, i: int, index: int, c: CompletionOutput) -> ChatCompletionChoice:
        parser = self.parser(index)
        choice = ChatCompletionChoice(index=index, message=parse_whole(parser, c.text),
                                      finish_reason=parser.finish_reason(c.finish_reason), stop_reason=c.stop_reason)
        if self.want_logprobs and c.logprobs is not None:
            choice.logprobs = chat_logprobs(c.token_ids, c.logprobs, self.top_n)
        return choice


@router.post("/v1/chat/completions", openapi_extra=openapi_request_body(
    ChatCompletionRequest, example={"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}))
async def create_chat_completion(request: Request) -> Response:
    """Render the messages (and tools) with the chat template (in the engine thread) and
    generate ``n`` replies; tool calls and the reasoning are parsed out of the text."""
    serving: OpenAIServing = request.app.state.serving
    req: ChatCompletionRequest = await serving.parse(request, ChatCompletionRequest)
    params = req.to_sampling_params(serving.max_n, serving.engine.max_model_len)
    messages = req.to_messages()
    tools = req.tool_dicts()
    template_kwargs = req.template_kwargs()
    reasoning = None if thinking_disabled(template_kwargs) else reasoning_parser_of(serving)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    streams = await serving.add_all([(request_id, ChatPrompt(messages, tools, template_kwargs))], params)
    gen = ChatGeneration(serving, request_id, streams, params.n, want_logprobs=bool(req.logprobs),
                         top_n=req.top_logprobs or 0, include_usage=req.include_usage(),
                         tool_mode=req.tool_mode(), reasoning_parser=reasoning)
    return await gen.respond(request, bool(req.stream))
