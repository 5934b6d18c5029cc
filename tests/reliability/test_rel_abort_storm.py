"""Abort storm: many streaming requests (chat and completions) cut by the client at random
points, with concurrency, against the real engine; afterwards nothing may be left behind.

Each request is written on a raw socket (so the cut is exactly where we want it) and is one of:

* ``before_first_byte``: the whole request is sent, the socket closed 0-20 ms later, nothing read;
* ``truncated_body``: the headers and part of the JSON body, then closed;
* ``prefill``: a long, unique prompt (no prefix-cache hit), closed 20-600 ms after sending,
  nothing read (the engine is computing the prompt, or about to);
* ``mid_stream``: closed after 1-12 SSE events;
* ``nonstream_cut``: a non-streaming request closed while the server waits for it;
* ``complete``: read to ``data: [DONE]`` (the server keeps serving during the storm).

60 % of the chat requests ask for a JSON object (``response_format``), so grammar rows, and
steps whose sampling is deferred (structured output; the server defers from 2 grammar rows
here), are cut too.

Half the cuts close the socket with a FIN, half with a RST (SO_LINGER 0). Afterwards
``/api/stats`` and ``/metrics`` must show 0 running, 0 waiting and every KV block free, no 5xx
anywhere (client, access log, ``http_errors`` metric), no traceback in the server log, the
server's open file descriptors and threads back to their count before the storm, and a greedy
request answered exactly as before the storm.

CI: 120 requests; ``MINIINFER_RELIABILITY_FULL=1``: 1,000 (the issue's number).
"""
from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time
from collections import Counter

import pytest
from rel_harness import http_5xx_metric, metric, report, size

pytestmark = pytest.mark.timeout(900)

N_REQUESTS = size(120, 1000)
CONCURRENCY = 16
PER_REQUEST_TIMEOUT = 300.0

KINDS = [("before_first_byte", 20), ("truncated_body", 5), ("prefill", 15), ("mid_stream", 45),
         ("nonstream_cut", 5), ("complete", 10)]

WORDS = ("apple river stone cloud seven green music table window garden silver morning "
         "paper orange winter bridge candle forest ocean yellow market pencil summer engine "
         "castle rabbit thunder basket planet violin copper desert harbor meadow lantern").split()


def _prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _body(rng: random.Random, kind: str, chat: bool, model: str) -> tuple[str, dict]:
    long = kind == "prefill"
    text = f"[{rng.random():.12f}] " + _prompt(rng, rng.randint(100, 300) if long else rng.randint(3, 40))
    body: dict = {"model": model, "temperature": rng.choice([0.0, 0.8])}
    if kind == "complete":
        body["max_tokens"] = rng.randint(4, 24)
    else:
        body["max_tokens"] = rng.randint(32, 400)
        body["ignore_eos"] = True
    body["stream"] = kind != "nonstream_cut"
    if body["stream"] and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.6:  # constrained too: steps with many grammar rows take the deferred sampling path
            body["response_format"] = {"type": "json_object"}
        return "/v1/chat/completions", body
    body["prompt"] = text
    return "/v1/completions", body


