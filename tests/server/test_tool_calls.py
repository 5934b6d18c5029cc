"""Tool calls through the HTTP server (real engine, embedded SmolLM2): named and required
tool_choice (constrained by the functions' schemas), streaming deltas, tool_choice none,
multi-turn conversations with tool messages, the openai SDK, and the 400s naming the field."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from srv_harness import API_KEY

H = {"Authorization": f"Bearer {API_KEY}"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def post(live_server, body, timeout=300):
    return httpx.post(live_server.base_url + "/v1/chat/completions", headers=H, json=body, timeout=timeout)


def stream_chunks(live_server, body):
    """The SSE chunks of a streamed request (without [DONE])."""
    chunks = []
    with httpx.stream("POST", live_server.base_url + "/v1/chat/completions", headers=H, timeout=300,
                      json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def merged_calls(chunks):
    """Tool calls concatenated from the stream's deltas, checking OpenAI's delta shape."""
    calls: dict[int, dict] = {}
    for ch in chunks:
        for choice in ch["choices"]:
            for t in choice["delta"].get("tool_calls", []):
                if t["index"] not in calls:  # the first delta of a call: id, type, name, arguments ""
                    assert t["id"].startswith("call_") and t["type"] == "function"
                    assert t["function"]["name"] and t["function"]["arguments"] == ""
                    calls[t["index"]] = {"id": t["id"], "name": t["function"]["name"], "arguments": ""}
                else:
                    assert "id" not in t and "name" not in t.get("function", {})
                    calls[t["index"]]["arguments"] += t["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]


def check_call(name, arguments):
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_named_tool_choice(live_server, model):
    r = post(live_server, {"model": model, "messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 60,
                           "temperature": 0, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    check_call("get_weather", call["function"]["arguments"])


def test_named_tool_choice_streaming(live_server, model):
    body = {"model": model, "messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 60, "temperature": 0,
            "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    chunks = stream_chunks(live_server, body)
    [call] = merged_calls(chunks)
    assert call["name"] == "get_time"
    check_call("get_time", call["arguments"])
    finish = [c["finish_reason"] for ch in chunks for c in ch["choices"] if c.get("finish_reason")]
    assert finish == ["tool_calls"]
    assert not any(c["delta"].get("content") for ch in chunks for c in ch["choices"])
    whole = post(live_server, {**body, "stream": False}).json()["choices"][0]["message"]["tool_calls"][0]
    assert whole["function"]["arguments"] == call["arguments"]  # greedy: the same JSON


def test_required_with_two_tools(live_server, model):
    body = {"model": model, "messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 120, "temperature": 0,
            "tool_choice": "required"}
    choice = post(live_server, body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    calls = choice["message"]["tool_calls"]
    assert calls and choice["message"]["content"] is None
    for call in calls:
        check_call(call["function"]["name"], call["function"]["arguments"])
    streamed = merged_calls(stream_chunks(live_server, body))
    assert [(c["name"], c["arguments"]) for c in streamed] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_tool_choice_none_is_plain_content(live_server, model):
    r = post(live_server, {"model": model, "messages": ASK, "tools": [WEATHER], "tool_choice": "none",
                           "max_tokens": 12, "temperature": 0})
    choice = r.json()["choices"][0]
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert not choice["message"].get("tool_calls") and choice["finish_reason"] in ("stop", "length")


def test_auto_without_calls_is_content(live_server, model):
    r = post(live_server, {"model": model, "messages": ASK, "tools": [WEATHER], "max_tokens": 12,
                           "temperature": 0, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


def test_openai_sdk_and_multi_turn(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    call = msg.tool_calls[0]
    assert call.function.name == "get_weather"
    check_call("get_weather", call.function.arguments)
    history = ASK + [msg.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    r2 = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], max_tokens=8,
                                        temperature=0, tool_choice="none")
    assert r2.choices[0].message.content is not None


def _tools(n):
    return [{"type": "function", "function": {"name": f"f{i}"}} for i in range(n)]


@pytest.mark.parametrize("extra,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": _tools(129)}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
      "guided_regex": "a+"}, "guided_regex"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0.tool_calls"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
])
def test_validation_400s(live_server, model, extra, param):
    r = post(live_server, {"model": model, "messages": ASK, "max_tokens": 4, **extra}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
