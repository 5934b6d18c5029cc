"""Input processing: chat templates, tokenization and every check a request must pass
before anything is queued. Used by the offline API (through ``LLMEngine.add_request``) and
by the HTTP server (``server/async_engine.py``), so validation exists once.

Two context policies, as the two front ends document them:

* offline (vLLM's ``LLM``): ``max_tokens`` longer than the room left is cut by the context
  (finish reason ``length``);
* ``openai=True`` (the server): ``max_tokens`` must fit the context (a 400 naming
  ``max_tokens``), and an unset ``max_tokens`` becomes "the rest of the context".

Errors are ``InvalidPromptError`` (a ``ValueError`` whose ``param`` names the request field).
"""
from __future__ import annotations

import dataclasses

from miniinfer.errors import InvalidRequestError
from miniinfer.sampling_params import SamplingParams


InvalidPromptError = InvalidRequestError  # the server's historical name


@dataclasses.dataclass(frozen=True)
class InputLimits:
    vocab_size: int  # the model's (embedding rows)
    max_model_len: int  # from the KV-cache layout
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    max_logprobs: int


class InputProcessor:
    def __init__(self, tokenizer, limits: InputLimits):
        self.tokenizer = tokenizer  # None: token-id prompts only
        self.limits = limits

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            tools: list[dict] | None = None,
                            chat_template_kwargs: dict | None = None) -> str:
        """Raises ``ValueError`` without a tokenizer or chat template, or for bad messages.
        ``tools`` / ``chat_template_kwargs`` go to the template (default: those a
        ``tokenizer.ChatMessages`` carries)."""
        if self.tokenizer is None:
            raise ValueError("model has no tokenizer: chat needs one")
        from miniinfer.tokenizer import apply_chat_template
        return apply_chat_template(self.tokenizer, messages, add_generation_prompt,
                                   tools=tools, chat_template_kwargs=chat_template_kwargs)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidPromptError("prompt: model has no tokenizer; pass token ids", "prompt")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return list(prompt)

    def process(self, prompt: str | list[int], params: SamplingParams,
                field: str = "prompt", openai: bool = False) -> tuple[list[int], SamplingParams]:
        """Tokenize and validate; returns the prompt ids and the (possibly completed) params.

        ``field`` names the request field the prompt came from (``messages`` for a rendered
        chat). Raises ``ValueError`` / ``InvalidPromptError`` naming what is wrong."""
        params.validate()  # fields may have changed since construction
        lim = self.limits
        if isinstance(prompt, str) and not prompt and not openai:
            raise InvalidPromptError("prompt must not be empty", field)
        if openai and not isinstance(prompt, str):
            prompt = [int(t) for t in prompt]
            self._check_ids(prompt, self._openai_vocab(), f"prompt token ids must be in [0, {self._openai_vocab()})")
        ids = self.tokenize(prompt)
        if not ids:
            raise InvalidPromptError(f"the {field} is empty after tokenization" if openai
                                     else "prompt must not be empty", field)
        self._check_ids(ids, lim.vocab_size, f"prompt token ids must be integers in [0, {lim.vocab_size})")
        if openai:
            params = self._fit_openai_context(len(ids), params, field)
        elif len(ids) >= lim.max_model_len:
            raise InvalidPromptError(f"prompt is {len(ids)} tokens long, but max_model_len is {lim.max_model_len} "
                                     f"(the prompt must leave room for at least one generated token)", field)
        if not lim.enable_chunked_prefill and len(ids) > lim.max_num_batched_tokens:
            raise InvalidPromptError(f"prompt is {len(ids)} tokens long, but max_num_batched_tokens is "
                                     f"{lim.max_num_batched_tokens} and chunked prefill is disabled", field)
        if params.logprobs is not None and params.logprobs > lim.max_logprobs:
            raise InvalidPromptError(f"logprobs must be <= {lim.max_logprobs}, got {params.logprobs}", "logprobs")
        if params.structured_outputs is not None and params.min_tokens:
            raise InvalidPromptError("min_tokens cannot be combined with structured_outputs: the grammar decides "
                                     "where the output ends", "min_tokens")
        if params.logit_bias:
            self._check_ids(list(params.logit_bias), lim.vocab_size,
                            f"logit_bias token ids must be in [0, {lim.vocab_size})", "logit_bias")
        return ids, params

    @staticmethod
    def _check_ids(ids: list, limit: int, message: str, param: str = "prompt") -> None:
        bad = next((t for t in ids if not isinstance(t, int) or t < 0 or t >= limit), None)
        if bad is not None:
            raise InvalidPromptError(f"{message}, got {bad!r}", param)

    def _openai_vocab(self) -> int:
        """Largest valid token id + 1 for the server: the smaller of tokenizer and model vocabularies."""
        if self.tokenizer is None:
            return self.limits.vocab_size
        return min(self.limits.vocab_size, len(self.tokenizer))

    def _fit_openai_context(self, n: int, params: SamplingParams, field: str) -> SamplingParams:
        max_len = self.limits.max_model_len
        if n >= max_len:
            raise InvalidPromptError(
                f"This model's maximum context length is {max_len} tokens. However, your {field} "
                f"has {n} tokens, which leaves no room for the completion. Please shorten it.", field)
        room = max_len - n
        if params.max_tokens is None:
            if params.min_tokens > room:
                raise InvalidPromptError(
                    f"min_tokens ({params.min_tokens}) exceeds the remaining context: the model's "
                    f"maximum context length is {max_len} tokens and the {field} has {n}", "min_tokens")
            return dataclasses.replace(params, max_tokens=room)
        if params.max_tokens > room:
            raise InvalidPromptError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the {field}, {params.max_tokens} for the "
                f"completion). Please reduce the length of the {field} or max_tokens.", "max_tokens")
        return params
