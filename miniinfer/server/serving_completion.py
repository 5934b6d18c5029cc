"""``POST /v1/completions``: text (or token-id) prompts in, continuations out (JSON or SSE).

Several prompts in one request become one engine request each; their choices are numbered
``prompt_index * n + choice_index``. ``echo`` prepends a text prompt to its choices.
"""
from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from miniinfer.outputs import CompletionOutput
from miniinfer.server.protocol import (
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, CompletionStreamResponse, invalid,
    openapi_request_body,
)
from miniinfer.server.serving import (
    ChoiceState, Generation, OpenAIServing, clamp_logprob, ranked, token_bytes, token_key,
)

router = APIRouter()


def completion_logprobs(token_ids: list[int], logprobs: list[dict], top_n: int,
                        st: ChoiceState) -> CompletionLogprobs:
    """Completion-shaped logprobs of ``token_ids``. ``text_offset`` indexes the returned text:
    a token starts after every character its predecessors' bytes completed (``st`` carries
    the offset and the bytes of an unfinished character across stream chunks). Top-logprob
    keys never collide (``token_key``)."""
    out = CompletionLogprobs()
    for tid, d in zip(token_ids, logprobs):
        lp = d.get(tid)
        if lp is None:
            continue
        key = token_key(lp, tid)
        out.tokens.append(key)
        out.token_logprobs.append(clamp_logprob(lp.logprob))
        top: dict[str, float] = {}
        for k, v in ranked(d, top_n):
            name = token_key(v, k)
            top[name if name not in top else f"token_id:{k}"] = clamp_logprob(v.logprob)
        top.setdefault(key, clamp_logprob(lp.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(st.offset)
        st.offset += len(st.utf8.decode(token_bytes(lp, tid)))
    return out


class CompletionGeneration(Generation):
    """One completion request: ``n`` choices for each prompt; ``prefix[i]`` is prompt i's echo."""

    chunk_cls = CompletionStreamResponse
    response_cls = CompletionResponse

    def __init__(self, *args: Any, prefix: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefix = prefix

    def head(self) -> list[Any]:
        return [CompletionChoice(index=i * self.n + j, text=pre)
                for i, pre in enumerate(self.prefix) if pre for j in range(self.n)]

    def start_offset(self, i: int) -> int:
        return len(self.prefix[i])

    def delta_choice(self, index: int, c: CompletionOutput, text: str, ids: list[int],
                     lps: list | None, st: ChoiceState) -> CompletionChoice:
        choice = CompletionChoice(index=index, text=text, finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        if lps:
            choice.logprobs = completion_logprobs(ids, lps, self.top_n, st)
        return choice

    def final_choice(self, i: int, index: int, c: CompletionOutput) -> CompletionChoice:
        choice = CompletionChoice(index=index, text=self.prefix[i] + c.text,
                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        if self.want_logprobs and c.logprobs is not None:
            choice.logprobs = completion_logprobs(c.token_ids, c.logprobs, self.top_n, ChoiceState(len(self.prefix[i])))
        return choice


@router.post("/v1/completions", openapi_extra=openapi_request_body(
    CompletionRequest, example={"prompt": "Once upon a time", "max_tokens": 16}))
async def create_completion(request: Request) -> Response:
    """Generate ``n`` continuations of each prompt."""
    serving: OpenAIServing = request.app.state.serving
    req: CompletionRequest = await serving.parse(request, CompletionRequest)
    params = req.to_sampling_params(serving.max_n, serving.engine.max_model_len)
    prompts = req.prompts()
    if req.echo and any(not isinstance(p, str) for p in prompts):
        raise invalid("echo is only supported for text prompts", "echo")
    base_id = f"cmpl-{uuid.uuid4().hex}"
    ids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
    streams = await serving.add_all(list(zip(ids, prompts)), params)
    prefix = [p if (req.echo and isinstance(p, str)) else "" for p in prompts]
    gen = CompletionGeneration(serving, base_id, streams, params.n, want_logprobs=req.logprobs is not None,
                               top_n=req.logprobs or 0, include_usage=req.include_usage(), prefix=prefix)
    return await gen.respond(request, bool(req.stream))
