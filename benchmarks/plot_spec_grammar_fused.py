"""Plot of session 16's constrained fused EAGLE step (§12) from the result files:

    python benchmarks/plot_spec_grammar_fused.py --out docs/img/2026-12-01-session16.png

Left: §12 TPOT at batch 1 / 8 / 32 for JSON with speculation (overlap and serial), free-text
speculation and JSON without speculation; session 15 (constrained steps on the host path) beside
session 16 (in the fused step), each its own lease, H200. Right: the grammar fill per verify step
(p50) against what the overlap saves (serial − overlap TPOT × accepted length).
"""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
BS = (1, 8, 32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "img", "2026-12-01-session16.png"))
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def load(name: str) -> dict:
        with open(os.path.join(HERE, "results", name)) as f:
            return json.load(f)["metrics"]
    s15 = load("2026-12-01-spec-grammar-h200-session15.json")
    s16 = {k[len("run2__"):]: v for k, v in load("2026-12-01-spec-grammar-fused-h200-session16.json").items()
           if k.startswith("run2__")}
    modes = (("JSON + spec, overlap", "spec_json_tpot_ms_overlap", "#3a7"),
             ("JSON + spec, serial", "spec_json_tpot_ms_serial", "#c55"),
             ("free text + spec", "spec_plain_tpot_ms", "#57c"),
             ("JSON, no spec", "json_nospec_tpot_ms", "#999"))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 4.8))
    groups = [(f"bs {b}\nsession {s}", m, b) for b in BS for s, m in ((15, s15), (16, s16))]
    w = 0.2
    for i, (label, key, color) in enumerate(modes):
        vals = [m[f"smollm2_eagle_bs{b}_{key}"] for _, m, b in groups]
        xs = [j + (i - 1.5) * w for j in range(len(groups))]
        ax.bar(xs, vals, w, label=label, color=color)
        for x, v in zip(xs, vals):
            ax.text(x, v + 0.04, f"{v:.2f}", ha="center", fontsize=6, rotation=90)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    ax.set_ylabel("TPOT (ms)")
    ax.set_title("§12 JSON schema × EAGLE-2 tree 4/4/10 on SmolLM2-135M, H200 (lower is better)", fontsize=9)
    ax.legend(fontsize=8)
    fill = [s16[f"smollm2_eagle_bs{b}_spec_json_verify_mask_fill_us_p50_overlap"] / 1e3 for b in BS]
    saved = [(s16[f"smollm2_eagle_bs{b}_spec_json_tpot_ms_serial"] - s16[f"smollm2_eagle_bs{b}_spec_json_tpot_ms_overlap"])
             * s16[f"smollm2_eagle_bs{b}_spec_json_mean_accepted_len_overlap"] for b in BS]
    step = [s16[f"smollm2_eagle_bs{b}_spec_json_tpot_ms_overlap"] * s16[f"smollm2_eagle_bs{b}_spec_json_mean_accepted_len_overlap"]
            for b in BS]
    for i, (label, vals, color) in enumerate((("grammar fill per step (p50)", fill, "#c55"),
                                             ("saved per step by the overlap", saved, "#3a7"),
                                             ("step with the overlap", step, "#999"))):
        xs = [j + (i - 1) * 0.27 for j in range(len(BS))]
        bx.bar(xs, vals, 0.27, label=label, color=color)
        for x, v in zip(xs, vals):
            bx.text(x, v + 0.05, f"{v:.2f}", ha="center", fontsize=7)
    bx.set_xticks(range(len(BS)), [f"bs {b}" for b in BS])
    bx.set_ylabel("ms per verify step")
    bx.set_title("session 16: the host's grammar work vs the step", fontsize=9)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
