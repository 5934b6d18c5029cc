"""Plot of session 14's speculative-decoding results (§11 and §12) from the result files:

    python benchmarks/plot_spec.py --out docs/img/2026-12-01-session14.png

Left: EAGLE batch-1 speedup (TPOT off ÷ on, same process) with the session-7 head and the
retrained one (H200, same lease) and on the CPU (fp32, int8 activations). Right: §12, SmolLM2 +
EAGLE-2 tree + JSON schema, TPOT with the grammar work overlapped with the verify vs serial.
"""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _metrics(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)["metrics"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "img", "2026-12-01-session14.png"))
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = _metrics("2026-12-01-spec-decode-h200-session14.json")
    cpu = _metrics("2026-12-01-spec-decode-cpu-session14.json")
    sg = _metrics("2026-12-01-spec-grammar-h200-session14.json")
    bars = [("H200 chain k=3\nsession-7 head", gpu["eagle_bs1_speedup_gpu__old_head"], gpu["eagle_mean_accepted_len_gpu__old_head"]),
            ("H200 chain k=3\nretrained", gpu["eagle_bs1_speedup_gpu"], gpu["eagle_mean_accepted_len_gpu"]),
            ("H200 tree 4/4/10\nsession-7 head", gpu["eagle_tree_bs1_speedup_gpu__old_head"],
             gpu["eagle_tree_mean_accepted_len_gpu__old_head"]),
            ("H200 tree 4/4/10\nretrained", gpu["eagle_tree_bs1_speedup_gpu"], gpu["eagle_tree_mean_accepted_len_gpu"]),
            ("CPU fp32\nchain k=3", cpu["eagle_bs1_speedup_cpu"], cpu["eagle_mean_accepted_len_cpu"]),
            ("CPU int8\nchain k=3", cpu["eagle_bs1_speedup_cpu__int8"], cpu["eagle_mean_accepted_len_cpu__int8"]),
            ("CPU int8\nchain k=1", cpu["eagle_bs1_speedup_cpu__int8_k1"], cpu["eagle_mean_accepted_len_cpu__int8_k1"])]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1.6, 1]})
    xs = range(len(bars))
    ax.bar(xs, [b[1] for b in bars], color=["#bbb", "#3a7", "#bbb", "#3a7", "#58c", "#58c", "#58c"])
    for x, (_, v, acc) in zip(xs, bars):
        ax.text(x, v + 0.02, f"{v:.2f}×\nacc {acc:.2f}", ha="center", fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(2.0, color="r", lw=0.8, ls="--", label="GPU goal 2.0×")
    ax.axhline(1.8, color="orange", lw=0.8, ls="--", label="CPU goal 1.8×")
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=7)
    ax.set_ylabel("batch-1 speedup (TPOT off ÷ on)")
    ax.set_title("§11 EAGLE on SmolLM2-135M (acc = mean accepted length)")
    ax.legend(fontsize=8)
    batches = [1, 8, 32]
    over = [sg[f"smollm2_eagle_bs{b}_spec_json_tpot_ms_overlap"] for b in batches]
    serial = [sg[f"smollm2_eagle_bs{b}_spec_json_tpot_ms_serial"] for b in batches]
    plain = [sg[f"smollm2_eagle_bs{b}_spec_plain_tpot_ms"] for b in batches]
    w = 0.27
    for i, (vals, label, color) in enumerate(((serial, "JSON, serial", "#c55"), (over, "JSON, overlap", "#3a7"),
                                              (plain, "free text", "#999"))):
        bx.bar([j + (i - 1) * w for j in range(3)], vals, w, label=label, color=color)
    for j, b in enumerate(batches):
        bx.text(j, max(serial[j], plain[j]) + 0.1, f"cut {sg[f'smollm2_eagle_bs{b}_spec_json_tpot_cut']:.1%}",
                ha="center", fontsize=8)
    bx.set_xticks(range(3), [f"batch {b}" for b in batches])
    bx.set_ylabel("TPOT (ms)")
    bx.set_title("§12 JSON × EAGLE-2 tree (H200)")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
