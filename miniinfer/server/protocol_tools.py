"""Request models and checks of chat requests' tool fields: ``tools``, ``tool_choice``, the
calls of earlier assistant messages, and ``chat_template_kwargs``. Every failure is an
:class:`APIError` (400) naming the field. ``protocol.py`` re-exports what requests use.

Limits: at most :data:`MAX_TOOLS` tools per request, tool names of 1 to 64 characters of
``A-Z a-z 0-9 _ . : -``, ``parameters`` a valid JSON schema of type object.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional, Union

from pydantic import ConfigDict, Field

from miniinfer.server.api_errors import invalid
from miniinfer.server.responses import OpenAIBaseModel

MAX_TOOLS = 128  # tools per request
MAX_TEMPLATE_KWARGS = 32  # chat_template_kwargs entries
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# apply_chat_template arguments that a request may not set through chat_template_kwargs
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "tokenize", "add_generation_prompt",
    "continue_final_message", "return_dict", "return_tensors", "return_assistant_tokens_mask",
    "tokenizer_kwargs", "padding", "truncation", "max_length"})


class _Strict(OpenAIBaseModel):
    """Request parts: an unknown field is a 400 naming it."""
    model_config = ConfigDict(extra="forbid")


class FunctionCallBody(_Strict):
    name: str
    arguments: str = "{}"  # a JSON string (OpenAI's shape)


class MessageToolCall(_Strict):
    """A call in an earlier assistant message (sent back by the client)."""
    id: Optional[str] = None
    type: str = Field("function", json_schema_extra={"enum": ["function"]})
    function: FunctionCallBody


class FunctionDefinition(_Strict):
    name: str = Field(json_schema_extra={"pattern": "^[A-Za-z0-9_.:-]{1,64}$"})
    description: Optional[str] = None
    parameters: Optional[dict] = None  # a JSON schema of type object; absent: no arguments
    strict: Optional[bool] = None


class ChatTool(_Strict):
    type: str = Field(json_schema_extra={"enum": ["function"]})
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: str = Field(json_schema_extra={"enum": ["function"]})
    function: NamedFunction


ToolChoice = Union[str, NamedToolChoice]


def _check_parameters_schema(schema: dict, param: str) -> None:
    """A tool's ``parameters``: a valid JSON schema describing an object."""
    import jsonschema
    if schema.get("type", "object") != "object":
        raise invalid(f"{param} must be a JSON schema of type object, got type {schema.get('type')!r}", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise invalid(f"{param} is not a valid JSON schema: {e.message}", param) from None


def validate_tools(tools: Optional[list[ChatTool]]) -> list[dict] | None:
    """The tools as plain dicts (for the chat template); 400 for too many tools, a type other
    than ``function``, a bad or duplicated name, a bad ``parameters`` schema."""
    if not tools:
        return None
    if len(tools) > MAX_TOOLS:
        raise invalid(f"tools may hold at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    seen: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise invalid(f"tools[{i}].type must be 'function', got {tool.type!r}", f"tools.{i}.type")
        name = tool.function.name
        if not _TOOL_NAME.fullmatch(name):
            raise invalid(f"tools[{i}].function.name must be 1 to 64 characters of a-z, A-Z, 0-9, "
                          f"_ . : -, got {name!r}", f"tools.{i}.function.name")
        if name in seen:
            raise invalid(f"tools[{i}].function.name: duplicate tool name {name!r}", f"tools.{i}.function.name")
        seen.add(name)
        if tool.function.parameters is not None:
            _check_parameters_schema(tool.function.parameters, f"tools.{i}.function.parameters")
        out.append({"type": "function", "function": tool.function.model_dump(exclude_none=True)})
    return out


def resolve_tool_choice(choice: Optional[ToolChoice], tools: Optional[list[ChatTool]]) -> tuple[str, str | None]:
    """``(kind, function name)``: kind ``none`` | ``auto`` | ``required`` | ``named``.
    Unset: ``auto`` with tools, ``none`` without (OpenAI's default). A choice other than
    ``none`` without tools, or naming a function not in tools, is a 400 naming ``tool_choice``."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise invalid(f"tool_choice must be none, auto, required or a named function, got {choice!r}",
                          "tool_choice")
        if choice != "none" and not tools:
            raise invalid(f"tool_choice {choice!r} requires tools", "tool_choice")
        return choice, None
    if choice.type != "function":
        raise invalid(f"tool_choice.type must be 'function', got {choice.type!r}", "tool_choice")
    names = [t.function.name for t in tools or []]
    if not names:
        raise invalid("tool_choice names a function but no tools were given", "tool_choice")
    if choice.function.name not in names:
        raise invalid(f"tool_choice names the function {choice.function.name!r}, which is not "
                      f"in tools ({', '.join(names)})", "tool_choice")
    return "named", choice.function.name


def check_template_kwargs(kw: Optional[dict[str, Any]]) -> dict[str, Any] | None:
    """``chat_template_kwargs`` for ``apply_chat_template``: at most
    :data:`MAX_TEMPLATE_KWARGS` identifier keys, none that ``apply_chat_template`` owns."""
    if not kw:
        return None
    if len(kw) > MAX_TEMPLATE_KWARGS:
        raise invalid(f"chat_template_kwargs may hold at most {MAX_TEMPLATE_KWARGS} entries", "chat_template_kwargs")
    bad = sorted(k for k in kw if k in _RESERVED_TEMPLATE_KWARGS or not k.isidentifier())
    if bad:
        raise invalid(f"chat_template_kwargs may not set {', '.join(bad)}", "chat_template_kwargs")
    return dict(kw)


def call_dict(c: MessageToolCall) -> dict:
    """A call of an earlier assistant message for the chat template: JSON-string arguments
    become a dict (HF templates expect one); arguments that are not a JSON object stay a string."""
    try:
        args: Any = json.loads(c.function.arguments)
    except ValueError:
        args = c.function.arguments
    if not isinstance(args, dict):
        args = c.function.arguments
    out: dict[str, Any] = {"type": "function", "function": {"name": c.function.name, "arguments": args}}
    if c.id is not None:
        out["id"] = c.id
    return out
