"""OpenAI-compatible request / response models (pydantic v2); errors in ``api_errors.py``.

Requests are validated in two stages:

1. pydantic checks types and the fixed ranges (``Field`` bounds: ``temperature``, ``top_p``,
   ``n``, logprobs); a failure becomes a 400 whose ``param`` is the offending field's path;
2. ``to_sampling_params`` checks the rest (server limits, ``max_tokens``, ``stop``, ...) and
   builds the engine's ``SamplingParams``; a failure raises :class:`APIError` (400) naming the field.

Limits that need the prompt's token count (prompt vs. context length, ``max_tokens``
vs. the remaining context) are checked later, after tokenization, in the engine thread.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import ConfigDict, Field, ValidationError

from miniinfer.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams
from miniinfer.server.api_errors import APIError, invalid, validation_error_to_api_error  # noqa: F401
from miniinfer.server.openapi import openapi_request_body  # noqa: F401
from miniinfer.server.protocol_tools import (  # noqa: F401  (re-exported)
    MAX_TEMPLATE_KWARGS, MAX_TOOLS, ChatTool, MessageToolCall, NamedToolChoice, call_dict,
    check_template_kwargs, resolve_tool_choice, validate_tools,
)
from miniinfer.server.tool_parsers import function_parameters, required_calls_schema
from miniinfer.server.responses import (  # noqa: F401  (re-exported)
    OpenAIBaseModel, TopLogprob, ChatLogprobToken, ChatChoiceLogprobs, ChatResponseMessage,
    PromptTokensDetails, UsageInfo, ChatCompletionChoice, ChatCompletionResponse, DeltaMessage,
    ChatCompletionStreamChoice, ChatCompletionStreamResponse, CompletionLogprobs, CompletionChoice,
    CompletionResponse, CompletionStreamResponse, ModelCard, ModelList,
)


# --------------------------------------------------------------------------- base

class RequestModel(OpenAIBaseModel):
    """Request bodies: a field this server does not know is a 400 naming it, never ignored."""
    model_config = ConfigDict(extra="forbid")


def _doc(**schema: Any) -> Any:
    """Schema-only keywords for a field (the OpenAPI document): parsing and error messages
    stay those of the type and of ``to_sampling_params`` / the engine's input checks."""
    return Field(None, json_schema_extra=schema)


class StreamOptions(RequestModel):
    include_usage: Optional[bool] = False


class JSONSchemaFormat(RequestModel):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(RequestModel):
    type: str = Field(json_schema_extra={"enum": ["text", "json_object", "json_schema"]})
    json_schema: Optional[JSONSchemaFormat] = None


class StructuredOutputsBody(RequestModel):
    """vLLM's ``structured_outputs`` body field: exactly one of these."""
    json_: Optional[Union[dict, str]] = Field(None, alias="json")
    json_object: Optional[bool] = None
    regex: Optional[str] = None
    grammar: Optional[str] = None
    choice: Optional[list[str]] = None


MAX_LOGIT_BIAS = 300  # entries; OpenAI's limit
MAX_STOP_STRINGS = 32  # stop strings per request
MAX_TOP_K = 2 ** 31 - 1  # larger top_k: disabled (every vocabulary is smaller)
MAX_STOP_LEN = 256  # characters per stop string (the stop checker holds back that much text)


