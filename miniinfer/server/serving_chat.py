"""``POST /v1/chat/completions``: chat messages in, assistant messages out (JSON or SSE)."""
from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from miniinfer.outputs import CompletionOutput
from miniinfer.server.async_engine import ChatPrompt
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


class ChatGeneration(Generation):
    """One chat request: ``n`` choices of one conversation."""

    chunk_cls = ChatCompletionStreamResponse
    response_cls = ChatCompletionResponse

    def head(self) -> list[Any]:
        return [ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(self.n)]

    def delta_choice(self, index: int, c: CompletionOutput, text: str, ids: list[int],
                     lps: list | None, st: ChoiceState) -> ChatCompletionStreamChoice:
        choice = ChatCompletionStreamChoice(index=index, delta=DeltaMessage(content=text) if text else DeltaMessage(),
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        if lps:
            choice.logprobs = chat_logprobs(ids, lps, self.top_n)
        return choice

    def final_choice(self, i: int, index: int, c: CompletionOutput) -> ChatCompletionChoice:
        choice = ChatCompletionChoice(index=index, message=ChatResponseMessage(content=c.text),
                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        if self.want_logprobs and c.logprobs is not None:
            choice.logprobs = chat_logprobs(c.token_ids, c.logprobs, self.top_n)
        return choice


@router.post("/v1/chat/completions", openapi_extra=openapi_request_body(
    ChatCompletionRequest, example={"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}))
async def create_chat_completion(request: Request) -> Response:
    """Render the messages with the chat template (in the engine thread) and generate ``n`` replies."""
    serving: OpenAIServing = request.app.state.serving
    req: ChatCompletionRequest = await serving.parse(request, ChatCompletionRequest)
    params = req.to_sampling_params(serving.max_n, serving.engine.max_model_len)
    messages = req.to_messages()
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    streams = await serving.add_all([(request_id, ChatPrompt(messages))], params)
    gen = ChatGeneration(serving, request_id, streams, params.n, want_logprobs=bool(req.logprobs),
                         top_n=req.top_logprobs or 0, include_usage=req.include_usage())
    return await gen.respond(request, bool(req.stream))
