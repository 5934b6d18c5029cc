"""Plot the measured benchmark results: ``benchmarks/results/*.json`` -> ``docs/img/*.png``.

    python benchmarks/plot.py [--results benchmarks/results] [--out docs/img]

Writes, for whatever results exist (a missing file or metric only drops its bar/line/plot):

* ``decode_sweep.png``     §3: output tok/s against decode batch size, one line per model;
* ``headline_targets.png`` the headline metrics against their targets (green: met, red: missed);
* ``vs_hf.png``            MiniInfer / HF transformers ratios measured in the same run;
* ``prefix_cache.png``     §5: mean TTFT and throughput with prefix caching on and off;
* ``profile_kernels.png``  top GPU kernels of the decode-heavy profile (``*profile-decode*.json``);
* ``overlap.png``          §6: overlap scheduling on vs off (only once its JSON exists).
* ``structured_output.png`` §10: JSON ÷ plain TPOT, grammar-mask overlap on vs off;
* ``spec_verify_cost.png``  §11: verify cost ratio against the number of tokens verified.
* ``allreduce.png``         §13: all-reduce latency against message size (2x GPU, in CUDA graphs).
* ``sbs_vs_vllm.png``       MiniInfer before / after ÷ vLLM, one lease (``benchmarks/plot_sbs.py``).

Result files follow ../shared/BENCHMARKS.md: ``{"device", "date", "command", "metrics"}``
(the profile file has its fields at the top level instead).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEN, RED, GREY, BLUE = "#2e7d32", "#c62828", "#9e9e9e", "#1565c0"


@dataclass
class Result:
    path: str
    kind: str  # file name without the date and .json: "latency-qwen2-0.5b-run1"
    device: str
    date: str
    model: str | None
    metrics: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.kind


def _model_of(data: dict, kind: str) -> str | None:
    cmd = data.get("command", "")
    m = re.search(r"--model\s+(\S+)", cmd if isinstance(cmd, str) else " ".join(map(str, cmd)))
    if m:
        return m.group(1)
    if data.get("model"):
        return data["model"]
    m = re.search(r"(qwen\d-[\d.]+b|llama-3-8b)", kind)
    return m.group(1) if m else None


def load_results(folder: str) -> list[Result]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            print(f"skip {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(data, dict):
            continue
        stem = os.path.basename(path)[:-len(".json")]
        kind = re.sub(r"^\d{4}-\d{2}-\d{2}-", "", stem)
        metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
        out.append(Result(path, kind, data.get("device", "?"), data.get("date", "?"), _model_of(data, kind),
                          {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, data))
    return out


def _name(model: str | None) -> str:
    return (model or "?").replace("-", "_")


def values(results: list[Result], key: str, kinds: tuple[str, ...] = ()) -> list[tuple[str, float, str]]:
    """(file label, value, device) of ``key`` in every result (of the given kinds, by prefix)."""
    out = []
    for r in results:
        if kinds and not r.kind.startswith(kinds):
            continue
        if key in r.metrics:
            out.append((r.label, float(r.metrics[key]), r.device))
    return out


def ablation(results: list[Result], key: str) -> list[tuple[str, float, str]]:
    """``key`` as measured by the §6 overlap ablation, with overlap on and off (the ablation
    runs workload 1 on Qwen3-0.6B and workload 2 on Qwen2-0.5B)."""
    out = []
    for r in results:
        if "overlap_throughput_gain" not in r.metrics:
            continue
        for suffix, tag in (("", "overlap on"), ("_no_overlap", "overlap off")):
            if key + suffix in r.metrics:
                out.append((f"{r.label}: {tag}", float(r.metrics[key + suffix]), r.device))
    return out


def offline_throughput(results: list[Result], model: str) -> list[tuple[str, float, str]]:
    """§1 throughput of ``model``: the spec names it ``offline_throughput_tok_s`` for Qwen3-0.6B and
    ``<model>_offline_throughput_tok_s`` otherwise; ``bench throughput`` always writes the former."""
    out = []
    for r in results:
        if not r.kind.startswith("throughput") or r.model != model:
            continue
        for key in (f"{_name(model)}_offline_throughput_tok_s", "offline_throughput_tok_s"):
            if key in r.metrics:
                out.append((r.label, float(r.metrics[key]), r.device))
                break
    return out


def _save(fig, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {os.path.relpath(path, ROOT)}")
    return path


def _devices(rows) -> str:
    devs = sorted({d for *_, d in rows})
    return ", ".join(devs)


# --- (a) decode batch sweep -------------------------------------------------------------
def plot_sweep(results: list[Result], out_dir: str) -> str | None:
    pat = re.compile(r"^(.+)_sweep_bs(\d+)_tok_s$")
    series: dict[str, list[tuple[int, float]]] = {}
    devices = set()
    for r in results:
        for k, v in r.metrics.items():
            m = pat.match(k)
            if m:
                series.setdefault(f"{m.group(1)} ({r.label})", []).append((int(m.group(2)), float(v)))
                devices.add(r.device)
    if not series:
        print("no sweep results: skipping decode_sweep.png")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in sorted(series.items()):
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", label=name)
        for x, y in pts:
            ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({p[0] for pts in series.values() for p in pts}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("decode batch size (prompt 128, output 128)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"§3 decode batch sweep — {', '.join(sorted(devices))}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "decode_sweep.png")


# --- (b) headline metrics against targets -----------------------------------------------
@dataclass
class Target:
    title: str
    unit: str
    value: float
    higher_is_better: bool
    rows: list  # (label, value, device)
    reference: tuple[str, float] | None = None  # a published number to draw for context


def headline_targets(results: list[Result]) -> list[Target]:
    lat = ("latency",)

    def latency(key: str) -> list:
        return values(results, key, lat) + ablation(results, key)

    return [
        Target("Offline throughput, Qwen3-0.6B (§1)", "tok/s", 23000, True,
               offline_throughput(results, "qwen3-0.6b") + ablation(results, "offline_throughput_tok_s"),
               ("vLLM, H200: 22,900", 22900)),
        Target("bs1 TPOT, Qwen2-0.5B (§2)", "ms", 1.0, False, latency("qwen2_0.5b_bs1_tpot_ms")),
        Target("bs1 roofline ratio, Qwen2-7B (§2)", "TPOT / roofline", 1.1, False,
               latency("qwen2_7b_bs1_roofline_ratio")),
        Target("TTFT, 128-token prompt, Qwen2-0.5B (§2)", "ms", 3.0, False, latency("qwen2_0.5b_ttft_128_ms")),
        Target("TTFT, 1024-token prompt, Qwen2-0.5B (§2)", "ms", 5.0, False, latency("qwen2_0.5b_ttft_1024_ms")),
        Target("First / steady request (§7, warmup on)", "ratio", 1.1, False,
               values(results, "first_over_steady", ("startup",))),
        Target("Startup to ready, Qwen2-0.5B (§7)", "s", 20.0, False,
               values(results, "qwen2_0.5b_startup_s", ("startup",))),
        Target("Startup to ready, Qwen2-7B (§7)", "s", 20.0, False,
               values(results, "qwen2_7b_startup_s", ("startup",))),
    ]


def met(t: Target, v: float) -> bool:
    return v >= t.value if t.higher_is_better else v <= t.value


def plot_targets(results: list[Result], out_dir: str) -> str | None:
    targets = [t for t in headline_targets(results) if t.rows]
    if not targets:
        print("no headline metrics: skipping headline_targets.png")
        return None
    cols = 4 if len(targets) > 4 else len(targets)
    nrows = -(-len(targets) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 3.3 * nrows), squeeze=False)
    for ax in axes.flat[len(targets):]:
        ax.axis("off")
    for ax, t in zip(axes.flat, targets):
        labels = [lbl for lbl, _, _ in t.rows]
        vals = [v for _, v, _ in t.rows]
        colors = [GREEN if met(t, v) else RED for v in vals]
        xs = range(len(vals))
        ax.bar(xs, vals, color=colors, width=0.6)
        for x, v in zip(xs, vals):
            ax.annotate(f"{v:,.3g}" if v < 100 else f"{v:,.0f}", (x, v), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8)
        ax.axhline(t.value, color="black", ls="--", lw=1)
        ax.annotate(f"target {'≥' if t.higher_is_better else '≤'} {t.value:,g}", (1.0, t.value),
                    xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(-2, 3),
                    ha="right", fontsize=7)
        top = max(vals + [t.value])
        if t.reference is not None:
            ax.axhline(t.reference[1], color=GREY, ls=":", lw=1)
            ax.annotate(t.reference[0], (0.0, t.reference[1]), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(2, -9), fontsize=7, color="#555")
            top = max(top, t.reference[1])
        ax.set_ylim(0, top * 1.3)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
        ax.set_title(t.title, fontsize=8.5)
        ax.set_ylabel(t.unit, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    devs = sorted({d for t in targets for *_, d in t.rows})
    fig.suptitle(f"Headline metrics vs targets (green: met, red: missed) — {', '.join(devs)}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, "headline_targets.png")


# --- (c) MiniInfer vs HF transformers ---------------------------------------------------
def _pretty(metric: str) -> str:
    for a, b in (("_bs1_tpot", " bs1 TPOT"), ("_ttft_128", " TTFT (128)"), ("offline_throughput", "offline throughput"),
                 ("cpu_throughput", "CPU throughput")):
        metric = metric.replace(a, b)
    return metric


def vs_hf_rows(results: list[Result]) -> list[tuple[str, float, str]]:
    """(description, speedup over HF, device): > 1 means MiniInfer is faster."""
    rows = []
    for r in results:
        m = r.metrics
        for k, v in sorted(m.items()):
            if k.endswith("ratio_vs_hf"):
                rows.append((f"{_pretty(k.removesuffix('_ratio_vs_hf'))} [{r.label}]", float(v), r.device))
        for k in sorted(m):  # TTFT: the latency bench records both sides but no ratio
            mt = re.match(r"^(.+)_hf_ttft_128_ms$", k)
            if mt and f"{mt.group(1)}_ttft_128_ms" in m and m[f"{mt.group(1)}_ttft_128_ms"] > 0:
                rows.append((f"{_pretty(mt.group(1) + '_ttft_128')} [{r.label}]", m[k] / m[f"{mt.group(1)}_ttft_128_ms"],
                             r.device))
    return rows


def plot_vs_hf(results: list[Result], out_dir: str) -> str | None:
    rows = vs_hf_rows(results)
    if not rows:
        print("no HF baselines: skipping vs_hf.png")
        return None
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.4))
    ys = range(len(rows))
    vals = [v for _, v, _ in rows]
    ax.barh(ys, vals, color=[BLUE if v >= 1 else RED for v in vals])
    for y, v in zip(ys, vals):
        ax.annotate(f"{v:.1f}×", (v, y), textcoords="offset points", xytext=(3, -3), fontsize=8)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([d for d, _, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0.5, max(vals) * 2)
    ax.set_xlabel("MiniInfer speed / HF transformers speed, same run (log scale; > 1: MiniInfer faster)")
    ax.set_title(f"MiniInfer vs HF transformers — {_devices(rows)}", fontsize=10)
    ax.grid(axis="x", alpha=0.3, which="both")
    return _save(fig, out_dir, "vs_hf.png")


# --- §5 prefix cache, §6 overlap, profile -------------------------------------------------
def plot_prefix(results: list[Result], out_dir: str) -> str | None:
    runs = [r for r in results if "prefix_on_mean_ttft_ms" in r.metrics and "prefix_off_mean_ttft_ms" in r.metrics]
    if not runs:
        print("no prefix results: skipping prefix_cache.png")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(runs), 3.6))
    width = 0.38
    for ax, key, unit in ((axes[0], "mean_ttft_ms", "mean TTFT (ms)"), (axes[1], "throughput_tok_s", "output tok/s")):
        top = 0.0
        for i, r in enumerate(runs):
            for j, (tag, color) in enumerate((("on", BLUE), ("off", GREY))):
                v = r.metrics.get(f"prefix_{tag}_{key}", 0.0)
                x = i + (j - 0.5) * width
                ax.bar(x, v, width=width, color=color, label=f"caching {tag}" if i == 0 else None)
                ax.annotate(f"{v:,.0f}", (x, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
                top = max(top, v)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([r.label for r in runs], rotation=15, ha="right", fontsize=7)
        ax.set_ylabel(unit)
        ax.set_ylim(0, top * 1.2 or 1)
        ax.legend(fontsize=7)
    fig.suptitle(f"§5 shared 2048-token prefix, 64 requests, Qwen2-0.5B ({_devices([(0, 0, r.device) for r in runs])})",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, "prefix_cache.png")


def plot_overlap(results: list[Result], out_dir: str) -> str | None:
    r = next((r for r in reversed(results) if "overlap_throughput_gain" in r.metrics), None)
    if r is None:
        print("no overlap ablation results yet: skipping overlap.png")
        return None
    m = r.metrics
    tpot = sorted(k for k in m if k.endswith("_bs1_tpot_ms"))
    panels = [("offline throughput, §1 workload (tok/s)", "offline_throughput_tok_s")] + [(f"{k} (ms)", k) for k in tpot]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.2), squeeze=False)
    for ax, (title, key) in zip(axes.flat, panels):
        vals = [m.get(key, 0.0), m.get(f"{key}_no_overlap", 0.0)]
        ax.bar(["overlap on", "overlap off"], vals, color=[BLUE, GREY], width=0.55)
        for x, v in enumerate(vals):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.3g}", (x, v), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, max(vals) * 1.2 or 1)
    fig.suptitle(f"§6 overlap ablation: throughput gain {m['overlap_throughput_gain']:.2f}×, "
                 f"TPOT gain {m.get('overlap_tpot_gain', float('nan')):.2f}× ({r.device})", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, "overlap.png")


def plot_profile(results: list[Result], out_dir: str) -> str | None:
    profiles = [r for r in results if "profile-decode" in r.kind and r.raw.get("top_kernels")]
    if not profiles:
        print("no decode profile: skipping profile_kernels.png")
        return None
    fig, axes = plt.subplots(len(profiles), 1, figsize=(8, 4.4 * len(profiles)), squeeze=False)
    for ax, r in zip(axes.flat, profiles):
        p = r.raw
        top = p["top_kernels"][:10]
        names = [k["name"] if len(k["name"]) <= 48 else k["name"][:45] + "..." for k in top]
        shares = [100 * k["share"] for k in top]
        ax.barh(range(len(top)), shares, color=BLUE)
        for y, (v, k) in enumerate(zip(shares, top)):
            ax.annotate(f"{v:.1f}%  ({k['ms']:.0f} ms, {k['calls']} calls)", (v, y), textcoords="offset points",
                        xytext=(3, -3), fontsize=7)
        ax.set_yticks(range(len(top)))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, max(shares) * 1.6)
        ax.set_xlabel("share of GPU kernel time (%)")
        ax.set_title(f"{r.kind}: {p.get('model')}, batch {p.get('batch')}, "
                     f"prompt {p.get('prompt_len')}, output {p.get('out_len')}\nGPU idle {100 * p.get('gpu_idle_fraction', float('nan')):.0f}% "
                     f"of the run, {p.get('tok_s', 0):,.0f} tok/s ({r.device})", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_dir, "profile_kernels.png")


# --- §10 structured output, §11 speculative decoding -------------------------------------
def plot_structured_output(results: list[Result], out_dir: str) -> str | None:
    """§10: constrained ÷ plain TPOT with the grammar-mask overlap on and off, per model and
    batch size (``<model>_bs<b>_json_tpot_overhead`` and ``..._serial``), against the 1.03 goal."""
    r = next((r for r in reversed(results) if r.kind.startswith("structured-output")), None)
    if r is None:
        print("no structured-output results: skipping structured_output.png")
        return None
    m = r.metrics
    groups = sorted({k.removesuffix("_json_tpot_overhead") for k in m if k.endswith("_json_tpot_overhead")},
                    key=lambda g: (int(re.search(r"_bs(\d+)$", g).group(1)), g))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(groups), 3.8))
    width = 0.38
    top = 0.0
    for i, g in enumerate(groups):
        for j, (suffix, tag, color) in enumerate((("", "mask overlap on", BLUE), ("_serial", "overlap off", GREY))):
            v = float(m.get(f"{g}_json_tpot_overhead{suffix}", 0.0))
            x = i + (j - 0.5) * width
            ax.bar(x, v, width=width, color=color, label=tag if i == 0 else None)
            ax.annotate(f"{v:.2f}", (x, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
            top = max(top, v)
    ax.axhline(1.03, color=RED, linestyle="--", linewidth=1, label="goal ≤ 1.03")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g.replace("_bs", "\nbatch ").replace("qwen2_0_5b", "Qwen2-0.5B").replace("qwen2_7b", "Qwen2-7B")
                        for g in groups], fontsize=8)
    ax.set_ylabel("JSON TPOT ÷ plain TPOT")
    ax.set_ylim(0, top * 1.18 or 1)
    ax.legend(fontsize=7)
    ax.set_title(f"§10 structured output overhead, {r.date} ({r.device})", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_dir, "structured_output.png")


def plot_verify_cost(results: list[Result], out_dir: str) -> str | None:
    """§11: one verify forward of n tokens ÷ one plain decode step (``*verify_cost_ratio_<n>``),
    against the ≤ 1.15 goal at 16. Session 7 files hold two series: the first run (n > 16 eager)
    and ``*_64row_graphs`` (prefill graphs with 64 logits rows: every n replays a graph)."""
    pat = re.compile(r"verify_cost_ratio_(\d+)(_64row_graphs)?$")
    found = [r for r in results if any(pat.search(k) for k in r.metrics)]
    r = next((r for r in reversed(found) if any(k.endswith("_64row_graphs") for k in r.metrics)),
             found[-1] if found else None)
    if r is None:
        print("no verify-cost results: skipping spec_verify_cost.png")
        return None
    series: dict[bool, list[tuple[int, float]]] = {False: [], True: []}
    for k, v in r.metrics.items():
        m = pat.search(k)
        if m:
            series[bool(m.group(2))].append((int(m.group(1)), float(v)))
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ys = [y for pts in series.values() for _, y in pts]
    for wide, pts in series.items():
        pts.sort()
        xs = [x for x, _ in pts]
        ax.plot(xs, [y for _, y in pts], color=GREY, linewidth=1, zorder=1)
        for x, y in pts:
            graph = wide or x <= 16
            ax.scatter([x], [y], color=BLUE if graph else RED, marker="o" if wide or not series[True] else "s", zorder=2,
                       label=("prefill CUDA graph" if graph else "eager (> 16 logits rows, before)"))
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.axhline(1.15, color=GREEN, linestyle="--", linewidth=1, label="goal ≤ 1.15 at 16")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper left")
    ax.set_xscale("log", base=2)
    xs = sorted({x for pts in series.values() for x, _ in pts})
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("tokens verified (root + tree nodes)")
    ax.set_ylabel("verify ÷ one decode step")
    ax.set_ylim(0, max(ys) * 1.2)
    step = r.metrics.get("qwen2_7b_verify_decode_step_ms")
    ax.set_title(f"§11 verify cost, Qwen2-7B (dummy bf16), 512-token context\n"
                 f"decode step {step:.2f} ms, {r.date} ({r.device})" if step else f"§11 verify cost ({r.device})",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, out_dir, "spec_verify_cost.png")


ALLREDUCE_METHODS = (("nccl_graph", "NCCL", RED), ("one_shot_graph", "one-shot (symm. memory)", GREEN),
                     ("two_shot_graph", "two-shot (symm. memory)", BLUE), ("engine_graph", "engine's choice", "black"))


def allreduce_runs(data: dict) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """``[(run name, {method: [(KB, µs), ...]})]`` from a TP results file's
    ``allreduce_us_run<N>_*`` blocks (or an ``allreduce_bench.py`` file's ``metrics``), newest run first."""
    blocks = sorted(((k, v) for k, v in data.items() if k.startswith("allreduce_us_") and isinstance(v, dict)),
                    reverse=True)
    if not blocks and any(k.startswith("allreduce_") for k in data.get("metrics", {})):
        blocks = [("allreduce_bench", data["metrics"])]
    out = []
    for name, block in blocks:
        per: dict[str, list[tuple[int, float]]] = {}
        for key, us in block.items():
            m = re.fullmatch(r"allreduce_(\w+?)_(\d+)kb_us", key)
            if m and isinstance(us, (int, float)):
                per.setdefault(m.group(1), []).append((int(m.group(2)), float(us)))
        if per:
            out.append((re.sub(r"^allreduce_us_(run\d+).*", r"\1", name), {k: sorted(v) for k, v in per.items()}))
    return out


def plot_allreduce(results: list[Result], out_dir: str) -> str | None:
    """§13: microseconds per all-reduce against message size, log-log, one line per method
    (NCCL, one-shot, two-shot, the engine's choice), all inside CUDA graphs; the newest run
    solid, earlier runs dashed and lighter (NCCL's small-message time moved between runs)."""
    r = next((r for r in reversed(results) if allreduce_runs(r.raw)), None)
    if r is None:
        print("no all-reduce results: skipping allreduce.png")
        return None
    runs = allreduce_runs(r.raw)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (run, per) in enumerate(runs):
        for method, label, color in ALLREDUCE_METHODS:
            pts = per.get(method)
            if not pts:
                continue
            ax.plot([x for x, _ in pts], [y for _, y in pts], color=color, marker="o" if i == 0 else ".",
                    markersize=3.5, linewidth=1.4 if i == 0 else 0.9, linestyle="-" if i == 0 else "--",
                    alpha=1.0 if i == 0 else 0.55, label=f"{label}, {run}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    xs = sorted({x for _, per in runs for pts in per.values() for x, _ in pts})
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x // 1024} MB" if x >= 1024 else f"{x} KB" for x in xs], rotation=45, fontsize=7)
    ax.set_xlabel("message size (bf16)")
    ax.set_ylabel("µs per all-reduce (in a CUDA graph)")
    ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"§13 all-reduce, 2 ranks, {r.device}\n{r.date}, benchmarks/allreduce_bench.py", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_dir, "allreduce.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img"))
    a = ap.parse_args(argv)
    results = load_results(a.results)
    if not results:
        print(f"no result files in {a.results}", file=sys.stderr)
        return 1
    for fn in (plot_sweep, plot_targets, plot_vs_hf, plot_prefix, plot_overlap, plot_profile,
               plot_structured_output, plot_verify_cost, plot_allreduce):
        fn(results, a.out)
    import plot_sbs  # beside this file
    plot_sbs.main(["--results", a.results, "--out", a.out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
