"""``miniinfer bench serve`` end to end against a fake-engine server (fast)."""
from __future__ import annotations

import json
import math
import os

import pytest
from srv_fake_engine import FakeEngine
from srv_harness import API_KEY, ThreadServer

from miniinfer.bench import serve as bench


def test_helpers():
    assert bench._rates("4,16,inf") == [4.0, 16.0, math.inf]
    assert [bench.rate_label(r) for r in (4.0, 0.5, math.inf)] == ["4", "0p5", "inf"]
    assert bench._pct([1, 2, 3, 4], 50) == 2.5 and bench._pct([5], 99) == 5
    work = bench.build_workload(20, (10, 20), (3, 9), 0, (100, 200), max_model_len=25)
    assert len(work) == 20
    assert all(10 <= len(p) <= 20 and 1 <= n <= 9 and len(p) + n <= 25 for p, n in work)
    assert all(100 <= t < 200 for p, _ in work for t in p)
    assert work == bench.build_workload(20, (10, 20), (3, 9), 0, (100, 200), max_model_len=25)
    with pytest.raises(SystemExit):
        bench._pair("5", "--input-len-range")
    with pytest.raises(SystemExit):
        bench._rates("0")


def test_bench_serve_end_to_end(tmp_path):
    with ThreadServer(lambda: FakeEngine(step_time=0.002, max_model_len=512), api_key=API_KEY) as srv:
        out_json, out_png = tmp_path / "serve.json", tmp_path / "serve.png"
        rc = bench.main(["--base-url", srv.base_url, "--api-key", API_KEY, "--num-requests", "12",
                         "--request-rates", "50,inf", "--input-len-range", "10,40", "--output-len-range", "4,12",
                         "--vocab-range", "97,122", "--seed", "1", "--json", str(out_json),
                         "--plot", str(out_png), "--no-progress"])
        assert rc == 0
        result = json.loads(out_json.read_text())
        assert set(result) == {"device", "date", "command", "metrics"}
        m = result["metrics"]
        for lab in ("50", "inf"):
            assert m[f"serve_rate{lab}_completed"] == 12 and m[f"serve_rate{lab}_failed"] == 0
            for key in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "itl_p99_ms",
                        "e2e_latency_p50_ms", "output_throughput_tok_s", "request_throughput_req_s",
                        "goodput_req_s"):
                assert m[f"serve_rate{lab}_{key}"] is not None and m[f"serve_rate{lab}_{key}"] >= 0, key
        # every request generated exactly its output length (ignore_eos)
        work = bench.build_workload(12, (10, 40), (4, 12), 1, (97, 122), 512)
        expected = sum(n for _, n in work)
        got = m["serve_rateinf_output_throughput_tok_s"] * m["serve_rateinf_duration_s"]
        assert abs(got - expected) < 1e-6 * expected + 1e-6
        assert os.path.getsize(out_png) > 10_000
        assert result["command"].startswith("miniinfer bench serve")
        assert API_KEY not in result["command"] and "--api-key REDACTED" in result["command"]
