"""Live tests: the official openai client against ``run_server`` with the real engine
(embedded SmolLM2-135M-Instruct on CPU). Kept short: small max_tokens, one shared server."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from srv_harness import API_KEY, LIVE_MAX_MODEL_LEN

H = {"Authorization": f"Bearer {API_KEY}"}
Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def srv(live_server):
    c = openai.OpenAI(base_url=live_server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=180)
    c.completions.create(model=model_name(live_server), prompt="Hello", max_tokens=2)  # warm up
    return live_server


def model_name(server) -> str:
    r = httpx.get(server.base_url + "/v1/models", headers=H, timeout=30)
    assert r.status_code == 200
    return r.json()["data"][0]["id"]


@pytest.fixture(scope="module")
def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def model(srv) -> str:
    return model_name(srv)


def stats(srv) -> dict:
    return httpx.get(srv.base_url + "/api/stats", timeout=30).json()


def wait_idle(srv, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    s = stats(srv)
    while time.monotonic() < deadline:
        s = stats(srv)
        if (s["num_requests_running"] == 0 and s["num_requests_waiting"] == 0
                and s["num_free_kv_blocks"] == s["num_kv_blocks"]):
            return s
        time.sleep(0.1)
    raise AssertionError(f"server did not return to idle: {s}")


def metric(text: str, name: str) -> float:
    vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")]
    assert vals, name
    return sum(vals)


def test_models_and_health(srv, model):
    assert model.startswith("SmolLM2")
    data = httpx.get(srv.base_url + "/v1/models", headers=H).json()["data"][0]
    assert data["max_model_len"] == LIVE_MAX_MODEL_LEN
    assert httpx.get(srv.base_url + "/health").status_code == 200


def test_chat(client, model):
    r = client.chat.completions.create(model=model, messages=Q, max_tokens=16, temperature=0)
    assert r.choices[0].message.content.strip()
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 16


def test_stream_equals_non_stream_greedy(client, model):
    msgs = [{"role": "user", "content": "Write one sentence about the sea."}]
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == full.usage.completion_tokens
    assert usage.usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_n2(client, model):
    r = client.completions.create(model=model, prompt="The weather today is", max_tokens=8, n=2,
                                  temperature=1.0, seed=11)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.text for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 16


def test_logprobs(client, model):
    r = client.completions.create(model=model, prompt="One, two, three,", max_tokens=5, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs)
    for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) >= 3
        assert max(top.values()) == pytest.approx(v, abs=1e-4)  # greedy: sampled = most likely
    r = client.chat.completions.create(model=model, messages=Q, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)


def test_seed_reproducible(client, model):
    kw = dict(model=model, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_stop_strings(client, model):
    base = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16,
                                     temperature=0).choices[0].text
    words = [w for w in base.split() if len(w) >= 3]
    assert words, base
    stop = words[min(1, len(words) - 1)]
    cut = base.index(stop)
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16,
                                  temperature=0, stop=[stop])
    assert r.choices[0].text == base[:cut]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=model, prompt="The capital of France is", max_tokens=16,
                                            temperature=0, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == base[:cut]


def test_errors(srv, client, model):
    url = srv.base_url
    # prompt longer than the context: both numbers in the message
    r = httpx.post(url + "/v1/completions", headers=H, timeout=60,
                   json={"model": model, "prompt": [42] * 3000, "max_tokens": 4})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "3000" in msg and str(LIVE_MAX_MODEL_LEN) in msg
    for body in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 2}, {"n": 0}, {"n": 9}):
        r = httpx.post(url + "/v1/chat/completions", headers=H, timeout=60,
                       json={"model": model, "messages": Q, **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == next(iter(body))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=Q, temperature=-2)
    # auth
    assert httpx.post(url + "/v1/chat/completions", json={"messages": Q}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model=model, messages=Q)
    # unknown model
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=Q, max_tokens=2)
    # body too large (default limit 1 MiB)
    big = json.dumps({"model": model, "prompt": "a " * 700_000}).encode()
    r = httpx.post(url + "/v1/completions", headers={**H, "Content-Type": "application/json"},
                   content=big, timeout=60)
    assert r.status_code == 413
    # malformed JSON
    r = httpx.post(url + "/v1/chat/completions", headers={**H, "Content-Type": "application/json"},
                   content=b'{"messages": [', timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_metrics_counters_increase(srv, client, model):
    before = httpx.get(srv.base_url + "/metrics").text
    client.completions.create(model=model, prompt="Count: 1 2 3", max_tokens=6, temperature=0,
                              extra_body={"ignore_eos": True})
    wait_idle(srv)
    after = httpx.get(srv.base_url + "/metrics").text
    for name, inc in (("miniinfer:prompt_tokens_total", 1), ("miniinfer:generation_tokens_total", 6),
                      ("miniinfer:e2e_request_latency_seconds_count", 1),
                      ("miniinfer:time_to_first_token_seconds_count", 1),
                      ("miniinfer:time_per_output_token_seconds_count", 1)):
        assert metric(after, name) >= metric(before, name) + inc, name
    for name in ("miniinfer:num_requests_running", "miniinfer:num_requests_waiting",
                 "miniinfer:kv_cache_usage_perc", "miniinfer:prefix_cache_queries_total",
                 "miniinfer:prefix_cache_hits_total", "miniinfer:num_preemptions_total"):
        metric(after, name)


def test_abort_on_disconnect(srv, model):
    wait_idle(srv)
    got = 0
    with httpx.stream("POST", srv.base_url + "/v1/completions", headers=H, timeout=120,
                      json={"model": model, "prompt": "Tell me a very long story.", "max_tokens": 1500,
                            "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"text"' in line:
                got += 1
                if got >= 3:
                    break
        # still connected (the line iterator is alive): the request must be in the engine.
        # (Dropping the iterator closes the stream: the server may abort before we ask.)
        s = stats(srv)
        assert s["num_requests_running"] + s["num_requests_waiting"] >= 1
        lines.close()
    # the connection is closed: the request must be aborted and its KV blocks freed at once
    s = wait_idle(srv, timeout=20)
    assert s["num_free_kv_blocks"] == s["num_kv_blocks"]
    m = httpx.get(srv.base_url + "/metrics").text
    assert metric(m, "miniinfer:num_requests_running") == 0


def test_64_concurrent_streams(srv, model):
    async def one(ac: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        stream = await ac.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Say a number bigger than {i}."}],
            max_tokens=6, temperature=0, stream=True)
        text, finish = "", None
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                finish = ch.choices[0].finish_reason or finish
        return text, finish

    async def main():
        ac = openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=240,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=128, max_keepalive_connections=128)))
        try:
            return await asyncio.gather(*(one(ac, i) for i in range(64)))
        finally:
            await ac.close()

    results = asyncio.run(main())
    assert len(results) == 64
    assert all(finish in ("stop", "length") for _, finish in results)
    assert sum(1 for text, _ in results if text) >= 60
    wait_idle(srv)
