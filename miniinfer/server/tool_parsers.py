"""Tool calls: the Hermes parser (``tool_choice="auto"``), its streaming state machine, and
the JSON schemas that constrain the output for ``tool_choice="required"`` or a named function.

Hermes format (Qwen2.5 / Qwen3 / Hermes chat templates)::

    Some optional text.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Rules (one state machine, :class:`HermesStreamer`; :func:`parse_hermes` feeds it the whole
text, so streaming and non-streaming always give the same calls and content):

* text outside ``<tool_call>`` blocks is ``content``; after the first block, whitespace-only
  text between / after blocks is dropped;
* a block whose body is a JSON object with a string ``name`` (and ``arguments``: an object,
  a JSON string, or absent = ``{}``) is a tool call; any other block (malformed JSON, no
  name) stays in ``content`` verbatim, tags included, and never fails the request;
* a block still open when the output ends stays in ``content`` verbatim;
* while streaming, text that may be the start of ``<tool_call>`` is held back, and a call
  is emitted when its closing tag arrives.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, Optional

from miniinfer.server.reasoning_parser import partial_marker_len

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
EMPTY_PARAMETERS: dict = {"type": "object", "properties": {}, "additionalProperties": False}


def new_call_id() -> str:
    """An OpenAI-style tool call id: ``call_`` and 24 random hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclasses.dataclass
class ParsedToolCall:
    """One call: the function's name and its arguments as a JSON string."""

    name: str
    arguments: str
    id: str = dataclasses.field(default_factory=new_call_id)


def tool_call_from_json(body: str) -> Optional[ParsedToolCall]:
    """The call in one block's body, or ``None`` when it is not a valid Hermes call."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class HermesStreamer:
    """Incremental Hermes parser: :meth:`feed` text deltas, then :meth:`finish` once.

    Each call returns ``(content_delta, new_calls)``: the content text that is now certain,
    and the calls whose closing tag arrived (in order)."""

    def __init__(self) -> None:
        self.inside = False  # within a <tool_call> block
        self.after_block = False  # a block was seen: whitespace-only text outside is dropped
        self.calls: list[ParsedToolCall] = []
        self._buf = ""
        self._ws = ""  # whitespace after a block, kept until non-whitespace text follows

    def _outside(self, text: str) -> str:
        """Content for text outside blocks (after a block, whitespace waits)."""
        if not self.after_block:
            return text
        self._ws += text
        if not self._ws.strip():
            return ""
        out, self._ws = self._ws, ""
        return out

    def feed(self, delta: str) -> tuple[str, list[ParsedToolCall]]:
        """Process a text delta."""
        self._buf += delta
        content: list[str] = []
        new: list[ParsedToolCall] = []
        while True:
            if not self.inside:
                i = self._buf.find(TOOL_CALL_START)
                if i < 0:
                    cut = len(self._buf) - partial_marker_len(self._buf, TOOL_CALL_START)
                    content.append(self._outside(self._buf[:cut]))
                    self._buf = self._buf[cut:]
                    break
                content.append(self._outside(self._buf[:i]))
                self._ws = ""  # whitespace before a block is dropped once a block was seen
                self._buf = self._buf[i + len(TOOL_CALL_START):]
                self.inside = True
            else:
                j = self._buf.find(TOOL_CALL_END)
                if j < 0:
                    break
                body, self._buf = self._buf[:j], self._buf[j + len(TOOL_CALL_END):]
                self.inside = False
                call = tool_call_from_json(body)
                if call is None:
                    content.append(self._outside(TOOL_CALL_START + body + TOOL_CALL_END))
                else:
                    self.calls.append(call)
                    new.append(call)
                self.after_block = True
        return "".join(content), new

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """The output ended: a held-back prefix is content, an unclosed block too."""
        rest, self._buf = self._buf, ""
        if self.inside:
            self.inside = False
            return self._outside(TOOL_CALL_START + rest), []
        out = self._outside(rest)
        self._ws = ""
        return out, []


def parse_hermes(text: str) -> tuple[Optional[str], list[ParsedToolCall]]:
    """``(content, calls)`` of a whole output; empty content is ``None``."""
    streamer = HermesStreamer()
    c1, _ = streamer.feed(text)
    c2, _ = streamer.finish()
    return (c1 + c2) or None, streamer.calls


# --------------------------------------------------------------------------- forced calls

def function_parameters(tool: dict) -> dict:
    """The JSON schema of a tool's arguments (no ``parameters``: an empty object)."""
    params = tool["function"].get("parameters")
    return params if params else EMPTY_PARAMETERS


def required_calls_schema(tools: list[dict], parallel: bool = True) -> dict:
    """``tool_choice="required"``: a JSON array (at least one item; at most one when
    ``parallel`` is false) of ``{"name": <a tool's name>, "parameters": <its arguments>}``."""
    items = [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                       "parameters": function_parameters(t)},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_required_calls(text: str) -> Optional[list[ParsedToolCall]]:
    """The calls of a ``required`` output (see :func:`required_calls_schema`); ``None``
    when the text is not such an array (e.g. cut off by ``max_tokens``)."""
    try:
        items = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("parameters", {})
        calls.append(ParsedToolCall(item["name"], json.dumps(args, ensure_ascii=False)))
    return calls
