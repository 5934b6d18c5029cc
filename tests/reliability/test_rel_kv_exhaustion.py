"""KV exhaustion: a server with a tiny KV cache (16 blocks of 8 tokens = 128 tokens) gets 4x
more concurrent work than the cache holds. Every request must complete, the greedy outputs
must equal the same requests sent one at a time beforehand (no pressure: each fits the cache
alone, and no preemption may happen then), preemptions must show in ``/metrics``
(``miniinfer:num_preemptions_total``) and ``/api/stats``, and the server must end idle with
every block free.

Each request needs 8-11 blocks (a prompt of about 15-40 tokens + 48 generated, ``ignore_eos``),
so 8 concurrent requests ask for about 76 blocks, over 4x the 16 there are. CI: 1 round of 8 requests;
``MINIINFER_RELIABILITY_FULL=1``: 2 rounds (each with fresh prompts).
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from rel_harness import metric, report, size

pytestmark = pytest.mark.timeout(900)

NUM_KV_BLOCKS = 16
BLOCK_SIZE = 8
MAX_TOKENS = 48
PER_ROUND = 8  # x 8 blocks = 4x the cache
ROUNDS = size(1, 2)

TOPICS = ["the sea", "a mountain", "a small robot", "the moon", "an old library", "a busy market",
          "a winter morning", "a lost key", "a city at night", "a garden", "a violin", "a train trip"]


def _requests(round_: int) -> list[tuple[str, dict]]:
    out = []
    for j in range(PER_ROUND):
        topic = TOPICS[(round_ * PER_ROUND + j) % len(TOPICS)]
        tag = f"(story {round_}.{j})"
        body = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": j % 2 == 1}
        if j % 2 == 0:
            out.append(("/v1/chat/completions",
                        {**body, "messages": [{"role": "user", "content": f"{tag} Write a story about {topic}."}]}))
        else:
            out.append(("/v1/completions", {**body, "prompt": f"{tag} Here is a long story about {topic}:"}))
    return out


async def _send(client: httpx.AsyncClient, path: str, body: dict) -> tuple[int, str, str | None, int]:
    """(status, text, finish_reason, total tokens) of one request, streamed or not."""
    chat = path.endswith("chat/completions")
    if not body["stream"]:
        r = await client.post(path, json=body)
        if r.status_code != 200:
            return r.status_code, r.text, None, 0
        c = r.json()["choices"][0]
        return 200, c["message"]["content"] if chat else c["text"], c["finish_reason"], r.json()["usage"]["total_tokens"]
    text, finish, total = "", None, 0
    async with client.stream("POST", path, json={**body, "stream_options": {"include_usage": True}}) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread()).decode(), None, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                total = ev["usage"]["total_tokens"]
            for c in ev.get("choices", []):
                text += (c["delta"].get("content") or "") if chat else c["text"]
                finish = c.get("finish_reason") or finish
    return 200, text, finish, total


async def _run(base_url: str, reqs: list[tuple[str, dict]], concurrent: bool) -> list[tuple[int, str, str | None, int]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300,
                                 limits=httpx.Limits(max_connections=64)) as client:
        if concurrent:
            return list(await asyncio.gather(*(_send(client, p, b) for p, b in reqs)))
        return [await _send(client, p, b) for p, b in reqs]


def test_kv_exhaustion(make_server):
    p = make_server(num_kv_blocks=NUM_KV_BLOCKS, block_size=BLOCK_SIZE, max_model_len=NUM_KV_BLOCKS * BLOCK_SIZE)
    s = p.assert_idle_everywhere()
    assert s["num_kv_blocks"] == NUM_KV_BLOCKS
    mark = p.log_mark()
    demand = 0
    t0, cpu0 = time.monotonic(), p.cpu_s()
    totals = {"requests": 0, "preemptions": 0, "mismatches": 0}
    for round_ in range(ROUNDS):
        reqs = _requests(round_)
        pre0 = metric(p.metrics(), "miniinfer:num_preemptions_total")
        alone = asyncio.run(_run(p.base_url, reqs, concurrent=False))
        pre1 = metric(p.metrics(), "miniinfer:num_preemptions_total")
        assert pre1 == pre0, "a request alone must fit the cache without preemption"
        assert all(st == 200 and fin == "length" for st, _, fin, _ in alone), alone
        demand = sum(-(-n // BLOCK_SIZE) for *_, n in alone)
        assert demand >= 4 * NUM_KV_BLOCKS, demand
        p.wait_idle()

        t1 = time.monotonic()
        pressured = asyncio.run(_run(p.base_url, reqs, concurrent=True))
        totals["pressured_s"] = round(totals.get("pressured_s", 0) + time.monotonic() - t1, 1)
        p.wait_idle(timeout=120)
        m = p.metrics()
        pre2 = metric(m, "miniinfer:num_preemptions_total")
        stats = p.stats()
        assert stats["num_preemptions_total"] == pre2
        mismatches = [(i, a[1], b[1]) for i, (a, b) in enumerate(zip(alone, pressured)) if a[1] != b[1]]
        totals["requests"] += 2 * len(reqs)
        totals["preemptions"] += int(pre2 - pre1)
        totals["mismatches"] += len(mismatches)
        assert all(st == 200 and fin == "length" for st, _, fin, _ in pressured), pressured
        assert pre2 > pre1, "4x the cache's worth of concurrent work must preempt"
        assert not mismatches, mismatches[:3]
    s = p.assert_idle_everywhere()
    log_5xx, problems = p.log_5xx(mark), p.log_problems(mark)
    report("kv_exhaustion", num_kv_blocks=NUM_KV_BLOCKS, rounds=ROUNDS, concurrent_per_round=PER_ROUND,
           demand_blocks_per_round=demand, **totals,
           log_5xx=log_5xx, leaked_blocks=s["num_kv_blocks"] - s["num_free_kv_blocks"],
           log_problems=len(problems), wall_s=round(time.monotonic() - t0, 1),
           server_cpu_s=round(p.cpu_s() - cpu0, 1))
    assert log_5xx == 0 and not problems, problems[:10]
