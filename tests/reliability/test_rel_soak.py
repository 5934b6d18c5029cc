"""Soak: many short requests through the real-engine server, 4 at a time. The server's
resident memory (VmRSS of the subprocess) may not grow by 5 % or more after warm-up (the first
10 % of the requests), and the p99 latency of the last quarter must be within 1.2x that of the
second quarter. Every request must succeed, and the server must end idle with every KV block
free and as many open file descriptors and threads as after warm-up.

The workload repeats a fixed cycle of 20 request shapes (chat / completions, streamed or not,
greedy, 4-12 tokens), so every quarter sends the same work. The machine is shared (2 cores):
when the last quarter's p99 exceeds 1.2x, up to four more quarters are run and the best ratio
counts: a leak or a slowdown that grows with the number of requests served persists, a burst
of load from another process doesn't.

CI: 600 requests; ``MINIINFER_RELIABILITY_FULL=1``: 2,000 (the issue's number).
"""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from rel_harness import percentile, report, size

pytestmark = pytest.mark.timeout(900)

N_REQUESTS = size(600, 2000)
CONCURRENCY = 4
CYCLE = 20
MAX_RSS_GROWTH = 0.05
MAX_P99_RATIO = 1.2
EXTRA_QUARTERS = 4  # p99 of 150 requests is their second largest: one burst moves it (2 failed of 5 runs with 2)

SUBJECTS = ["cats", "rain", "bread", "rivers", "stars", "chess", "tea", "bikes", "snow", "maps"]


def _shape(i: int, model: str) -> tuple[str, dict]:
    k = i % CYCLE
    subject = SUBJECTS[k % len(SUBJECTS)]
    body = {"model": model, "temperature": 0, "max_tokens": 4 + (k % 5) * 2, "stream": k % 4 >= 2}
    if k % 2 == 0:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": f"One fact about {subject}."}]}
    return "/v1/completions", {**body, "prompt": f"A short note about {subject}:"}


async def _one(client: httpx.AsyncClient, path: str, body: dict) -> tuple[int, float]:
    t0 = time.perf_counter()
    if body["stream"]:
        async with client.stream("POST", path, json=body) as r:
            done = False
            async for line in r.aiter_lines():
                done = done or line == "data: [DONE]"
            status = r.status_code if done else -1
    else:
        r = await client.post(path, json=body)
        status = r.status_code
    return status, time.perf_counter() - t0


async def _batch(base_url: str, model: str, start: int, count: int) -> list[tuple[int, float]]:
    """Requests ``start .. start+count-1`` with CONCURRENCY in flight; results in request order."""
    out: list[tuple[int, float] | None] = [None] * count
    nxt = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal nxt
        while nxt < count:
            j = nxt
            nxt += 1
            path, body = _shape(start + j, model)
            out[j] = await _one(client, path, body)

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    return out  # type: ignore[return-value]


def test_soak(make_server):
    p = make_server()
    mark = p.log_mark()
    quarter = N_REQUESTS // 4
    warmup = N_REQUESTS // 10
    chunk = max(CYCLE, N_REQUESTS // 40)
    t0, cpu0 = time.monotonic(), p.cpu_s()
    results: list[tuple[int, float]] = []
    rss_trace: list[tuple[int, int]] = []
    rss_base = fds_base = threads_base = None
    while len(results) < N_REQUESTS:
        n = min(chunk, N_REQUESTS - len(results))
        results += asyncio.run(_batch(p.base_url, p.model, len(results), n))
        rss_trace.append((len(results), p.rss_kb()))
        if rss_base is None and len(results) >= warmup:
            rss_base, fds_base, threads_base = p.rss_kb(), p.num_fds(), p.threads()
    wall, cpu_s = time.monotonic() - t0, p.cpu_s() - cpu0
    rss_end = p.rss_kb()

    lat = [t for _, t in results]
    p99_q2 = percentile(lat[quarter:2 * quarter], 99)
    p99_last = [percentile(lat[3 * quarter:4 * quarter], 99)]
    extra = 0
    while p99_last[-1] / p99_q2 > MAX_P99_RATIO and min(p99_last) / p99_q2 > MAX_P99_RATIO and extra < EXTRA_QUARTERS:
        more = asyncio.run(_batch(p.base_url, p.model, N_REQUESTS + extra * quarter, quarter))
        results += more
        p99_last.append(percentile([t for _, t in more], 99))
        extra += 1
    ratio = min(p99_last) / p99_q2

    s = p.assert_idle_everywhere()
    time.sleep(0.5)
    fds_end, threads_end = p.num_fds(), p.threads()
    bad = [st for st, _ in results if st != 200]
    log_5xx, problems = p.log_5xx(mark), p.log_problems(mark)
    growth = (rss_end - rss_base) / rss_base
    report("soak", requests=len(results), concurrency=CONCURRENCY, failed=len(bad), log_5xx=log_5xx,
           leaked_blocks=s["num_kv_blocks"] - s["num_free_kv_blocks"],
           rss_mb_after_warmup=rss_base // 1024, rss_mb_end=rss_end // 1024,
           rss_mb_max=max(r for _, r in rss_trace) // 1024, rss_growth_pct=round(100 * growth, 2),
           rss_kb_per_request=round((rss_end - rss_base) / (N_REQUESTS - warmup), 2),
           p50_ms=round(1000 * percentile(lat, 50), 1),
           p99_q2_ms=round(1000 * p99_q2, 1), p99_last_ms=[round(1000 * x, 1) for x in p99_last],
           p99_ratio=round(ratio, 3), extra_quarters=extra, fds=[fds_base, fds_end],
           threads=[threads_base, threads_end], log_problems=len(problems), wall_s=round(wall, 1), server_cpu_s=round(cpu_s, 1),
           req_per_s=round(N_REQUESTS / wall, 1))
    assert not bad, f"{len(bad)} requests failed: {bad[:10]}"
    assert log_5xx == 0 and not problems, problems[:10]
    assert growth < MAX_RSS_GROWTH, rss_trace
    assert ratio <= MAX_P99_RATIO, (p99_q2, p99_last)
    assert fds_end <= fds_base + 2 and threads_end <= threads_base + 2, (fds_base, fds_end, threads_base, threads_end)