def _cut(writer: asyncio.StreamWriter, rst: bool) -> None:
    if rst:  # close with a reset instead of a FIN
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def _one(port: int, i: int, kind: str, rng: random.Random, model: str) -> dict:
    chat = rng.random() < 0.5
    path, body = _body(rng, kind, chat, model)
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    rst = rng.random() < 0.5
    res = {"kind": kind, "chat": chat, "max_tokens": body["max_tokens"], "status": None, "events": 0, "done": False, "error": None}
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if kind == "truncated_body":
            writer.write(head + payload[:rng.randint(0, len(payload) - 1)])
            await writer.drain()
            await asyncio.sleep(rng.uniform(0, 0.05))
            return res
        writer.write(head + payload)
        await writer.drain()
        if kind == "before_first_byte":
            await asyncio.sleep(rng.uniform(0, 0.02))
            return res
        if kind in ("prefill", "nonstream_cut"):
            await asyncio.sleep(rng.uniform(0.02, 0.6) if kind == "prefill" else rng.uniform(0.01, 0.3))
            return res
        status_line = await reader.readline()
        res["status"] = int(status_line.split()[1]) if status_line else None
        limit = rng.randint(1, 12) if kind == "mid_stream" else None
        while True:
            line = await reader.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                if line.strip() == b"data: [DONE]":
                    res["done"] = True
                    break
                res["events"] += 1
                if limit is not None and res["events"] >= limit:
                    break
        return res
    finally:
        _cut(writer, rst)
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _storm(port: int, model: str, n: int, seed: int) -> tuple[list[dict], float]:
    rng = random.Random(seed)
    names, weights = zip(*KINDS)
    plan = [(i, rng.choices(names, weights)[0], random.Random(rng.getrandbits(64))) for i in range(n)]
    sem = asyncio.Semaphore(CONCURRENCY)

    async def run(i: int, kind: str, r: random.Random) -> dict:
        async with sem:
            await asyncio.sleep(r.uniform(0, 0.01))
            try:
                return await asyncio.wait_for(_one(port, i, kind, r, model), PER_REQUEST_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - counted and reported below
                return {"kind": kind, "max_tokens": 0, "status": None, "events": 0, "done": False, "error": repr(e)}

    t0 = time.monotonic()
    results = await asyncio.gather(*(run(*p) for p in plan))
    return results, time.monotonic() - t0


def _greedy(p) -> str:
    r = p.http.post("/v1/completions", json={"model": p.model, "prompt": "The three primary colors are",
                                             "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _warm_structured_output(p) -> None:
    """The server starts its grammar threads (compile pool, fill and deferred-sampling threads)
    on the first constrained requests: start them before the thread count is taken, with as
    many constrained requests at once as the storm runs."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> int:
        r = p.http.post("/v1/chat/completions", json={
            "model": p.model, "max_tokens": 12, "temperature": 0, "response_format": {"type": "json_object"},
            "messages": [{"role": "user", "content": f"Describe item {i} as JSON."}]})
        return r.status_code
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        assert set(pool.map(one, range(2 * CONCURRENCY))) == {200}


def test_abort_storm(make_server, monkeypatch):
    monkeypatch.setenv("MINIINFER_DEFER_MIN_ROWS", "2")  # the server defers at the storm's few grammar rows too
    p = make_server()
    reference = _greedy(p)
    _warm_structured_output(p)
    p.assert_idle_everywhere()
    deferred0 = p.stats()["num_deferred_steps_total"]
    time.sleep(0.5)
    fds0, threads0, rss0 = p.num_fds(), p.threads(), p.rss_kb()
    m0 = p.metrics()
    mark = p.log_mark()

    cpu0 = p.cpu_s()
    results, wall = asyncio.run(_storm(p.port, p.model, N_REQUESTS, seed=1234))
    cpu_s = p.cpu_s() - cpu0
    requested = sum(r.pop("max_tokens") for r in results)

    t_idle = time.monotonic()
    s = p.wait_idle(timeout=120)
    idle_s = time.monotonic() - t_idle
    s = p.assert_idle_everywhere()
    m1 = p.metrics()
    deadline = time.monotonic() + 10  # closed sockets leave the server's table asynchronously
    while p.num_fds() > fds0 and time.monotonic() < deadline:
        time.sleep(0.2)
    fds1, threads1, rss1 = p.num_fds(), p.threads(), p.rss_kb()
    after = _greedy(p)

    kinds = Counter(r["kind"] for r in results)
    errors = [r for r in results if r["error"]]
    client_5xx = sum(1 for r in results if r["status"] and r["status"] >= 500)
    bad_status = [r for r in results if r["status"] not in (None, 200)]
    complete = [r for r in results if r["kind"] == "complete"]
    log_5xx = p.log_5xx(mark)
    metric_5xx = http_5xx_metric(m1) - http_5xx_metric(m0)
    problems = p.log_problems(mark)
    generated = metric(m1, "miniinfer:generation_tokens_total") - metric(m0, "miniinfer:generation_tokens_total")
    report("abort_storm", requests=len(results), aborts=len(results) - len(complete),
           kinds=dict(kinds), concurrency=CONCURRENCY, client_errors=len(errors),
           client_5xx=client_5xx, log_5xx=log_5xx, metric_5xx=metric_5xx,
           leaked_blocks=s["num_kv_blocks"] - s["num_free_kv_blocks"], num_kv_blocks=s["num_kv_blocks"],
           running=s["num_requests_running"], waiting=s["num_requests_waiting"],
           fds=[fds0, fds1], threads=[threads0, threads1], rss_mb=[rss0 // 1024, rss1 // 1024],
           generated_tokens=int(generated), requested_max_tokens=requested, storm_s=round(wall, 1), server_cpu_s=round(cpu_s, 1), idle_after_s=round(idle_s, 2), log_problems=len(problems))

    assert not errors, [(r["kind"], r["error"]) for r in errors[:5]]
    assert client_5xx == 0 and log_5xx == 0 and metric_5xx == 0
    assert not bad_status, bad_status[:5]
    assert all(r["status"] == 200 and r["done"] for r in complete), [r for r in complete if not r["done"]][:5]
    assert sum(1 for r in results if r["kind"] == "mid_stream" and r["events"] > 0) > 0
    assert not problems, "\n".join(problems[:20])
    assert fds1 <= fds0 + 2, (fds0, fds1)  # a leak per request would show as hundreds
    assert threads1 <= threads0 + 2, (threads0, threads1)
    assert generated < 0.5 * requested, (generated, requested)  # the cut requests were really stopped
    assert after == reference
    assert p.stats()["num_deferred_steps_total"] > deferred0  # deferred steps were cut too
