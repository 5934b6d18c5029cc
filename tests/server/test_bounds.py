"""Issue #11 exposure: every size of a request is bounded (a 4xx naming the limit), the defaults
are safe (loopback, constant-time key check), and no socket carries pickles."""
from __future__ import annotations

import inspect
import pathlib
import re
import socket
import time

import httpx
import pytest
from srv_harness import API_KEY, REPO_ROOT

H = {"Authorization": f"Bearer {API_KEY}"}
MSG = [{"role": "user", "content": "hi"}]


def _post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, headers=H, timeout=30)


@pytest.mark.parametrize("path,body,param,limit", [
    ("/v1/completions", {"prompt": "x", "n": 9}, "n", "8"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 513}, "max_tokens", "512"),
    ("/v1/completions", {"prompt": "x", "stop": [str(i) for i in range(33)]}, "stop", "32"),
    ("/v1/completions", {"prompt": "x", "stop": "s" * 257}, "stop", "256"),
    ("/v1/completions", {"prompt": "x", "stop": ["ok", "s" * 257]}, "stop", "256"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs", "20"),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "300"),
    ("/v1/completions", {"prompt": ["x"] * 257}, "prompt", "256"),
    ("/v1/chat/completions", {"messages": MSG * 1025}, "messages", "1024"),
    ("/v1/completions", {"prompt": "x" * 600}, "prompt", "512"),
])
def test_size_bounds_400_name_the_limit(fake_server, path, body, param, limit):
    r = _post(fake_server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and limit in err["message"], err


def test_at_the_bounds_accepted(fake_server):
    assert _post(fake_server, "/v1/completions", {"prompt": "x", "n": 8, "max_tokens": 2}).status_code == 200
    assert _post(fake_server, "/v1/completions", {"prompt": "x", "max_tokens": 2,
                                                  "stop": ["s" * 256] * 32}).status_code == 200
    r = _post(fake_server, "/v1/chat/completions", {"messages": MSG * 1024, "max_tokens": 2})
    # 1,024 messages pass the count bound (this fake's 512-token context may still refuse the prompt)
    assert r.status_code == 200 or "1024" not in r.json()["error"]["message"]


def test_body_413(fake_server):
    r = httpx.post(fake_server.base_url + "/v1/completions", headers=H, timeout=30,
                   content=b'{"prompt": "' + b"x" * (70 * 1024) + b'"}')
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]


def test_huge_header_431_at_once(fake_server):
    """A 1 MB header is refused with an OpenAI-shaped 431 naming the limit, at once (h11 stops
    buffering at max_header_bytes), and the server goes on serving."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", fake_server.port), timeout=10) as c:
        try:
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        except OSError:  # the server may close before everything is sent
            pass
        data = b""
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                data += d
        except OSError:  # reset after the response
            pass
    assert time.monotonic() - t0 < 5
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), data[:200]
    assert b"16384 bytes" in body and b'"code": 431' in body
    r = httpx.get(fake_server.base_url + "/health", headers={"X-Big": "a" * (1 << 20)}, timeout=10)
    assert r.status_code == 431 and r.json()["error"]["code"] == 431
    assert httpx.get(fake_server.base_url + "/health", timeout=10).status_code == 200


def test_malformed_http_400_json(fake_server):
    with socket.create_connection(("127.0.0.1", fake_server.port), timeout=10) as c:
        c.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        data = c.recv(65536)
    assert data.startswith(b"HTTP/1.1 400") and b'"code": 400' in data


def test_api_key_compared_in_constant_time(fake_server, monkeypatch):
    import miniinfer.server.middleware as mw
    seen = []
    real = mw.secrets.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(mw.secrets, "compare_digest", spy)
    r = httpx.get(fake_server.base_url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and seen


def test_safe_defaults():
    from miniinfer.server import api_server
    sig = inspect.signature(api_server.run_server).parameters
    assert sig["host"].default == "127.0.0.1"  # loopback unless asked
    assert sig["request_timeout_s"].default is None and sig["shutdown_grace_s"].default == 30.0
    assert sig["max_header_bytes"].default == 16 * 1024 and sig["max_body_bytes"].default == 1 << 20
    cli = (pathlib.Path(REPO_ROOT) / "miniinfer/entrypoints/cli.py").read_text()
    assert re.search(r'add_argument\("--host", default="127\.0\.0\.1"\)', cli)


def test_no_pickle_on_any_socket():
    """The server speaks JSON; tensor-parallel ranks exchange tensors (torch.distributed
    broadcast / all_reduce / all_gather), never pickled objects."""
    root = pathlib.Path(REPO_ROOT) / "miniinfer"
    files = list((root / "server").glob("*.py")) + [root / "parallel.py", root / "worker" / "tp_worker.py"]
    banned = re.compile(r"import pickle|pickle\.|_object_list|send_object|recv_object|gather_object|scatter_object|"
                        r"broadcast_object|torch\.load|cloudpickle|import dill")
    for f in files:
        assert not banned.search(f.read_text()), f
