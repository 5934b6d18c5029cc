"""``benchmarks/spec_grammar_bench.py`` (§12) end to end on CPU in its --quick mode: the embedded
SmolLM2 with EAGLE and n-gram, JSON-schema requests with the verify mask overlapped and serial,
unconstrained speculation and constrained decoding without it; the result file has the §12
metrics, and the constrained requests did speculate with verify masks."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("xgrammar")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def test_spec_grammar_bench_quick(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "spec_grammar_bench.py"), "--quick",
                           "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads(out.read_text())
    assert set(result) >= {"device", "date", "command", "metrics"}
    assert result["device"].startswith("cpu")
    m = result["metrics"]
    assert all(isinstance(v, (int, float)) for v in m.values())  # the result format: name -> number
    for key in ("spec_json_tpot_ms_overlap", "spec_json_tpot_ms_serial", "spec_json_tpot_cut",
                "spec_json_req_s_overlap", "spec_json_req_s_serial", "spec_json_overhead"):
        assert math.isfinite(m[key]), key  # the unprefixed §12 names: SmolLM2 + EAGLE, batch 1
        assert m[key] == m["smollm2_eagle_bs1_" + key]
    for method in ("eagle", "ngram"):
        for bs in (1, 2):  # --quick's batch sizes
            p = f"smollm2_{method}_bs{bs}_"
            for key in ("spec_json_tpot_ms_overlap", "spec_json_tpot_ms_serial", "spec_plain_tpot_ms",
                        "json_nospec_tpot_ms", "spec_json_req_s_overlap", "spec_json_req_s_serial",
                        "spec_plain_req_s", "json_nospec_req_s", "spec_json_overhead",
                        "spec_json_speedup_vs_nospec", "spec_json_req_s_gain",
                        "spec_json_mask_fill_us_p50_overlap", "spec_json_mask_fill_us_p99_overlap",
                        "spec_json_mask_fill_us_p50_serial", "json_nospec_mask_fill_us_p50",
                        "spec_json_mean_output_tokens_overlap"):
                v = m[p + key]
                assert math.isfinite(v) and v > 0, (p + key, v)
            assert math.isfinite(m[p + "spec_json_tpot_cut"])
            assert abs(m[p + "spec_json_tpot_cut"]
                       - (1 - m[p + "spec_json_tpot_ms_overlap"] / m[p + "spec_json_tpot_ms_serial"])) < 1e-3
            assert abs(m[p + "spec_json_overhead"]
                       - m[p + "spec_json_tpot_ms_overlap"] / m[p + "spec_plain_tpot_ms"]) < 1e-3
            for sfx in ("_overlap", "_serial"):
                assert 0 <= m[p + "spec_json_acceptance_rate" + sfx] <= 1
                assert m[p + "spec_json_mask_fill_us_p50" + sfx] <= m[p + "spec_json_mask_fill_us_p99" + sfx]
                assert m[p + "spec_json_valid_json_frac_of_stopped" + sfx] == 1.0
            for key in ("spec_json_mean_accepted_len_overlap", "spec_json_mean_accepted_len_serial",
                        "spec_plain_mean_accepted_len", "spec_json_verify_mask_fill_us_p50_overlap"):
                assert key and p + key in m, p + key
        # over both batch sizes, the constrained requests speculated: verify masks were filled
        assert sum(m[f"smollm2_{method}_bs{bs}_spec_json_verify_mask_fills_overlap"] for bs in (1, 2)) > 0
        assert sum(m[f"smollm2_{method}_bs{bs}_spec_json_drafts_overlap"] for bs in (1, 2)) > 0
