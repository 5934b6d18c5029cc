"""The reasoning parser through the HTTP server (real engine, embedded SmolLM2, started with
``reasoning_parser="qwen3"``). SmolLM2 never writes ``</think>``: with the parser on, its
whole output is ``reasoning_content`` (vLLM's Qwen3 rule for a missing end marker), and
``chat_template_kwargs={"enable_thinking": false}`` switches the split off."""
from __future__ import annotations

import json

import httpx
import pytest
from srv_harness import API_KEY, LIVE_MAX_MODEL_LEN, SubprocessServer

H = {"Authorization": f"Bearer {API_KEY}"}
ASK = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def reasoning_server(live_server):  # after the shared live server: never two model loads at once
    srv = SubprocessServer({"model": None, "max_model_len": LIVE_MAX_MODEL_LEN, "device": "cpu",
                            "max_num_seqs": 8, "kv_cache_memory_gb": 0.25, "reasoning_parser": "qwen3"},
                           api_key=API_KEY, max_n=2, timeout=300)
    try:
        yield srv
    finally:
        srv.close()


def _post(srv, body):
    r = httpx.post(srv.base_url + "/v1/chat/completions", headers=H, timeout=300,
                   json={"messages": ASK, "max_tokens": 12, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_reasoning_content_without_end_marker(reasoning_server, live_server):
    msg = _post(reasoning_server, {})["message"]
    plain = _post(live_server, {})["message"]["content"]  # the same model without a parser
    assert msg["content"] is None and msg["reasoning_content"] == plain
    chunks = []
    with httpx.stream("POST", reasoning_server.base_url + "/v1/chat/completions", headers=H, timeout=300,
                      json={"messages": ASK, "max_tokens": 12, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    deltas = [c["delta"] for ch in chunks for c in ch["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == plain
    assert not "".join(d.get("content", "") for d in deltas)


def test_enable_thinking_false_is_plain_content(reasoning_server, live_server):
    msg = _post(reasoning_server, {"chat_template_kwargs": {"enable_thinking": False}})["message"]
    assert msg["reasoning_content"] is None
    assert msg["content"] == _post(live_server, {})["message"]["content"]
