"""Plot of session 15's fused EAGLE step from its result file:

    python benchmarks/plot_spec_fused.py --out docs/img/2026-12-01-session15.png

Left: §11 TPOT, speculation off, the host path and the fused step (H200, one lease). Right: host
time per engine step by phase (``spec_step_phases.py``), host path vs fused step; what the host
does not spend there it waits in ``collect``.
"""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "img", "2026-12-01-session15.png"))
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(HERE, "results", "2026-12-01-spec-fused-h200-session15.json")) as f:
        m = json.load(f)["metrics"]
    rows = [("chain k=3, bs 1", "eagle_bs1"), ("tree 4/4/10, bs 1", "eagle_tree_bs1"), ("tree 4/4/10, bs 8", "eagle_tree_bs8")]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.6))
    w = 0.27
    for i, (label, key, color) in enumerate((("speculation off", "tpot_ms_off_gpu_fused", "#999"),
                                             ("host path", "tpot_ms_on_gpu_host_path", "#c55"),
                                             ("fused step", "tpot_ms_on_gpu_fused", "#3a7"))):
        vals = [m[f"{r}_{key}"] for _, r in rows]
        ax.bar([j + (i - 1) * w for j in range(len(rows))], vals, w, label=label, color=color)
        for j, v in enumerate(vals):
            ax.text(j + (i - 1) * w, v + 0.03, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows])
    ax.set_ylabel("TPOT (ms)")
    ax.set_title("§11 EAGLE on SmolLM2-135M, H200 (lower is better)")
    ax.legend(fontsize=8)
    phases = ["propose", "schedule", "launch", "collect", "record", "process"]
    ph = m["phases"]
    for x, (name, key) in enumerate((("host path", "on_host_path"), ("fused step", "on"))):
        bottom = 0.0
        for p, color in zip(phases, ("#58c", "#aaa", "#c95", "#c55", "#777", "#3a7")):
            v = ph[key]["host_phases_us_per_step"].get(p, 0.0)
            bx.bar(x, v, 0.5, bottom=bottom, color=color, label=p if x == 0 else None)
            bottom += v
        bx.text(x, ph[key]["host_phases_us_per_step"]["step"] + 40, f"step {ph[key]['host_phases_us_per_step']['step']:.0f} µs",
                ha="center", fontsize=8)
    bx.set_xticks([0, 1], ["host path", "fused step"])
    bx.set_ylabel("µs per engine step (collect = waiting for the GPU)")
    bx.set_title("Host time by phase, batch 1, tree 4/4/10")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
