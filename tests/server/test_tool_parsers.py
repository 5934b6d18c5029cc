"""Unit tests of the tool-call and reasoning parsers (synthetic text, no model): the Hermes
parser, the forced-call schemas, the reasoning split, and that streaming the text split at
any point gives exactly the non-streaming result."""
from __future__ import annotations

import json

import jsonschema
import pytest

from miniinfer.server.chat_output import ChatOutputParser, merge_deltas, parse_whole
from miniinfer.server.reasoning_parser import ReasoningStreamer, split_reasoning, thinking_disabled
from miniinfer.server.tool_parsers import (
    HermesStreamer, parse_hermes, parse_required_calls, required_calls_schema,
)

ONE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TWO = ONE + '\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_one_call():
    content, calls = parse_hermes(ONE)
    assert content is None
    assert _calls(calls) == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and len(calls[0].id) > 10


def test_hermes_two_calls_and_text_before():
    content, calls = parse_hermes("Let me check.\n" + TWO + "\n")
    assert content == "Let me check.\n"
    assert _calls(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert calls[0].id != calls[1].id


def test_hermes_arguments_as_string_and_absent():
    _, calls = parse_hermes('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
                            '<tool_call>{"name": "g"}</tool_call>')
    assert _calls(calls) == [("f", {"a": 1}), ("g", {})]


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',  # malformed JSON
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>[1, 2]</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"a": 1}}',  # never closed
    'plain text with < and <tool and </tool_call>',
])
def test_hermes_malformed_stays_content(text):
    content, calls = parse_hermes(text)
    assert calls == [] and content == text


def test_hermes_malformed_block_next_to_a_good_one():
    bad = '<tool_call>{nope}</tool_call>'
    content, calls = parse_hermes(ONE + "\n" + bad)
    assert _calls(calls) == [("get_weather", {"city": "Paris"})]
    assert content == bad  # whitespace between blocks is dropped


def _stream_hermes(pieces):
    st = HermesStreamer()
    content, calls = "", []
    for p in pieces:
        c, new = st.feed(p)
        content += c
        calls += new
    c, new = st.finish()
    return content + c, _calls(calls + new)


HERMES_TEXTS = [ONE, "Let me check.\n" + TWO + "\nDone.", "no calls at all <tool", TWO + "\n<tool_call>{bad",
                "a<tool_call>{\"name\": \"x\", \"arguments\": {\"s\": \"</tool\"}}</tool_call> \n b"]


@pytest.mark.parametrize("text", HERMES_TEXTS)
def test_hermes_streaming_every_split_point(text):
    content, calls = parse_hermes(text)
    want = (content or "", _calls(calls))
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 7):
            assert _stream_hermes([text[:i], text[i:j], text[j:]]) == want, (i, j)
    assert _stream_hermes(list(text)) == want  # one character at a time


