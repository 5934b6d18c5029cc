"""The Prometheus collector and the dashboard numbers read the engine's stats: speculative
decoding's counters (vLLM's names plus draft / verify time) appear only with speculation."""
from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest

from miniinfer.server.metrics import ServerMetrics

BASE = {"num_running": 1, "num_waiting": 0, "kv_cache_usage": 0.5, "prompt_tokens_total": 10,
        "generation_tokens_total": 20, "prefix_cache_queries": 10, "prefix_cache_hits": 0, "num_preemptions": 0,
        "num_kv_blocks": 8, "num_free_kv_blocks": 4}
SPEC = {"spec_num_drafts": 5, "spec_num_draft_tokens": 15, "spec_num_accepted_tokens": 6,
        "spec_acceptance_rate": 0.4, "spec_mean_accepted_len": 2.2, "spec_draft_time_s": 0.25,
        "spec_verify_time_s": 1.5, "spec_draft_ms_per_step": 50.0, "spec_verify_ms_per_step": 300.0}


def _metrics(stats: dict) -> ServerMetrics:
    engine = SimpleNamespace(stats=lambda: stats, model_name="m", healthy=True, error=None, max_model_len=64,
                             state="ready")
    return ServerMetrics(engine, "m")


def test_spec_counters_and_dashboard():
    m = _metrics({**BASE, **SPEC})
    text = generate_latest(m.registry).decode()
    assert 'miniinfer:spec_decode_draft_time_seconds_total{model_name="m"} 0.25' in text
    assert 'miniinfer:spec_decode_verify_time_seconds_total{model_name="m"} 1.5' in text
    assert 'miniinfer:spec_decode_num_accepted_tokens_total{model_name="m"} 6.0' in text
    d = m.dashboard()
    assert d["spec_draft_ms_per_step"] == 50.0 and d["spec_verify_ms_per_step"] == 300.0


def test_no_spec_series_without_speculation():
    m = _metrics(dict(BASE))
    assert "spec_decode" not in generate_latest(m.registry).decode()
    assert m.dashboard()["spec_acceptance_rate"] is None
