"""Issue #11 reliability: schema fuzzing of the HTTP server with schemathesis.

Every route of the app's OpenAPI schema (the two generation routes describe their JSON
bodies through ``openapi_extra``, see ``protocol.openapi_request_body``) gets requests
generated from the schema: schema-valid bodies (``positive``) and bodies that break the
schema (``negative``: wrong types, unknown fields, out-of-range values, bad UTF-8, ...).
The requests are generated first (hypothesis, seeded), then sent ``CONCURRENCY`` (8) at a
time with the routes interleaved; the GET routes take no input, so their few distinct
requests are repeated up to their share and act as probes under load. No response may be
a 5xx (nor an SSE stream that carries a 5xx error event), every request must be answered
within ``MINIINFER_FUZZ_REQUEST_TIMEOUT`` (120 s; longer is a hang), and afterwards the
server is alive, serves a normal request, and its engine is idle with every KV block free.

Two runs:

* ``test_fuzz_fake_engine``: ``MINIINFER_FUZZ_EXAMPLES`` requests (default 1000) against the
  fake engine (tests/server/srv_fake_engine.py: the real input processor, scripted tokens)
  with a 64-token context, ``n`` up to 4;
* ``test_fuzz_real_engine``: ``MINIINFER_FUZZ_REAL_EXAMPLES`` requests (default 240) against
  the real engine (embedded SmolLM2-135M on CPU, ``max_model_len=64``, ``n`` up to 2,
  ``max_tokens`` capped at ``MINIINFER_FUZZ_REAL_MAX_TOKENS``, default 8, to bound CPU time; 0
  lifts the cap), then the engine's ``check_integrity()``.

Each run is also bounded in time (``MINIINFER_FUZZ_SECONDS``, default 150 s per run); the
seed is ``MINIINFER_FUZZ_SEED`` (default 0, so CI is reproducible). A longer run:
``MINIINFER_FUZZ_EXAMPLES=10000 MINIINFER_FUZZ_REAL_EXAMPLES=1000 MINIINFER_FUZZ_SECONDS=1200
MINIINFER_FUZZ_SEED=7 pytest -s tests/server/test_fuzz.py`` (``-s`` prints the figures).
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import threading
import time
from collections.abc import Callable

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from srv_fake_engine import FakeEngine  # noqa: E402
from srv_harness import API_KEY, ThreadServer  # noqa: E402

H = {"Authorization": f"Bearer {API_KEY}"}
EXAMPLES = int(os.environ.get("MINIINFER_FUZZ_EXAMPLES", "1000"))
REAL_EXAMPLES = int(os.environ.get("MINIINFER_FUZZ_REAL_EXAMPLES", "240"))
SECONDS = float(os.environ.get("MINIINFER_FUZZ_SECONDS", "150"))
SEED = int(os.environ.get("MINIINFER_FUZZ_SEED", "0"))
REQUEST_TIMEOUT = float(os.environ.get("MINIINFER_FUZZ_REQUEST_TIMEOUT", "120"))  # longer: a hang
CONCURRENCY = int(os.environ.get("MINIINFER_FUZZ_CONCURRENCY", "8"))
MAX_MODEL_LEN = 64
MAX_N = 4

ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/version", "/metrics",
          "/api/stats", "/"]
# Share of the budget per (route, mode); the GET routes take no input, so a few each suffice
# (hypothesis stops early once it has generated every distinct request).
# The GET requests are repeated up to their share, sent amid the POSTs (probes under load).
SHARES = {("POST", "/v1/chat/completions"): 0.47, ("POST", "/v1/completions"): 0.47}
GET_SHARE = 0.01


class Report:
    """What the fuzz sent and got back."""

    def __init__(self) -> None:
        self.statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.failures: list[str] = []
        self.sent = 0

    def record(self, label: str, status: int | str, case, detail: str = "") -> None:
        self.sent += 1
        self.statuses[label][status] += 1
        bad = status == "timeout" or isinstance(status, str) or status >= 500
        if bad and len(self.failures) < 20:
            self.failures.append(f"{label} -> {status} {detail[:300]}\n    {case.as_curl_command()}")

    def summary(self, name: str, wall: float) -> str:
        total = collections.Counter()
        lines = [f"[fuzz {name}] {self.sent} requests in {wall:.1f} s (seed {SEED})"]
        for label in sorted(self.statuses):
            c = self.statuses[label]
            total.update(c)
            lines.append(f"  {label:42s} {sum(c.values()):5d}  {dict(sorted(c.items(), key=str))}")
        lines.append(f"  {'all':42s} {sum(total.values()):5d}  {dict(sorted(total.items(), key=str))}")
        return "\n".join(lines)


def _sse_error(text: str) -> str | None:
    """The first 5xx error event of an SSE body, if any."""
    for event in text.split("\n\n"):
        if not event.startswith("data: {"):
            continue
        try:
            obj = json.loads(event[6:])
        except ValueError:
            return f"malformed SSE event: {event[:200]!r}"
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict) and isinstance(err.get("code"), int) and err["code"] >= 500:
            return event
    return None


def _budget(op_key: tuple[str, str], total: int) -> int:
    share = SHARES.get(op_key)
    if share is None:
        return max(2, round(total * GET_SHARE))
    return max(10, round(total * share))


def _generate(schema, total: int) -> list[tuple[str, object]]:
    """The requests, generated up front (hypothesis, seeded): ``(label, case)`` in route order."""
    cases: list[tuple[str, object]] = []
    ops = [r.ok() for r in schema.get_all_operations()]
    assert sorted(op.path for op in ops) == sorted(ROUTES)
    for op in ops:
        n = _budget((op.method.upper(), op.path), total)
        post = op.method.upper() == "POST"
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if post else [GenerationMode.POSITIVE]
        for mode in modes:
            label = f"{op.method.upper()} {op.path} {mode.value}"

            @seed(SEED)
            @settings(max_examples=max(1, n // len(modes)), deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                      print_blob=False)
            @given(case=op.as_strategy(generation_mode=mode))
            def collect(case) -> None:
                cases.append((label, case))

            before = len(cases)
            collect()
            got = cases[before:]
            if not post:  # no input to vary: repeat the distinct requests up to the budget
                cases.extend(got[i % len(got)] for i in range(len(got), n))
    return cases


def run_fuzz(srv: ThreadServer, total: int, seconds: float, name: str,
             prepare: Callable[[object], None] | None = None) -> Report:
    """Send ``total`` generated requests (about; see ``_budget``), ``CONCURRENCY`` at a time,
    until done or ``seconds`` have passed. ``prepare`` may edit each case before it is sent."""
    raw = srv.app.openapi()
    assert sorted(raw["paths"]) == sorted(ROUTES), sorted(raw["paths"])
    for path in ("/v1/chat/completions", "/v1/completions"):  # the bodies are described
        body = raw["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["additionalProperties"] is False and "$defs" not in json.dumps(body)
    t0 = time.monotonic()
    cases = _generate(schemathesis.openapi.from_dict(raw), total)
    t_gen = time.monotonic() - t0
    deadline = t0 + seconds
    report = Report()
    lock = threading.Lock()

    def send(item: tuple[str, object]) -> None:
        label, case = item
        if time.monotonic() > deadline:
            return
        if prepare is not None:
            prepare(case)
        try:
            resp = case.call(base_url=srv.base_url, headers=H, timeout=REQUEST_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - a hang (timeout) or a dropped connection
            with lock:
                report.record(label, "timeout" if "timed out" in str(e).lower() else type(e).__name__,
                              case, str(e))
            return
        status: int | str = resp.status_code
        detail = resp.text if resp.status_code >= 500 else ""
        if resp.status_code < 500 and "text/event-stream" in resp.headers.get("content-type", [""])[0]:
            err = _sse_error(resp.text)
            if err is not None:
                status, detail = "sse-5xx", err
        with lock:
            report.record(label, status, case, detail)

    # interleave the routes so that the time bound, if hit, cuts every route alike
    order = sorted(range(len(cases)), key=lambda i: (i * 7919) % len(cases))
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(send, [cases[i] for i in order]))
    wall = time.monotonic() - t0
    print("\n" + report.summary(name, wall) + f"\n  (generation {t_gen:.1f} s, concurrency {CONCURRENCY})")
    return report


def _alive_and_idle(srv: ThreadServer, timeout: float = 60.0) -> dict:
    r = httpx.get(srv.base_url + "/health", timeout=10)
    assert r.status_code == 200, r.text
    r = httpx.post(srv.base_url + "/v1/completions", headers=H, timeout=120,
                   json={"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + timeout
    while True:
        s = srv.engine.stats()
        if (s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_kv_blocks"] == s["num_kv_blocks"]
                and srv.engine.num_active_streams == 0):
            return s
        assert time.monotonic() < deadline, f"the engine did not return to idle: {s}"
        time.sleep(0.05)


def _check(report: Report, total: int) -> None:
    assert not report.failures, "5xx / hangs found:\n" + "\n".join(report.failures)
    routes = {label.split()[1] for label in report.statuses}
    assert routes == set(ROUTES), routes
    assert report.sent >= 0.95 * total, f"only {report.sent} of ~{total} requests sent (time bound hit?)"


@pytest.mark.timeout(int(SECONDS) + 450)  # the run, its generation and the model load
def test_fuzz_fake_engine():
    factory = lambda: FakeEngine(max_model_len=MAX_MODEL_LEN, step_time=0.0)  # noqa: E731
    with ThreadServer(factory, api_key=API_KEY, max_n=MAX_N, max_body_bytes=256 * 1024) as srv:
        t0 = time.monotonic()
        report = run_fuzz(srv, EXAMPLES, SECONDS, "fake engine")
        _check(report, EXAMPLES)
        _alive_and_idle(srv)
        print(f"[fuzz fake engine] total with checks {time.monotonic() - t0:.1f} s")


# the real engine's cap on max_tokens / max_completion_tokens (CPU time); 0: no cap
REAL_MAX_TOKENS = int(os.environ.get("MINIINFER_FUZZ_REAL_MAX_TOKENS", "8"))


def cap_tokens(case) -> None:
    """Keep real-engine requests cheap: an absent or larger (integer) max_tokens becomes
    ``REAL_MAX_TOKENS`` (the fake-engine run covers "the rest of the context")."""
    body = case.body
    if not isinstance(body, dict) or REAL_MAX_TOKENS <= 0:
        return
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if (key == "max_tokens" and key not in body) or (type(v) is int and v > REAL_MAX_TOKENS):
            body[key] = REAL_MAX_TOKENS


def _real_factory():
    from miniinfer.config import EngineConfig
    from miniinfer.engine.llm_engine import LLMEngine
    return LLMEngine(EngineConfig(model=None, max_model_len=MAX_MODEL_LEN, device="cpu", max_num_seqs=32,
                                  kv_cache_memory_gb=0.05))


@pytest.mark.timeout(int(SECONDS) + 450)  # the run, its generation and the model load
def test_fuzz_real_engine():
    try:
        from miniinfer.engine.llm_engine import LLMEngine  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the engine is not importable: {e}")
    srv = ThreadServer(_real_factory, wait=False, api_key=API_KEY, max_n=2, max_body_bytes=256 * 1024)
    try:
        from srv_harness import wait_healthy
        wait_healthy(srv.base_url, 300)
        t0 = time.monotonic()
        report = run_fuzz(srv, REAL_EXAMPLES, SECONDS, "real engine", prepare=cap_tokens)
        _check(report, REAL_EXAMPLES)
        _alive_and_idle(srv)
        srv.raw_engine.check_integrity()  # the engine thread is idle (blocked on its queue)
        print(f"[fuzz real engine] total with checks {time.monotonic() - t0:.1f} s")
    finally:
        srv.close()


def test_stop_string_length_bound():
    from miniinfer.server.protocol import MAX_STOP_LEN, APIError, CompletionRequest
    CompletionRequest(prompt="x", stop=["a" * MAX_STOP_LEN]).to_sampling_params(8)
    for stop in ("a" * (MAX_STOP_LEN + 1), ["ok", "b" * (MAX_STOP_LEN + 1)]):
        with pytest.raises(APIError) as e:
            CompletionRequest(prompt="x", stop=stop).to_sampling_params(8)
        assert e.value.status == 400 and e.value.param == "stop", e.value.message


@pytest.mark.parametrize("top_k,expected", [(2 ** 63, -1), (2 ** 70, -1), (2 ** 31, -1), (2 ** 31 - 1, 2 ** 31 - 1),
                                            (0, -1), (5, 5)])
def test_huge_top_k_means_disabled(top_k, expected):
    """Found by fuzzing the real engine: top_k >= 2**63 reached the sampler's int64 tensors (500)."""
    from miniinfer.server.protocol import CompletionRequest
    assert CompletionRequest(prompt="x", top_k=top_k).to_sampling_params(8).top_k == expected
