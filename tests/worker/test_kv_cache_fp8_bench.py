"""benchmarks/fp8_kv_bench.py --quick runs on CPU (the fp8 cache swapped in, torch backend)
and reports a small fp8-vs-fp32-cache logit error (a few seconds)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fp8_kv_bench_quick_on_cpu(tmp_path):
    out = tmp_path / "fp8.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fp8_kv_bench.py"), "--quick",
                           "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc) >= {"device", "date", "command", "metrics"}
    m = doc["metrics"]
    assert m["tiny_qwen3_fp8_kv_cache_dtype"] == "torch.float8_e4m3fn"
    assert 0 < m["tiny_qwen3_fp8_kv_logits_rel_err"] < 0.1  # fp8 rounding: not zero, not broken
    assert m["tiny_qwen3_fp8_kv_top1_agree"] > 0.8
