"""Shape one chat choice's generated text into the assistant message: the reasoning split
(``reasoning_content``), then tool calls (``tool_calls``) from the content part.

:class:`ChatOutputParser` is fed the text deltas of one choice and answers
:class:`DeltaMessage` s (streaming); the non-streaming message is the same deltas merged
(:func:`merge_deltas`), so both paths always agree.

Tool modes (``protocol_tools.resolve_tool_choice``):

* ``none``: the content is plain text;
* ``auto``: Hermes ``<tool_call>`` blocks are parsed (``tool_parsers.HermesStreamer``);
* ``named``: the output is the function's arguments (constrained by its schema): one call,
  whose argument fragments stream as they are generated;
* ``required``: the output is a JSON array of ``{"name", "parameters"}`` (constrained);
  it is parsed when the choice ends, then its calls are emitted.
"""
from __future__ import annotations

from typing import Optional

from miniinfer.server.reasoning_parser import ReasoningStreamer, make_reasoning_streamer
from miniinfer.server.responses import (
    ChatResponseMessage, DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall, ToolCall,
)
from miniinfer.server.tool_parsers import HermesStreamer, ParsedToolCall, new_call_id, parse_required_calls


def call_header(index: int, call: ParsedToolCall) -> DeltaMessage:
    """The first delta of a call: its index, id, type and name, arguments ""."""
    return DeltaMessage(tool_calls=[DeltaToolCall(index=index, id=call.id, type="function",
                                                  function=DeltaFunctionCall(name=call.name, arguments=""))])


def call_arguments(index: int, fragment: str) -> DeltaMessage:
    """A fragment of a call's arguments (the fragments concatenate to its JSON)."""
    return DeltaMessage(tool_calls=[DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=fragment))])


class ChatOutputParser:
    """One choice's parser: :meth:`feed` text deltas, :meth:`finish` once at the end."""

    def __init__(self, tool_mode: str = "none", function_name: Optional[str] = None,
                 reasoning_parser: Optional[str] = None) -> None:
        self.mode = tool_mode
        self.function_name = function_name
        self.reasoning: Optional[ReasoningStreamer] = (
            make_reasoning_streamer(reasoning_parser) if reasoning_parser else None)
        self.hermes = HermesStreamer() if tool_mode == "auto" else None
        self.calls: list[ParsedToolCall] = []  # emitted so far; a call's index is its position
        self._forced: list[str] = []  # required: the content, parsed at the end

    @property
    def active(self) -> bool:
        """Whether the text is reshaped at all (else it is the content as is)."""
        return self.mode != "none" or self.reasoning is not None

    def feed(self, text: str) -> list[DeltaMessage]:
        """The deltas for new generated text (possibly none: text held back)."""
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        out = [DeltaMessage(reasoning_content=reasoning)] if reasoning else []
        return out + self._content(content)

    def finish(self) -> list[DeltaMessage]:
        """The deltas of what was held back, and of calls known only at the end."""
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        out = [DeltaMessage(reasoning_content=reasoning)] if reasoning else []
        out += self._content(content)
        if self.hermes is not None:
            text, calls = self.hermes.finish()
            out += self._content_and_calls(text, calls)
        elif self.mode == "required":
            out += self._required_calls("".join(self._forced))
        return out

    def _content(self, text: str) -> list[DeltaMessage]:
        if not text:
            return []
        if self.hermes is not None:
            return self._content_and_calls(*self.hermes.feed(text))
        if self.mode == "named":
            out = []
            if not self.calls:
                self.calls.append(ParsedToolCall(self.function_name or "", "", new_call_id()))
                out.append(call_header(0, self.calls[0]))
            self.calls[0].arguments += text
            return out + [call_arguments(0, text)]
        if self.mode == "required":
            self._forced.append(text)
            return []
        return [DeltaMessage(content=text)]

    def _content_and_calls(self, text: str, calls: list[ParsedToolCall]) -> list[DeltaMessage]:
        out = [DeltaMessage(content=text)] if text else []
        for call in calls:
            self.calls.append(call)
            index = len(self.calls) - 1
            out += [call_header(index, call), call_arguments(index, call.arguments)]
        return out

    def _required_calls(self, text: str) -> list[DeltaMessage]:
        """The calls of a finished ``required`` output; text that is no call array (cut off
        by ``max_tokens``, say) is content."""
        calls = parse_required_calls(text)
        if calls is None:
            return [DeltaMessage(content=text)] if text else []
        return self._content_and_calls("", calls)

    def finish_reason(self, reason: Optional[str]) -> Optional[str]:
        """``tool_calls`` instead of ``stop`` once the choice made calls."""
        return "tool_calls" if reason == "stop" and self.calls else reason


def merge_deltas(deltas: list[DeltaMessage]) -> ChatResponseMessage:
    """The assistant message of a whole choice: its deltas concatenated."""
    reasoning = "".join(d.reasoning_content or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        for t in d.tool_calls or []:
            if t.index not in calls:
                calls[t.index] = ToolCall(id=t.id or new_call_id(), function=FunctionCall(
                    name=(t.function.name if t.function else None) or "", arguments=""))
            if t.function is not None and t.function.arguments:
                calls[t.index].function.arguments += t.function.arguments
    return ChatResponseMessage(content=content or None, reasoning_content=reasoning or None,
                               tool_calls=[calls[i] for i in sorted(calls)] or None)


def parse_whole(parser: ChatOutputParser, text: str) -> ChatResponseMessage:
    """The message of a finished choice's whole ``text`` (the non-streaming response)."""
    if not parser.active:
        return ChatResponseMessage(content=text)
    return merge_deltas(parser.feed(text) + parser.finish())