class _SamplingFields(RequestModel):
    """Fields shared by chat and text completions (OpenAI + vLLM extras)."""

    model: Optional[str] = None
    max_tokens: Optional[int] = _doc(minimum=1)
    temperature: Optional[float] = Field(None, ge=0, le=100)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(1, ge=1)
    stop: Optional[Union[str, list[str]]] = _doc(anyOf=[
        {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LEN},
        {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LEN}, "maxItems": MAX_STOP_STRINGS},
        {"type": "null"}])
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(0.0, json_schema_extra={"minimum": -2, "maximum": 2})
    frequency_penalty: Optional[float] = Field(0.0, json_schema_extra={"minimum": -2, "maximum": 2})
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM-style extras
    top_k: Optional[int] = None
    min_p: Optional[float] = _doc(minimum=0, maximum=1)
    repetition_penalty: Optional[float] = _doc(exclusiveMinimum=0)
    ignore_eos: Optional[bool] = False
    min_tokens: Optional[int] = Field(0, json_schema_extra={"minimum": 0})
    skip_special_tokens: Optional[bool] = True
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: Optional[bool] = False
    logit_bias: Optional[dict[str, float]] = _doc(maxProperties=MAX_LOGIT_BIAS, propertyNames={"pattern": "^[0-9]+$"})
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsBody] = None
    guided_json: Optional[Union[dict, str]] = None  # the older vLLM names, still sent by many clients
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _num_logprobs(self) -> int | None:  # overridden
        return None

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """One constraint from ``response_format``, ``structured_outputs`` or a ``guided_*``
        field; more than one source is a 400 naming the second."""
        found: list[tuple[str, StructuredOutputsParams]] = []
        rf = self.response_format
        if rf is not None and rf.type != "text":
            if rf.type == "json_object":
                found.append(("response_format", StructuredOutputsParams(json_object=True)))
            elif rf.type == "json_schema" and rf.json_schema is not None and rf.json_schema.schema_ is not None:
                found.append(("response_format", StructuredOutputsParams(json=rf.json_schema.schema_)))
            else:
                raise invalid("response_format must be text, json_object, or json_schema with "
                              "json_schema.schema", "response_format")
        so = self.structured_outputs
        if so is not None:
            found.append(("structured_outputs", StructuredOutputsParams(
                json=so.json_, json_object=so.json_object, regex=so.regex, grammar=so.grammar, choice=so.choice)))
        for name, kw in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                         ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                found.append((name, StructuredOutputsParams(**{kw: getattr(self, name)})))
        if len(found) > 1:
            raise invalid(f"{found[1][0]}: only one structured-output constraint per request "
                          f"(also given: {found[0][0]})", found[1][0])
        return found[0][1] if found else None

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI sends token ids as JSON object keys (strings)."""
        if not self.logit_bias:
            return None
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise invalid(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}",
                          "logit_bias")
        try:
            return {int(k): v for k, v in self.logit_bias.items()}
        except ValueError:
            raise invalid("logit_bias keys must be token ids (integers)", "logit_bias") from None

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, max_n: int, max_model_len: int | None = None) -> SamplingParams:
        n = 1 if self.n is None else self.n
        if n > max_n:
            raise invalid(f"n must be <= {max_n} (the server's limit), got {n}", "n")
        max_tokens = self._max_tokens()
        if max_tokens is not None:
            if max_tokens < 1:
                raise invalid(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
            if max_model_len is not None and max_tokens > max_model_len:
                raise invalid(f"max_tokens must be <= the model's context length "
                              f"({max_model_len} tokens), got {max_tokens}", "max_tokens")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")
        top_k = -1 if self.top_k in (None, 0) else self.top_k
        if top_k > MAX_TOP_K:  # keeps every token of any vocabulary: the same as no top-k (and a
            top_k = -1         # value past int64 crashed the sampler's tensors: a 500 found by fuzzing)
        stop = self.stop
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise invalid(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
        for text in [stop] if isinstance(stop, str) else stop or []:
            if len(text) > MAX_STOP_LEN:
                raise invalid(f"each stop string may be at most {MAX_STOP_LEN} characters long, "
                              f"got one of {len(text)}", "stop")
        try:
            return SamplingParams(
                n=n,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=top_k,
                min_p=0.0 if self.min_p is None else self.min_p,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                seed=self.seed,
                max_tokens=max_tokens,  # None: filled with the remaining context after tokenizing
                min_tokens=self.min_tokens or 0,
                stop=stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=bool(self.ignore_eos),
                logprobs=self._num_logprobs(),
                skip_special_tokens=True if self.skip_special_tokens is None else self.skip_special_tokens,
                include_stop_str_in_output=bool(self.include_stop_str_in_output),
                logit_bias=self._logit_bias(),
                structured_outputs=self._structured_outputs(),
            )
        except (ValueError, TypeError) as e:  # SamplingParams names the field in InvalidRequestError.param
            raise invalid(str(e), getattr(e, "param", None)) from None


# --------------------------------------------------------------------------- chat

class ChatContentPart(RequestModel):
    type: str = Field(json_schema_extra={"enum": ["text"]})  # other kinds: a 400 naming the message
    text: Optional[str] = None


class ChatMessage(RequestModel):
    role: str = Field(json_schema_extra={"enum": ["system", "developer", "user", "assistant", "tool"]})
    content: Optional[Union[str, list[ChatContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[MessageToolCall]] = None  # assistant messages
    tool_call_id: Optional[str] = None  # tool messages: the call they answer
    reasoning_content: Optional[str] = None  # assistant messages of reasoning models (Qwen3's template reads it)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[list[ChatTool]] = Field(None, json_schema_extra={"maxItems": MAX_TOOLS})
    tool_choice: Optional[Union[str, NamedToolChoice]] = None  # none | auto | required | a named function
    parallel_tool_calls: Optional[bool] = True
    chat_template_kwargs: Optional[dict[str, Any]] = _doc(maxProperties=MAX_TEMPLATE_KWARGS)

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _num_logprobs(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    # ------------------------------------------------------------------ tools
    def tool_dicts(self) -> list[dict] | None:
        """The tools as plain dicts (for the chat template), validated: 400s name the field."""
        return validate_tools(self.tools)

    def tool_mode(self) -> tuple[str, str | None]:
        """``(kind, function name)``: kind ``none`` | ``auto`` | ``required`` | ``named``."""
        return resolve_tool_choice(self.tool_choice, self.tools)

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """A forced tool call (``required`` / named) is a JSON schema on the output; it cannot
        be combined with another constraint."""
        user = super()._structured_outputs()
        tools = self.tool_dicts()
        kind, name = self.tool_mode()
        if kind not in ("required", "named"):
            return user
        if user is not None:
            rf = self.response_format
            other = "response_format" if rf is not None and rf.type != "text" else next(
                f for f in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
                if getattr(self, f) is not None)
            raise invalid(f"{other} cannot be combined with tool_choice {kind if kind == 'required' else name!r}: "
                          "the forced tool call already constrains the output", other)
        assert tools is not None
        if kind == "named":
            tool = next(t for t in tools if t["function"]["name"] == name)
            return StructuredOutputsParams(json=function_parameters(tool))
        return StructuredOutputsParams(json=required_calls_schema(tools, self.parallel_tool_calls is not False))

    def template_kwargs(self) -> dict[str, Any] | None:
        """``chat_template_kwargs``, checked (see ``protocol_tools.check_template_kwargs``)."""
        return check_template_kwargs(self.chat_template_kwargs)

    # ------------------------------------------------------------------ messages
    def to_messages(self) -> list[dict]:
        if not self.messages:
            raise invalid("messages must be a non-empty list", "messages")
        return [_message_dict(i, m) for i, m in enumerate(self.messages)]


def _message_dict(i: int, m: ChatMessage) -> dict:
    """One message as the chat template expects it (tool call arguments as dicts, like HF)."""
    role = "system" if m.role == "developer" else m.role
    content = m.content
    if content is None:
        content = ""
    elif isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise invalid(f"messages[{i}].content[{j}]: only text content parts are "
                              f"supported, got type {part.type!r}", f"messages.{i}.content")
            texts.append(part.text)
        content = "\n".join(texts)  # vLLM joins text parts with newlines
    out: dict[str, Any] = {"role": role, "content": content}
    if m.tool_calls:
        if role != "assistant":
            raise invalid(f"messages[{i}].tool_calls is only allowed in assistant messages", f"messages.{i}.tool_calls")
        out["tool_calls"] = [call_dict(c) for j, c in enumerate(m.tool_calls)]
    if role == "tool":
        if not m.tool_call_id:
            raise invalid(f"messages[{i}]: a tool message needs tool_call_id", f"messages.{i}.tool_call_id")
        out["tool_call_id"] = m.tool_call_id
        if m.name:
            out["name"] = m.name
    if m.reasoning_content is not None and role == "assistant":
        out["reasoning_content"] = m.reasoning_content
    return out


# --------------------------------------------------------------------------- completions

PromptType = Union[list[int], list[list[int]], str, list[str]]


MAX_PROMPTS = 256  # prompts per completions request
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


class CompletionRequest(_SamplingFields):
    prompt: PromptType = Field(json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_PROMPTS},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_PROMPTS}]})
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[bool] = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def _num_logprobs(self) -> int | None:
        return self.logprobs

    def to_sampling_params(self, max_n: int, max_model_len: int | None = None) -> SamplingParams:
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise invalid("best_of is not supported (it must equal n when given)", "best_of")
        if self.suffix:
            raise invalid("suffix is not supported", "suffix")
        if self.echo and self.logprobs is not None:
            raise invalid("echo together with logprobs is not supported (no prompt logprobs)", "echo")
        return super().to_sampling_params(max_n, max_model_len)

    def prompts(self) -> list[Union[str, list[int]]]:
        """Normalize ``prompt`` to a list of prompts (each a string or a token-id list)."""
        p = self.prompt
        if isinstance(p, str):
            items: list = [p]
        elif not p:
            raise invalid("prompt must not be empty", "prompt")
        elif isinstance(p[0], int):
            items = [list(p)]
        else:
            items = list(p)
        if len(items) > MAX_PROMPTS:
            raise invalid(f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", "prompt")
        for i, item in enumerate(items):
            if isinstance(item, str):
                if item == "":
                    raise invalid("prompt must not be empty", "prompt")
            elif not item:
                raise invalid(f"prompt[{i}] must not be an empty token list", "prompt")
        return items


# --------------------------------------------------------------------------- models

def parse_request(model_cls: type[OpenAIBaseModel], data: Any) -> Any:
    """Validate a decoded JSON body as ``model_cls``; any failure is a 400 naming the field."""
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise validation_error_to_api_error(e) from None
