"""Plot of session 17's overlap scheduling for the fused EAGLE step (run-ahead), from
``benchmarks/results/2026-12-02-spec-run-ahead-h200-session17.json``::

    python benchmarks/plot_spec_run_ahead.py --out docs/img/2026-12-02-session17.png

Left: §12 TPOT (run2, H200) at batch 1 / 8 / 32 for JSON with speculation under the four
combinations of the two overlaps (the grammar fill beside the verify; step N + 1 queued before
step N is processed), free-text speculation with and without run-ahead, and JSON without
speculation. Right: §11 TPOT (free text, SmolLM2 + its head) without speculation, and with it,
run-ahead off and on.
"""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
BS = (1, 8, 32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "img", "2026-12-02-session17.png"))
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(HERE, "results", "2026-12-02-spec-run-ahead-h200-session17.json")) as f:
        m = json.load(f)["metrics"]
    modes = (("JSON, fill serial, no run-ahead", "spec_json_tpot_ms_serial_sync", "#c55"),
             ("JSON, fill overlapped, no run-ahead", "spec_json_tpot_ms_sync", "#e96"),
             ("JSON, fill serial, run-ahead", "spec_json_tpot_ms_serial", "#9c6"),
             ("JSON, both overlaps", "spec_json_tpot_ms_overlap", "#3a7"),
             ("free text, no run-ahead", "spec_plain_tpot_ms_sync", "#99d"),
             ("free text, run-ahead", "spec_plain_tpot_ms", "#57c"),
             ("JSON, no speculation", "json_nospec_tpot_ms", "#999"))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    w = 0.12
    for i, (label, key, color) in enumerate(modes):
        xs = [g + (i - 3) * w for g in range(len(BS))]
        ys = [m[f"run2__smollm2_eagle_bs{b}_{key}"] for b in BS]
        ax.bar(xs, ys, w, label=label, color=color)
    ax.set_xticks(range(len(BS)), [f"batch {b}" for b in BS])
    ax.set_ylabel("TPOT (ms)")
    ax.set_title("§12: JSON schema + EAGLE-2 tree 4/4/10, SmolLM2 (H200)")
    ax.legend(fontsize=7, ncol=2)
    rows = (("chain k=3, bs 1", "eagle_bs1"), ("tree, bs 1", "eagle_tree_bs1"), ("tree, bs 8", "eagle_tree_bs8"))
    for i, (label, color, fmt) in enumerate((("no speculation", "#999", "{}_tpot_ms_off_gpu"),
                                             ("speculation, no run-ahead", "#99d", "{}_tpot_ms_on_sync_gpu"),
                                             ("speculation, run-ahead", "#57c", "{}_tpot_ms_on_gpu"))):
        bx.bar([g + (i - 1) * 0.25 for g in range(len(rows))], [m["s11__" + fmt.format(k)] for _, k in rows],
               0.25, label=label, color=color)
    bx.set_xticks(range(len(rows)), [r for r, _ in rows])
    bx.set_ylabel("TPOT (ms)")
    bx.set_title("§11: free text, 32 held-out prompts × 128 tokens")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
