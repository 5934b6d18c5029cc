"""Issue #15 scale-out: data-parallel replicas of ``miniinfer serve`` behind ``vllm-router`` (PyPI).

Live: two replicas of the embedded model (the ``miniinfer serve`` CLI, each in its own process
group) and the router, all on 127.0.0.1; a mixed stream of chat / completions, streaming and
not, goes through the router concurrently. Every request is answered once (200, non-empty
text), the replicas finish exactly as many requests as were sent, and both get some. Fast: the
router-support pieces (``router_endpoints``) against the fake-engine server.
docs/DEPLOYMENT.md is the recipe this test runs on one host.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from srv_harness import API_KEY, LIVE_MAX_MODEL_LEN, REPO_ROOT, free_port, wait_healthy

from miniinfer.server.router_endpoints import ROUTER_DEFAULT_FIELDS, strip_router_defaults

H = {"Authorization": f"Bearer {API_KEY}"}
N_REQUESTS = 32
SUCCESS = "miniinfer:request_success_total"


# --------------------------------------------------------------------------- fast: router support

def test_strip_router_defaults():
    body = {"model": "m", "prompt": "hi", **ROUTER_DEFAULT_FIELDS, "ignore_eos": False}
    assert json.loads(strip_router_defaults(json.dumps(body).encode())) == {"model": "m", "prompt": "hi",
                                                                            "ignore_eos": False}
    kept = json.dumps({"no_stop_trim": True, "separate_reasoning": 1}).encode()  # not the defaults
    assert json.loads(strip_router_defaults(kept)) == {"no_stop_trim": True, "separate_reasoning": 1}
    for raw in (b'{"prompt": "hi"}', b"not json", b'["no_stop_trim"]'):
        assert strip_router_defaults(raw) is raw


def test_router_fields_through_the_server(fake_server):
    url = fake_server.base_url
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **ROUTER_DEFAULT_FIELDS}
    r = httpx.post(url + "/v1/chat/completions", json=chat, headers=H, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True,
                                                  "no_stop_trim": False, "return_hidden_states": False},
                   headers=H, timeout=30)
    assert r.status_code == 200 and "[DONE]" in r.text, r.text
    # another value is still a field this server does not support: a 400 naming it
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "no_stop_trim": True}, headers=H, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "no_stop_trim", r.text
    # the API key is still checked first
    assert httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=30).status_code == 401


def test_get_load(fake_server):
    r = httpx.get(fake_server.base_url + "/get_load", timeout=30)
    assert r.status_code == 200 and r.json() == {"load": 0}


# --------------------------------------------------------------------------- live: 2 replicas + router

class ProcessGroup:
    """A command in its own session (process group), output to a temp log; ``close`` ends the
    whole group: SIGTERM, then SIGKILL after ``grace`` seconds."""

    def __init__(self, name: str, argv: list[str]) -> None:
        env = dict(os.environ)
        env.pop("MINIINFER_API_KEY", None)
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        fd, self.log_path = tempfile.mkstemp(prefix=f"miniinfer-{name}-", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_tail(self, n: int = 3000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-n:]

    def close(self, grace: float = 10.0) -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self._log.close()
        os.unlink(self.log_path)


def _replica_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "miniinfer.entrypoints.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--api-key", API_KEY, "--device", "cpu", "--max-model-len", str(LIVE_MAX_MODEL_LEN),
            "--max-num-seqs", "32", "--kv-cache-memory-gb", "0.5", "--shutdown-grace", "2"]


def _router_argv(port: int, workers: list[str]) -> list[str]:
    # the command line of docs/DEPLOYMENT.md; round_robin makes "both replicas get traffic" certain
    return [sys.executable, "-m", "vllm_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *workers, "--policy", "round_robin",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--health-check-interval-secs", "5", "--log-level", "warning"]


def _wait_router(url: str, proc: ProcessGroup, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"router exited ({proc.proc.returncode}):\n{proc.log_tail()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"router not healthy after {timeout}s:\n{proc.log_tail()}")


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("vllm_router", reason="vllm-router is not installed (the test extra has it)")
    ports = [free_port() for _ in range(2)]
    procs: list[ProcessGroup] = []
    try:
        replicas = [f"http://127.0.0.1:{p}" for p in ports]
        for i, p in enumerate(ports):
            procs.append(ProcessGroup(f"replica{i}", _replica_argv(p)))
        for url, proc in zip(replicas, procs):
            try:
                wait_healthy(url, 240, proc.proc)
            except Exception as e:
                raise RuntimeError(f"{e}\n--- replica log ---\n{proc.log_tail()}") from e
        router_url = f"http://127.0.0.1:{free_port()}"
        procs.append(ProcessGroup("router", _router_argv(int(router_url.rsplit(":", 1)[1]), replicas)))
        _wait_router(router_url, procs[-1])
        yield router_url, replicas
    finally:
        for proc in reversed(procs):
            proc.close()


def _finished(replica: str) -> float:
    text = httpx.get(replica + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(SUCCESS + "{"))


def _one(router: str, model: str, i: int) -> tuple[int, int, str]:
    """Request ``i`` of the mix (chat / completion x stream / not): (i, status, text)."""
    chat, stream = i % 2 == 0, i % 4 >= 2
    body: dict = {"model": model, "max_tokens": 8, "temperature": 0, "stream": stream}
    if chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": f"Say a word about the number {i}."}]
    else:
        path = "/v1/completions"
        body["prompt"] = f"Request {i}: once upon a time"
    with httpx.Client(timeout=120) as c:
        if not stream:
            r = c.post(router + path, json=body, headers=H)
            if r.status_code != 200:
                return i, r.status_code, r.text
            choice = r.json()["choices"][0]
            return i, 200, choice["message"]["content"] if chat else choice["text"]
        text, done = "", False
        with c.stream("POST", router + path, json=body, headers=H) as r:
            if r.status_code != 200:
                return i, r.status_code, r.read().decode()
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                for ch in json.loads(line[6:]).get("choices", []):
                    text += (ch.get("delta", {}).get("content") or "") if chat else ch.get("text", "")
        return i, 200 if done else -1, text


def test_two_replicas_behind_router(cluster):
    router, replicas = cluster
    r = httpx.get(router + "/v1/models", headers=H, timeout=30)  # proxied to a replica
    assert r.status_code == 200, r.text
    model = r.json()["data"][0]["id"]
    before = [_finished(u) for u in replicas]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: _one(router, model, i), range(N_REQUESTS)))

    assert sorted(i for i, _, _ in results) == list(range(N_REQUESTS))
    bad = [(i, status, text[:200]) for i, status, text in results if status != 200 or not text.strip()]
    assert not bad, bad
    # exactly once: the replicas finished as many requests as were sent (no retried duplicates)
    deadline = time.monotonic() + 10
    while True:
        served = [_finished(u) - b for u, b in zip(replicas, before)]
        if sum(served) >= N_REQUESTS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(served) == N_REQUESTS, served
    assert all(n > 0 for n in served), f"a replica got no traffic: {served}"
    for u in replicas:  # the power_of_two policy's load probe; idle again
        assert httpx.get(u + "/get_load", timeout=30).json() == {"load": 0}
