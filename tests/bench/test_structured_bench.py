"""``benchmarks/structured_output_bench.py`` (§10) end to end on CPU in its --quick mode: a small
stand-in tokenizer from ``benchmarks/make_bench_tokenizer.py`` and a tiny Qwen2 config (dummy
weights); the result file has every metric, and the overheads are positive numbers."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def test_structured_bench_quick(tmp_path):
    tok = tmp_path / "tok"
    # a 4k-token byte-level BPE (Qwen2's special tokens at 4000-4002) from 4 MB of stdlib text: ~3 s
    subprocess.run([sys.executable, os.path.join(BENCH, "make_bench_tokenizer.py"), str(tok),
                    "--vocab-size", "4000", "--max-corpus-mb", "4"], check=True, capture_output=True, timeout=120)
    stats = json.loads((tok / "bench_tokenizer_stats.json").read_text())
    assert stats["vocab_size"] == 4003 and stats["special_token_ids"]["<|im_end|>"] == 4002

    model = tmp_path / "Qwen2-Tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 4096,  # padded, as Qwen2's
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "bos_token_id": 4000, "eos_token_id": 4000}))
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "structured_output_bench.py"), "--quick",
                           "--device", "cpu", "--model-dir", str(model), "--tokenizer", str(tok),
                           "--max-tokens", "16", "--out", str(out)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**os.environ, "MINIINFER_DEFER_MIN_ROWS": "1"})  # defer even at batch 1
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads(out.read_text())
    assert set(result) >= {"device", "date", "command", "metrics"}
    assert result["device"].startswith("cpu")
    m = result["metrics"]
    for bs in (1, 4):  # --quick's batch sizes
        p = f"qwen2_tiny_bs{bs}_"
        for key in ("plain_tpot_ms", "json_tpot_ms", "json_tpot_ms_serial", "json_undeferred_tpot_ms",
                    "json_tpot_overhead", "json_tpot_overhead_undeferred",
                    "json_tpot_overhead_serial", "grammar_mask_fill_us_p50", "grammar_mask_fill_us_p99",
                    "plain_mean_output_tokens", "json_mean_output_tokens"):
            v = m[p + key]
            assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (p + key, v)
        assert m[p + "grammar_mask_fill_us_p50"] <= m[p + "grammar_mask_fill_us_p99"]
        assert m[p + "plain_mean_output_tokens"] == 16  # ignore_eos: the full max_tokens
        assert m[p + "json_deferred_same_tokens_frac"] == 1.0
        assert abs(m[p + "json_tpot_overhead"] - m[p + "json_tpot_ms"] / m[p + "plain_tpot_ms"]) < 1e-3
    for key in ("grammar_compile_ms_cold", "grammar_compile_ms_warm", "grammar_first_request_ms_cold",
                "grammar_first_request_ms_warm"):
        assert m["qwen2_tiny_" + key] > 0, key
    assert m["qwen2_tiny_grammar_compile_ms_warm"] < m["qwen2_tiny_grammar_compile_ms_cold"]  # a cache hit
    assert all(isinstance(v, (int, float)) for v in m.values())  # the result format: name -> number
    phases = result["details"]["host_phases_us_per_step"]  # benchmarks/step_phases.py
    for bs in (1, 4):
        for mode in ("plain", "json", "json_undeferred", "json_serial"):
            ph = phases[f"qwen2_tiny_bs{bs}"][mode]
            assert ph["steps"] >= 16 and ph["step"] > 0 and ph["schedule"] > 0 and ph["process"] > 0, (bs, mode, ph)
            assert (ph.get("grammar_wait", 0) > 0) == (mode == "json"), (bs, mode, ph)  # the grammar thread's join
            parts = sum(ph.get(k, 0) for k in ("schedule", "prepare", "run", "sample", "collect", "process",
                                               "grammar_wait"))
            assert parts <= ph["step"] * 1.05, (bs, mode, ph)  # nested in step(): the parts fit in it
