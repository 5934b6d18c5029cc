"""Issue #11: request fields are honoured or refused with a 400 naming them — never ignored,
never a 500 — including the numerics (NaN / inf) and the seed range."""
from __future__ import annotations

import json

import httpx
import pytest
from srv_harness import API_KEY

H = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
CHAT = [{"role": "user", "content": "hello"}]


def raw_post(srv, path, text: str):
    return httpx.post(srv.base_url + path, content=text.encode(), headers=H, timeout=60)


def post(srv, path, body):
    return raw_post(srv, path, json.dumps(body))  # json.dumps writes NaN / Infinity literals


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                   "frequency_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_400_naming_the_field(fake_server, field, value):
    for path, body in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "hi"})):
        r = post(fake_server, path, {**body, "max_tokens": 2, field: value})
        assert r.status_code == 400, (field, value, r.text)
        assert r.json()["error"]["param"] == field, r.text


def test_logit_bias_non_finite_and_too_many_400(fake_server):
    r = post(fake_server, "/v1/chat/completions", {"messages": CHAT, "logit_bias": {"5": float("nan")}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    r = post(fake_server, "/v1/chat/completions", {"messages": CHAT, "logit_bias": {str(i): 1 for i in range(301)}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    r = post(fake_server, "/v1/chat/completions", {"messages": CHAT, "logit_bias": {"x": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text


@pytest.mark.parametrize("seed", [2 ** 64 - 1, 2 ** 63, -(2 ** 63) - 1])
def test_seed_out_of_range_400_naming_seed(fake_server, seed):
    r = post(fake_server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "n": 2, "seed": seed})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "seed"
    r = post(fake_server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": 7})
    assert r.status_code == 200  # and the server goes on


@pytest.mark.parametrize("field,value", [("frobnicate", 1), ("functions", [{"name": "f"}])])  # tools: known since #12
def test_unknown_fields_400_naming_them(fake_server, field, value):
    r = post(fake_server, "/v1/chat/completions", {"messages": CHAT, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_unknown_field_in_a_message_400(fake_server):
    r = post(fake_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "weird": 1}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.weird", r.text


def test_stream_options_need_stream(fake_server):
    r = post(fake_server, "/v1/chat/completions", {"messages": CHAT, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
    r = post(fake_server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    assert r.status_code == 200


def test_response_format(fake_server):
    r = post(fake_server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2,
                                                   "response_format": {"type": "text"}})
    assert r.status_code == 200
    r = post(fake_server, "/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"  # no schema given
    r = post(fake_server, "/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "xml"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_text_parts_are_joined_with_newlines():
    from miniinfer.server.protocol import ChatCompletionRequest
    req = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]}])
    assert req.to_messages() == [{"role": "user", "content": "a\nb"}]


def test_logit_bias_reaches_the_engine():
    from miniinfer.server.protocol import CompletionRequest
    params = CompletionRequest(prompt="x", logit_bias={"7": 5.5, "9": -100}).to_sampling_params(8)
    assert params.logit_bias == {7: 5.5, 9: -100.0}
