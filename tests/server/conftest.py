"""Fixtures for the server tests: a fake-engine server (fast) and a real-engine server (live)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from srv_fake_engine import FakeEngine  # noqa: E402
from srv_harness import API_KEY, LIVE_MAX_MODEL_LEN, SubprocessServer, ThreadServer  # noqa: E402


@pytest.fixture(scope="module")
def fake_server():
    with ThreadServer(lambda: FakeEngine(step_time=0.002, max_model_len=512), api_key=API_KEY,
                      max_n=8, max_body_bytes=64 * 1024) as srv:
        yield srv


def _engine_importable() -> str | None:
    try:
        from miniinfer.engine.llm_engine import LLMEngine  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


@pytest.fixture(scope="session")
def live_server():
    """The real engine (embedded SmolLM2-135M) behind run_server, in a subprocess."""
    err = _engine_importable()
    if err is not None:
        pytest.skip(f"miniinfer.engine.llm_engine.LLMEngine is not importable: {err}")
    srv = SubprocessServer({"model": None, "max_model_len": LIVE_MAX_MODEL_LEN, "device": "cpu",
                            "max_num_seqs": 64, "kv_cache_memory_gb": 0.5},
                           api_key=API_KEY, max_n=8, timeout=300)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def client(live_server):
    """An openai SDK client of ``live_server`` (test modules with their own server define their own)."""
    import openai
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id
