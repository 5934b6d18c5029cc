"""Side-by-side plot: MiniInfer before / after against vLLM, measured in one lease.

    python benchmarks/plot_sbs.py [--results benchmarks/results] [--out docs/img]

Reads the newest ``*-sbs-*.json`` result (``benchmarks/results/<date>-sbs-<card>-<tag>.json``,
metrics ``<metric>``, ``<metric>_before`` and ``<metric>_vllm`` per row; optional variants
``<metric>_pdl_off``, ``<metric>_prefill_triton`` and ``<metric>_fp8_kv``) and writes ``docs/img/<file stem>.png``
(the session-8 file's plot is ``docs/img/sbs_vs_vllm.png``): per row, MiniInfer's speed relative
to vLLM's (vLLM time ÷ MiniInfer time for ``*_ms`` rows, MiniInfer ÷ vLLM for ``*_tok_s`` rows:
above 1 is faster), before and after. Called by ``benchmarks/plot.py`` too."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = {
    "offline_throughput_tok_s": "§1 Qwen3-0.6B\nthroughput",
    "qwen2_0.5b_offline_throughput_tok_s": "§1 Qwen2-0.5B\nthroughput",
    "qwen2_7b_offline_throughput_tok_s": "§1 Qwen2-7B\nthroughput",
    "qwen2_0.5b_bs1_tpot_ms": "Qwen2-0.5B\nbs-1 TPOT",
    "qwen2_0.5b_ttft_128_ms": "Qwen2-0.5B\nTTFT 128",
    "qwen2_0.5b_ttft_1024_ms": "Qwen2-0.5B\nTTFT 1024",
    "qwen2_0.5b_prefix_wall_ms": "§5 shared\nprefix wall",
    "qwen2_7b_bs1_tpot_ms": "Qwen2-7B\nbs-1 TPOT",
    "qwen2_7b_ttft_128_ms": "Qwen2-7B\nTTFT 128",
    "qwen2_7b_ttft_16384_ms": "Qwen2-7B\nTTFT 16k",
    "qwen2_7b_tpot_at_16384_ms": "Qwen2-7B\nTPOT at 16k",
    "qwen3_long_offline_throughput_tok_s": "Qwen3-0.6B\nlong prompts",
}


SERIES = (("_before", "before", "#9e9e9e"), ("_pdl_off", "after, MINIINFER_PDL=0", "#9e9e9e"), ("_prefill_triton", "after, prefill_attention=triton", "#90caf9"),
          ("", "after (default)", "#1565c0"), ("_fp8_kv", "after, fp8 KV cache", "#2e7d32"))
LEGACY = {"2026-11-30-sbs-h200x2-session8": "sbs_vs_vllm"}  # image name kept for the committed doc


def speed_vs_vllm(metric: str, value: float, vllm: float) -> float:
    """MiniInfer's speed ÷ vLLM's: >1 is faster (times invert, throughputs don't)."""
    return vllm / value if metric.endswith("_ms") else value / vllm


def plot(path: str, out_dir: str) -> str:
    with open(path) as f:
        data = json.load(f)
    m = data["metrics"]
    rows = [k for k in LABELS if k in m and f"{k}_vllm" in m]
    fig, ax = plt.subplots(figsize=(1.4 + 1.5 * len(rows), 3.8))
    series = [s for s in SERIES if any(k + s[0] in m for k in rows)]
    width = 0.8 / len(series)
    seen = set()
    for i, k in enumerate(rows):
        for j, (suffix, tag, color) in enumerate(series):
            if k + suffix not in m:
                continue
            v = speed_vs_vllm(k, float(m[k + suffix]), float(m[k + "_vllm"]))
            x = i + (j - (len(series) - 1) / 2) * width
            ax.bar(x, v, width=width, color=color, label=tag if tag not in seen else None)
            seen.add(tag)
            ax.annotate(f"{v:.2f}", (x, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.axhline(1.0, color="#c62828", linestyle="--", linewidth=1, label="vLLM 0.24")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([LABELS[k] for k in rows], fontsize=8)
    ax.set_ylabel("speed ÷ vLLM's (>1: faster)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    ax.set_title(f"MiniInfer vs vLLM 0.24 (bf16 KV), one lease, {data['date']} ({data['device']})", fontsize=8)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(out_dir, LEGACY.get(stem, stem) + ".png")
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img"))
    a = ap.parse_args(argv)
    files = sorted(glob.glob(os.path.join(a.results, "*-sbs-*.json")))
    if not files:
        print("no side-by-side results: skipping sbs_vs_vllm.png")
        return 0
    plot(files[-1], a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