def test_required_schema_and_parse():
    tools = [{"type": "function", "function": {"name": "a", "parameters": {
                 "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
             {"type": "function", "function": {"name": "b"}}]
    schema = required_calls_schema(tools)
    out = [{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]
    jsonschema.validate(out, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "c", "parameters": {}}], schema)
    assert required_calls_schema(tools, parallel=False)["maxItems"] == 1
    assert _calls(parse_required_calls(json.dumps(out))) == [("a", {"x": 1}), ("b", {})]
    assert parse_required_calls('[{"name": "a", "param') is None


# --------------------------------------------------------------------------- reasoning

@pytest.mark.parametrize("text,want", [
    ("<think>\nhmm\n</think>\n\nHello", ("\nhmm\n", "\n\nHello")),
    ("hmm</think>Hello", ("hmm", "Hello")),  # Qwen3: <think> was in the prompt
    ("still thinking <thi", ("still thinking <thi", None)),  # no end marker: all reasoning
    ("<think></think>Hi", (None, "Hi")),
    ("a</think>b</think>c<think>", ("a", "b</think>c<think>")),
])
def test_split_reasoning(text, want):
    assert split_reasoning(text, "qwen3") == want


@pytest.mark.parametrize("text", ["<think>\nhmm\n</think>\n\nHello", "hmm</think>Hello", "x <thin y </thin",
                                  "<think>a<think>b</think>c", "</think>"])
def test_reasoning_streaming_every_split_point(text):
    want = split_reasoning(text, "deepseek_r1")
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            st = ReasoningStreamer("<think>", "</think>")
            parts = [st.feed(text[:i]), st.feed(text[i:j]), st.feed(text[j:]), st.finish()]
            got = ("".join(p[0] for p in parts) or None, "".join(p[1] for p in parts) or None)
            assert got == want, (i, j)


def test_thinking_disabled():
    assert thinking_disabled({"enable_thinking": False})
    assert not thinking_disabled({"enable_thinking": True}) and not thinking_disabled(None)


# --------------------------------------------------------------------------- the chat message

def _stream_message(parser, text, step):
    deltas = []
    for k in range(0, len(text), step):
        deltas += parser.feed(text[k:k + step])
    return merge_deltas(deltas + parser.finish())


@pytest.mark.parametrize("mode,name,reasoning,text", [
    ("auto", None, "qwen3", "think</think>Sure.\n" + TWO),
    ("auto", None, None, "Just text."),
    ("named", "f", None, '{"a": 1}'),
    ("named", "f", "qwen3", 'plan</think>{"a": 1}'),
    ("required", None, None, '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]'),
    ("required", None, None, '[{"name": "f", "param'),
    ("none", None, "qwen3", "<think>x</think>y"),
])
def test_chat_parser_stream_equals_whole(mode, name, reasoning, text):
    whole = parse_whole(ChatOutputParser(mode, name, reasoning), text)
    for step in (1, 2, 5, len(text)):
        got = _stream_message(ChatOutputParser(mode, name, reasoning), text, step)
        assert [(c.function.name, c.function.arguments) for c in got.tool_calls or []] == \
            [(c.function.name, c.function.arguments) for c in whole.tool_calls or []]
        assert (got.content, got.reasoning_content) == (whole.content, whole.reasoning_content)
    if mode == "named":
        assert whole.tool_calls[0].function.arguments == '{"a": 1}' and whole.content is None


def test_chat_parser_finish_reason_and_deltas_shape():
    p = ChatOutputParser("auto")
    deltas = p.feed(ONE) + p.finish()
    head, args = deltas[0].tool_calls[0], deltas[1].tool_calls[0]
    assert (head.index, head.type, head.function.name, head.function.arguments) == (0, "function", "get_weather", "")
    assert head.id.startswith("call_") and args.id is None and args.function.name is None
    assert json.loads(args.function.arguments) == {"city": "Paris"}
    assert p.finish_reason("stop") == "tool_calls" and p.finish_reason("length") == "length"
    assert ChatOutputParser("auto").finish_reason("stop") == "stop"


# --------------------------------------------------------------------------- the chat template

class _RecordingTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, **kwargs):
        self.seen = (messages, kwargs)
        return "prompt"


def test_tools_and_template_kwargs_reach_the_template():
    from miniinfer.server.request_stream import ChatPrompt
    from miniinfer.tokenizer import apply_chat_template
    tools = [{"type": "function", "function": {"name": "f"}}]
    msgs = [{"role": "user", "content": "x"}]
    prompt = ChatPrompt(msgs, tools, {"enable_thinking": False})
    tok = _RecordingTokenizer()
    assert apply_chat_template(tok, prompt.messages) == "prompt"  # what the engine thread calls
    assert tok.seen == (msgs, {"tools": tools, "enable_thinking": False})
    apply_chat_template(tok, ChatPrompt(msgs).messages)
    assert tok.seen == (msgs, {})


def test_assistant_tool_calls_become_dicts_for_the_template():
    from miniinfer.server.protocol import ChatCompletionRequest
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21C"}]})
    msgs = req.to_messages()
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": {"city": "Paris"}}}]}
    assert msgs[2] == {"role": "tool", "content": "21C", "tool_call_id": "call_1"}
