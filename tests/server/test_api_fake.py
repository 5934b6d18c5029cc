"""API behaviour against a fake engine (fast; no model): shapes, streaming, errors, aborts, metrics."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from srv_fake_engine import FakeEngine
from srv_harness import API_KEY, ThreadServer, wait_healthy

H = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "user", "content": "hello"}]


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


def post(srv, path, body, headers=H, **kw):
    return httpx.post(srv.base_url + path, json=body, headers=headers, timeout=30, **kw)


def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def idle(srv) -> bool:
    s = srv.engine.stats()
    return (s["num_running"] == 0 and s["num_waiting"] == 0
            and s["num_free_kv_blocks"] == s["num_kv_blocks"] and srv.engine.num_active_streams == 0)


# ─────────────────────────────── happy paths ───────────────────────────────

def test_chat_non_stream_shape(fake_server):
    r = client(fake_server).chat.completions.create(model="fake-model", messages=CHAT, max_tokens=10,
                                                    temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "The quick "
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10


def test_chat_stream_matches_non_stream(fake_server):
    c = client(fake_server)
    full = c.chat.completions.create(model="fake-model", messages=CHAT, max_tokens=30, temperature=0)
    chunks = list(c.chat.completions.create(model="fake-model", messages=CHAT, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30


def test_raw_sse_framing(fake_server):
    with httpx.stream("POST", fake_server.base_url + "/v1/completions", headers=H, timeout=30,
                      json={"prompt": "hi", "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ")
        json.loads(e[6:])


def test_completions_n2_and_multi_prompt(fake_server):
    c = client(fake_server)
    r = c.completions.create(model="fake-model", prompt="abc", max_tokens=6, n=2, temperature=1.0, seed=3)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert all(len(ch.text) == 6 for ch in r.choices)
    assert r.choices[0].text != r.choices[1].text  # different choices sample differently
    assert r.usage.completion_tokens == 12
    r = c.completions.create(model="fake-model", prompt=["ab", "cd"], max_tokens=4, n=2, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 16


def test_completions_token_id_prompts(fake_server):
    c = client(fake_server)
    r = c.completions.create(model="fake-model", prompt=[104, 105], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 2
    r = c.completions.create(model="fake-model", prompt=[[104, 105], [106]], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 3 and len(r.choices) == 2


def test_completions_stream_multi_prompt_n2(fake_server):
    chunks = list(client(fake_server).completions.create(
        model="fake-model", prompt=["ab", "cd"], max_tokens=8, n=2, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    texts: dict[int, str] = {}
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert sorted(texts) == [0, 1, 2, 3]
    assert all(t == "The quic" for t in texts.values())
    assert chunks[-1].usage.completion_tokens == 32


def test_completion_logprobs_shape(fake_server):
    r = client(fake_server).completions.create(model="fake-model", prompt="x", max_tokens=5, temperature=0,
                                               logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.tokens == list("The q")
    assert len(lp.token_logprobs) == 5 and all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset == [0, 1, 2, 3, 4]
    assert all(len(d) >= 3 for d in lp.top_logprobs)


def test_chat_logprobs_shape(fake_server):
    r = client(fake_server).chat.completions.create(model="fake-model", messages=CHAT, max_tokens=4,
                                                    temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == list("The ")
    assert all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].top_logprobs[0].token == "T" and content[0].bytes == [ord("T")]


def test_stream_logprobs(fake_server):
    chunks = list(client(fake_server).chat.completions.create(
        model="fake-model", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, stream=True))
    toks = [t.token for ch in chunks if ch.choices and ch.choices[0].logprobs
            for t in ch.choices[0].logprobs.content]
    assert "".join(toks) == "The qu"


def test_stop_strings(fake_server):
    c = client(fake_server)
    r = c.completions.create(model="fake-model", prompt="x", max_tokens=40, temperature=0, stop=["fox"])
    assert r.choices[0].text == "The quick brown "
    assert r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="fake-model", prompt="x", max_tokens=40, temperature=0,
                                       stop=["fox"], stream=True))
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert streamed == "The quick brown "


def test_seed_reproducible(fake_server):
    c = client(fake_server)
    a = c.completions.create(model="fake-model", prompt="x", max_tokens=12, temperature=1.0, seed=7)
    b = c.completions.create(model="fake-model", prompt="x", max_tokens=12, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_default_max_tokens_is_remaining_context(fake_server):
    # fake: max_model_len 512, eos after 400 tokens -> ignore_eos runs to the context limit
    r = post(fake_server, "/v1/completions", {"prompt": "ab", "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 510
    assert body["choices"][0]["finish_reason"] == "length"


def test_models_health_version_page(fake_server):
    r = httpx.get(fake_server.base_url + "/v1/models", headers=H)
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == "fake-model"
    assert r.json()["data"][0]["max_model_len"] == 512
    assert httpx.get(fake_server.base_url + "/health").status_code == 200
    assert "version" in httpx.get(fake_server.base_url + "/version").json()
    page = httpx.get(fake_server.base_url + "/")
    assert page.status_code == 200 and 'id="chat-input"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "style.css"):
        assert httpx.get(fake_server.base_url + "/static/" + asset).status_code == 200


def test_page_has_no_external_resources(fake_server):
    for path in ("/", "/static/app.js", "/static/style.css"):
        text = httpx.get(fake_server.base_url + path).text
        assert "http://" not in text and "https://" not in text, path


# ─────────────────────────────── errors ───────────────────────────────

@pytest.mark.parametrize("body,param", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"n": "many"}, "n"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"stop": [""]}, "stop"),
])
def test_invalid_values_400(fake_server, body, param):
    r = post(fake_server, "/v1/chat/completions", {"messages": CHAT, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert set(err) == {"message", "type", "param", "code"}


def test_prompt_too_long_400_states_both_numbers(fake_server):
    r = post(fake_server, "/v1/completions", {"prompt": "x" * 600, "max_tokens": 5})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "600" in msg and "512" in msg
    r = post(fake_server, "/v1/completions", {"prompt": "x" * 500, "max_tokens": 50})
    assert r.status_code == 400
    err = r.json()["error"]
    assert "512" in err["message"] and "500" in err["message"] and err["param"] == "max_tokens"


def test_openai_client_raises_bad_request(fake_server):
    with pytest.raises(openai.BadRequestError):
        client(fake_server).chat.completions.create(model="fake-model", messages=CHAT, temperature=-1)


def test_missing_and_malformed(fake_server):
    r = post(fake_server, "/v1/chat/completions", {"max_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(fake_server.base_url + "/v1/chat/completions", content=b"{not json",
                   headers={**H, "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(fake_server.base_url + "/v1/completions", content=b"[1, 2]", headers=H)
    assert r.status_code == 400
    r = post(fake_server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400
    r = post(fake_server, "/v1/completions", {"prompt": [], "max_tokens": 2})
    assert r.status_code == 400
    r = post(fake_server, "/v1/completions", {"prompt": [1, 99999], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(fake_server, "/v1/chat/completions",
             {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert r.status_code == 400


def test_unknown_model_404(fake_server):
    r = post(fake_server, "/v1/chat/completions", {"model": "gpt-9", "messages": CHAT})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client(fake_server).completions.create(model="nope", prompt="x", max_tokens=2)


def test_auth_401(fake_server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = post(fake_server, "/v1/chat/completions", {"messages": CHAT}, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(fake_server.base_url + "/v1/models").status_code == 401
    # open endpoints
    for path in ("/health", "/", "/metrics", "/api/stats", "/version"):
        assert httpx.get(fake_server.base_url + path).status_code == 200, path
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=fake_server.base_url + "/v1", api_key="bad", max_retries=0).models.list()


def test_body_too_large_413(fake_server):
    big = {"messages": [{"role": "user", "content": "x" * (80 * 1024)}]}
    r = post(fake_server, "/v1/chat/completions", big)
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the streamed body is counted
        for _ in range(40):
            yield b"x" * 4096

    r = httpx.post(fake_server.base_url + "/v1/completions", content=chunks(), headers=H, timeout=30)
    assert r.status_code == 413


def test_unknown_route_and_method(fake_server):
    r = httpx.get(fake_server.base_url + "/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(fake_server.base_url + "/v1/chat/completions", headers=H)
    assert r.status_code == 405 and "error" in r.json()


# ─────────────────────────────── metrics ───────────────────────────────

def _metric(text: str, name: str) -> float:
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, name
    return total


def test_metrics_increase(fake_server):
    names = ["miniinfer:num_requests_running", "miniinfer:num_requests_waiting", "miniinfer:kv_cache_usage_perc",
             "miniinfer:prompt_tokens_total", "miniinfer:generation_tokens_total",
             "miniinfer:prefix_cache_queries_total", "miniinfer:prefix_cache_hits_total",
             "miniinfer:num_preemptions_total", "miniinfer:time_to_first_token_seconds_count",
             "miniinfer:time_per_output_token_seconds_count", "miniinfer:e2e_request_latency_seconds_count"]
    before = httpx.get(fake_server.base_url + "/metrics").text
    for n in names:
        _metric(before, n)
    client(fake_server).completions.create(model="fake-model", prompt="hello", max_tokens=7, temperature=0)
    assert wait_until(lambda: idle(fake_server))
    after = httpx.get(fake_server.base_url + "/metrics").text
    assert _metric(after, "miniinfer:prompt_tokens_total") >= _metric(before, "miniinfer:prompt_tokens_total") + 5
    assert (_metric(after, "miniinfer:generation_tokens_total")
            >= _metric(before, "miniinfer:generation_tokens_total") + 7)
    assert (_metric(after, "miniinfer:e2e_request_latency_seconds_count")
            == _metric(before, "miniinfer:e2e_request_latency_seconds_count") + 1)
    assert (_metric(after, "miniinfer:time_to_first_token_seconds_count")
            == _metric(before, "miniinfer:time_to_first_token_seconds_count") + 1)
    stats = httpx.get(fake_server.base_url + "/api/stats").json()
    for key in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                "generation_throughput_tok_s", "ttft_mean_s", "tpot_mean_s", "generation_tokens_total"):
        assert key in stats
    assert stats["ttft_mean_s"] is not None


# ─────────────────────────────── aborts and concurrency ───────────────────────────────

def test_stream_disconnect_aborts(fake_server):
    eng = fake_server.raw_engine
    n_aborted = len(eng.aborted)
    with httpx.stream("POST", fake_server.base_url + "/v1/completions", headers=H, timeout=30,
                      json={"prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
        it = r.iter_lines()
        got = 0
        for line in it:
            if line.startswith("data: "):
                got += 1
            if got >= 3:
                break
    assert wait_until(lambda: idle(fake_server) and len(eng.aborted) == n_aborted + 1), fake_server.engine.stats()


def test_non_stream_disconnect_aborts(fake_server):
    eng = fake_server.raw_engine
    n_aborted = len(eng.aborted)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fake_server.base_url + "/v1/completions", headers=H, timeout=0.3,
                   json={"prompt": "x", "max_tokens": 500, "ignore_eos": True})
    assert wait_until(lambda: idle(fake_server) and len(eng.aborted) == n_aborted + 1), fake_server.engine.stats()


def test_concurrent_streams(fake_server):
    async def one(ac: openai.AsyncOpenAI, i: int) -> str:
        stream = await ac.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"q{i}"}],
                                                  max_tokens=12, temperature=0, stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    async def main() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=fake_server.base_url + "/v1", api_key=API_KEY, max_retries=0,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=100)))
        try:
            return await asyncio.gather(*(one(ac, i) for i in range(64)))
        finally:
            await ac.close()

    texts = asyncio.run(main())
    assert texts == ["The quick br"] * 64
    assert wait_until(lambda: idle(fake_server))
    assert len(fake_server.raw_engine._thread_ids) == 1  # the engine was only touched by one thread


# ─────────────────────────────── lifecycle ───────────────────────────────

def test_health_503_while_loading():
    gate = threading.Event()
    srv = ThreadServer(lambda: FakeEngine(load_event=gate), wait=False)
    try:
        r = httpx.get(srv.base_url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(srv.base_url + "/api/stats").json()["state"] == "loading"
        gate.set()
        wait_healthy(srv.base_url, 10)
        r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        gate.set()
        srv.close()


def test_engine_crash_fails_requests_and_health():
    srv = ThreadServer(lambda: FakeEngine(step_time=0.005, crash_after_steps=20))
    try:
        r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 5})
        assert r.status_code == 200
        with httpx.stream("POST", srv.base_url + "/v1/completions", timeout=10,
                          json={"prompt": "x", "max_tokens": 100, "stream": True}) as s:
            body = s.read().decode()
        assert '"internal_server_error"' in body and body.endswith("data: [DONE]\n\n")
        r = httpx.get(srv.base_url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "unhealthy"
        assert "simulated engine crash" in r.json()["error"]
        r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 5})
        assert r.status_code == 503
    finally:
        srv.close()


def test_engine_crash_non_stream_500():
    srv = ThreadServer(lambda: FakeEngine(step_time=0.005, crash_after_steps=3))
    try:
        r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 50})
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
    finally:
        srv.close()


def test_load_failure_unhealthy():
    def boom():
        raise RuntimeError("no weights here")

    srv = ThreadServer(boom, wait=False)
    try:
        assert wait_until(lambda: httpx.get(srv.base_url + "/health").json()["status"] == "unhealthy")
        assert "no weights here" in httpx.get(srv.base_url + "/health").json()["error"]
        assert httpx.post(srv.base_url + "/v1/completions", json={"prompt": "x"}).status_code == 503
    finally:
        srv.close()
