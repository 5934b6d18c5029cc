"""``miniinfer bench cpu`` (§8) end to end on a tiny budget: every metric present and sane."""
from __future__ import annotations

from miniinfer.bench import offline


def test_cpu_bench_reports_ours_hf_and_ablations():
    m = offline.cpu(max_tokens=2, repeats=2, bf16=True)
    for key in ("cpu_throughput_tok_s", "cpu_hf_throughput_tok_s", "cpu_unpacked_throughput_tok_s",
                "cpu_bf16_throughput_tok_s", "cpu_throughput_ratio_vs_hf", "cpu_packed_weights_gain",
                "cpu_gguf_kernels_off_throughput_tok_s", "cpu_gguf_kernels_gain"):
        assert m[key] > 0, key
    # 16 prompts x 2 tokens on both sides (an early EOS would only shorten it)
    assert 16 <= m["cpu_output_tokens"] <= 32 and 16 <= m["cpu_hf_output_tokens"] <= 32
    assert m["cpu_wall_s_min"] <= m["cpu_wall_s"] <= m["cpu_wall_s_max"]
    assert m["cpu_hf_wall_s_min"] <= m["cpu_hf_wall_s"] <= m["cpu_hf_wall_s_max"]
    assert abs(m["cpu_throughput_ratio_vs_hf"] - m["cpu_throughput_tok_s"] / m["cpu_hf_throughput_tok_s"]) < 1e-9
    assert all(isinstance(v, (int, float)) for v in m.values())  # the result format: name -> number
